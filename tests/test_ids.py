"""ledger.IdGenerator (ledger/ids.py): time-ordered 64-bit ids, strictly increasing per generator, unique across
threads and across nodes, and refusing bad arguments."""
from __future__ import annotations

import sys
import threading
import time
import types

import numpy as np
import pytest

import ledger

SEQUENCE_BITS = 22          # the layout in ledger/ids.py: milliseconds << 22 | node | counter
EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def ids_module():
    """The module that defines IdGenerator, found through the public name (code may move between modules)."""
    return sys.modules[ledger.IdGenerator.__module__]


def frozen_clock(monkeypatch, milliseconds_since_epoch):
    """Make the generator read a wall clock the test moves: returns a one-element list holding the time in ms."""
    now = [milliseconds_since_epoch]
    fake = types.SimpleNamespace(time_ns=lambda: (EPOCH_MS + now[0]) * 1_000_000)
    monkeypatch.setattr(ids_module(), "time", fake)
    return now


def test_calls_are_strictly_increasing_and_valid_transfer_ids():
    generate = ledger.IdGenerator()
    ids = [generate() for _ in range(10_000)]
    assert all(a < b for a, b in zip(ids, ids[1:]))
    assert all(0 < value < 2**64 - 1 for value in ids)


def test_calls_and_batches_interleaved_stay_increasing():
    generate = ledger.IdGenerator()
    ids: list[int] = []
    for size in (1, 5, 0, 300, 2):
        ids.append(generate())
        ids.extend(int(value) for value in generate.batch(size))
    assert all(a < b for a, b in zip(ids, ids[1:]))


def test_batch_is_uint64_and_empty_for_zero():
    generate = ledger.IdGenerator()
    block = generate.batch(1000)
    assert block.dtype == np.uint64 and block.shape == (1000,)
    assert (np.diff(block.astype(object)) > 0).all()
    empty = generate.batch(0)
    assert empty.dtype == np.uint64 and empty.size == 0


def test_the_time_component_is_milliseconds_since_2024():
    before = time.time_ns() // 1_000_000 - EPOCH_MS
    value = ledger.IdGenerator()()
    after = time.time_ns() // 1_000_000 - EPOCH_MS
    assert before <= value >> SEQUENCE_BITS <= after


def test_unique_across_threads_and_increasing_within_each():
    """8 threads share one generator, mixing single ids and batches: no id is handed out twice, and each thread
    sees its own ids in increasing order."""
    generate = ledger.IdGenerator()
    results: list[list[int]] = [[] for _ in range(8)]
    start = threading.Barrier(len(results))

    def work(mine: list[int]) -> None:
        start.wait()
        for round_number in range(500):
            if round_number % 10 == 0:
                mine.extend(int(value) for value in generate.batch(37))
            else:
                mine.append(generate())

    threads = [threading.Thread(target=work, args=(mine,)) for mine in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [value for mine in results for value in mine]
    assert len(everything) == len(set(everything)) == 8 * (450 + 50 * 37)
    for mine in results:
        assert all(a < b for a, b in zip(mine, mine[1:]))


def test_nodes_never_collide_and_carry_their_number():
    """Two generators with different nodes under one frozen clock: the node sits in the top node_bits of the
    sequence, so their ids differ even in the same millisecond."""
    node_bits = 4
    first, second = ledger.IdGenerator(node=5, node_bits=node_bits), ledger.IdGenerator(node=6, node_bits=node_bits)
    counter_bits = SEQUENCE_BITS - node_bits
    a = [first() for _ in range(100)] + [int(value) for value in first.batch(100)]
    b = [second() for _ in range(100)] + [int(value) for value in second.batch(100)]
    assert not set(a) & set(b)
    assert {(value >> counter_bits) & 0xF for value in a} == {5}
    assert {(value >> counter_bits) & 0xF for value in b} == {6}


def test_a_clock_that_steps_back_does_not_make_ids_go_back(monkeypatch):
    now = frozen_clock(monkeypatch, 1_000_000)
    generate = ledger.IdGenerator()
    ids = [generate()]
    now[0] -= 5_000             # the wall clock steps back 5 s
    ids += [generate() for _ in range(3)] + [int(value) for value in generate.batch(3)]
    now[0] += 10_000
    ids.append(generate())
    assert all(a < b for a, b in zip(ids, ids[1:]))
    assert ids[-1] >> SEQUENCE_BITS == 1_005_000


def test_a_full_millisecond_borrows_the_next_one(monkeypatch):
    """With 16 node bits, 64 ids fit in a millisecond: more in the same millisecond come from the next ones, still
    increasing and unique."""
    frozen_clock(monkeypatch, 2_000)
    generate = ledger.IdGenerator(node=3, node_bits=16)
    ids = [generate() for _ in range(100)] + [int(value) for value in generate.batch(500)]
    assert all(a < b for a, b in zip(ids, ids[1:]))
    milliseconds = sorted({value >> SEQUENCE_BITS for value in ids})
    assert milliseconds == list(range(2_000, 2_000 + len(milliseconds))) and len(milliseconds) >= 600 // 64


def test_the_time_component_running_out_is_an_error(monkeypatch):
    frozen_clock(monkeypatch, 2 ** (64 - SEQUENCE_BITS))
    generate = ledger.IdGenerator()
    with pytest.raises(OverflowError, match="exhausted"):
        generate()
    with pytest.raises(OverflowError, match="exhausted"):
        generate.batch(2)


@pytest.mark.parametrize("node, node_bits, message", [
    (0, -1, "node_bits must be in"),
    (0, 17, "node_bits must be in"),
    (1, 0, "node must be in"),
    (-1, 4, "node must be in"),
    (16, 4, "node must be in"),
    (1 << 16, 16, "node must be in"),
])
def test_bad_node_arguments_are_refused(node, node_bits, message):
    with pytest.raises(ValueError, match=message):
        ledger.IdGenerator(node=node, node_bits=node_bits)


def test_the_widest_node_range_is_accepted():
    for node, node_bits in ((0, 0), (0, 16), ((1 << 16) - 1, 16), (1, 1)):
        assert ledger.IdGenerator(node=node, node_bits=node_bits)() > 0


def test_a_negative_batch_count_is_refused():
    with pytest.raises(ValueError, match="count must be >= 0"):
        ledger.IdGenerator().batch(-1)


def test_generated_ids_are_accepted_as_transfer_ids(engine):
    generate = ledger.IdGenerator()
    engine.create_account(1, min_balance=ledger.BALANCE_MIN)
    engine.create_account(2)
    assert engine.transfer(generate(), 1, 2, 10) == ledger.TransferResult.OK
    rows = np.zeros(3, ledger.TRANSFER_DTYPE)
    rows["id"], rows["debit_account"], rows["credit_account"], rows["amount"], rows["ledger"] = generate.batch(3), 1, 2, 1, 1
    assert not engine.transfers(rows).any()
