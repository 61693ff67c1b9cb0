"""Replication at the journal level, without any transport (ledger/store.py): a primary's publish hook copies each
committed batch out byte for byte (Store.batch_bytes); a standby that follows (Store.follow) takes the bytes in
(Store.append_replicated), checks them before anything is applied, and applies them with the core's replay. After
any workload the standby's state, its verify() and its journal records are the primary's; every refused message
(a duplicate, a gap, damage, a forged batch, a truncated message, garbage) leaves it unchanged and usable."""
from __future__ import annotations

import glob
import os
import random

import numpy as np
import pytest

import ledger
from ledger import _core, _ring
from ledger.api import open_with_hooks
from ledger.format import (
    RECORD_SIZE,
    SEGMENT_HEADER_BYTES,
    WORD_CHECKSUM,
    WORD_COMMIT,
    WORD_PREVIOUS_CHECKSUM,
    COMMIT_MAGIC,
    batch_checksum,
)
from ledger.ring import Server
from support.clock import Clock
from support.producers import producer

SEGMENT_RECORDS_LOG2 = 10        # 1024 records a segment: the workloads cross segment boundaries
SETTLEMENT = 1
WALLETS = list(range(2, 14))
F = ledger.TransferFlags


class Primary:
    """A primary ledger whose publish hook keeps each committed batch's bytes, in order."""

    def __init__(self, path: str | None, clock: Clock, durability: str = "fsync", **options) -> None:
        self.messages: list[bytes] = []
        self.ranges: list[tuple[int, int]] = []
        extra = {} if path is None else {"durability": durability}
        self.handle = open_with_hooks(path, create=True, publish=self.publish, clock=clock,
                                      segment_records_log2=SEGMENT_RECORDS_LOG2, **extra, **options)

    def publish(self, start: int, end: int) -> None:
        self.ranges.append((start, end))
        self.messages.append(self.handle.store.batch_bytes(start, end))


def open_standby(path: str | None, durability: str = "fsync") -> ledger.Ledger:
    extra = {} if path is None else {"durability": durability}
    standby = ledger.open(path, create=True, segment_records_log2=SEGMENT_RECORDS_LOG2, **extra)
    standby.store.follow()
    return standby


def deliver(standby: ledger.Ledger, messages: list[bytes]) -> None:
    for message in messages:
        assert standby.store.append_replicated(message) == standby.stats()["journal_position"]


def transfer_rows(rows: list[tuple]) -> np.ndarray:
    """rows of (id, debit, credit, amount, flags, pending_id, timeout)."""
    batch = ledger.transfers_batch(len(rows))
    for index, (id_, debit, credit, amount, flags, pending_id, timeout) in enumerate(rows):
        batch[index] = (id_, debit, credit, amount, pending_id, 0, 1, timeout, 7, int(flags))
    return batch


def workload(handle: ledger.Ledger, clock: Clock, seed: int, rounds: int = 60, large: int = 0) -> list[int]:
    """Accounts, funding, transfers (some failing), linked chains (some failing whole), pending transfers with
    and without timeouts, posts (full and partial) and voids, and expiries (the clock moved past timeouts);
    with `large`, one batch of that many transfers half-way (across segment boundaries).
    Returns every transfer id tried."""
    rng = random.Random(seed)
    accounts = ledger.accounts_batch(len(WALLETS) + 1)
    accounts["id"] = [SETTLEMENT] + WALLETS
    accounts["ledger"] = 1
    accounts["min_balance"][0] = ledger.BALANCE_MIN
    accounts["max_balance"] = ledger.BALANCE_MAX
    assert not handle.create_accounts(accounts).any()
    ids = iter(range(1000, 10**9))
    tried: list[int] = []
    pending: list[tuple[int, int]] = []
    funding = transfer_rows([(next(ids), SETTLEMENT, wallet, 1000, 0, 0, 0) for wallet in WALLETS])
    tried += funding["id"].tolist()
    assert not handle.transfers(funding).any()
    for round_ in range(rounds):
        if large and round_ == rounds // 2:
            rows = transfer_rows([(next(ids), SETTLEMENT, WALLETS[k % len(WALLETS)], 1, 0, 0, 0)
                                  for k in range(large)])
            tried += rows["id"].tolist()
            assert not handle.transfers(rows).any()
        choice = rng.random()
        if choice < 0.25:
            id_ = next(ids)
            tried.append(id_)
            handle.transfer(id_, rng.choice(WALLETS), rng.choice(WALLETS + [99]), rng.randint(1, 400))
        elif choice < 0.5:
            rows = []
            for _ in range(rng.randint(1, 8)):
                linked = F.LINKED if rng.random() < 0.4 else F.NONE
                rows.append((next(ids), rng.choice(WALLETS), rng.choice(WALLETS), rng.randint(1, 600), linked,
                             0, 0))
            if rng.random() < 0.3:
                rows.append((rows[0][0], *rows[0][1:]))   # a retry in the same batch: EXISTS
            tried += [row[0] for row in rows]
            handle.transfers(transfer_rows(rows))
        elif choice < 0.7:
            id_ = next(ids)
            tried.append(id_)
            debit, credit = rng.sample(WALLETS, 2)
            amount = rng.randint(1, 200)
            if handle.transfer(id_, debit, credit, amount, flags=F.PENDING, timeout=rng.choice([0, 1, 2, 5])) == 0:
                pending.append((id_, amount))
        elif choice < 0.85 and pending:
            pending_id, amount = pending.pop(rng.randrange(len(pending)))
            id_ = next(ids)
            tried.append(id_)
            flags = F.POST_PENDING if rng.random() < 0.6 else F.VOID_PENDING
            posted = rng.randint(0, amount) if flags == F.POST_PENDING else 0
            handle.transfer(id_, 0, 0, posted, ledger=0, flags=flags, pending_id=pending_id)
        else:
            clock.advance(rng.randint(0, 2 * 10**9))
    clock.advance(10 * 10**9)                      # past every timeout: the next call expires what is due
    id_ = next(ids)
    tried.append(id_)
    handle.transfer(id_, SETTLEMENT, WALLETS[0], 1)
    return tried


def journal_records(path: str) -> list[bytes]:
    """The records of each segment file (its header, which holds the file's creation time, left out), with the
    files that hold only zeros (prepared ahead of the writer) dropped from the end."""
    records = []
    for name in sorted(glob.glob(os.path.join(path, "journal", "*.segment"))):
        with open(name, "rb") as file:
            records.append(file.read()[SEGMENT_HEADER_BYTES:])
    while records and not any(records[-1]):
        records.pop()
    return records


def assert_same_state(primary: ledger.Ledger, standby: ledger.Ledger, ids: list[int]) -> None:
    assert standby.stats()["journal_position"] == primary.stats()["journal_position"]
    assert standby.store.engine.last_checksum == primary.store.engine.last_checksum
    assert np.array_equal(standby.accounts(), primary.accounts())
    assert np.array_equal(standby.lookup_transfers(ids), primary.lookup_transfers(ids))


def check_verified(*handles: ledger.Ledger) -> None:
    for handle in handles:
        report = handle.verify()
        assert report.ok, str(report)


@pytest.mark.parametrize("primary_durability,standby_durability",
                         [("fsync", "fsync"), ("os", "os"), ("fsync", "os"), ("memory", "fsync")])
def test_a_standby_fed_every_message_is_the_primary(tmp_path, primary_durability, standby_durability):
    clock = Clock()
    primary_path = None if primary_durability == "memory" else str(tmp_path / "primary")
    primary = Primary(primary_path, clock, primary_durability)
    seed = len(primary_durability) * 10 + len(standby_durability)
    ids = workload(primary.handle, clock, seed=seed, rounds=120, large=20_000 if seed == 55 else 1500)
    states = primary.handle.lookup_transfers(ids)["state"]
    assert (states == ledger.TransferState.PENDING_EXPIRED).any(), "the workload expired nothing"
    assert (states == ledger.TransferState.PENDING_POSTED).any() and (states == 0).any()
    standby_path = str(tmp_path / "standby")
    standby = open_standby(standby_path, standby_durability)
    deliver(standby, primary.messages)
    assert_same_state(primary.handle, standby, ids)
    check_verified(primary.handle, standby)
    primary.handle.close()
    standby.close()
    if primary_path is not None:
        assert journal_records(standby_path) == journal_records(primary_path)
        assert len(journal_records(primary_path)) > 1, "the workload stayed in one segment"
    reopened = ledger.open(standby_path)
    try:
        check_verified(reopened)
        if primary_path is not None:
            again = ledger.open(primary_path)
            try:
                assert_same_state(again, reopened, ids)
            finally:
                again.close()
    finally:
        reopened.close()


def test_several_batches_in_one_message_and_any_grouping(tmp_path):
    clock = Clock()
    primary = Primary(str(tmp_path / "primary"), clock)
    ids = workload(primary.handle, clock, seed=7, rounds=40)
    messages, ranges = primary.messages, primary.ranges
    # Groups of 1 to 5 consecutive batches, each group one message: batch_bytes over the whole range is the
    # concatenation of the batches' own bytes.
    grouped, index, rng = [], 0, random.Random(3)
    while index < len(messages):
        size = rng.randint(1, 5)
        start, end = ranges[index][0], ranges[min(index + size, len(ranges)) - 1][1]
        message = primary.handle.store.batch_bytes(start, end)
        assert message == b"".join(messages[index:index + size])
        grouped.append(message)
        index += size
    assert any(len(message) > len(messages[0]) for message in grouped)
    standby = open_standby(str(tmp_path / "standby"))
    deliver(standby, grouped)
    assert_same_state(primary.handle, standby, ids)
    # The whole journal in one message, into a second standby.
    whole = open_standby(str(tmp_path / "whole"))
    deliver(whole, [primary.handle.store.batch_bytes(1, primary.handle.stats()["journal_position"])])
    assert_same_state(primary.handle, whole, ids)
    check_verified(standby, whole)
    for handle in (primary.handle, standby, whole):
        handle.close()


def test_batch_bytes_reads_old_segments_of_a_reopened_primary_through_checked_reads(tmp_path):
    clock = Clock()
    path = str(tmp_path / "primary")
    primary = Primary(path, clock)
    workload(primary.handle, clock, seed=11, rounds=40)
    primary.handle.snapshot()
    end = primary.handle.stats()["journal_position"]
    primary.handle.close()
    with ledger.open(path, segment_records_log2=SEGMENT_RECORDS_LOG2) as reopened:
        assert reopened.store.engine.verified_from == end   # opened from the snapshot: nothing replayed
        assert reopened.store.batch_bytes(1, end) == b"".join(primary.messages)
        start, stop = primary.ranges[3]
        assert reopened.store.batch_bytes(start, stop) == primary.messages[3]


def test_batch_bytes_refuses_a_range_that_is_not_whole_committed_batches(tmp_path):
    clock = Clock()
    primary = Primary(str(tmp_path / "primary"), clock)
    workload(primary.handle, clock, seed=5, rounds=10)
    store = primary.handle.store
    (first_start, first_end), (second_start, second_end) = primary.ranges[1], primary.ranges[2]
    end = primary.handle.stats()["journal_position"]
    for start, stop, match in [(first_start + 1, first_end, "batch header"), (first_start, first_end - 1, "batch end"),
                               (first_start, second_start + 1, "batch end"), (first_start, end + 2, "committed"),
                               (first_start, first_start, "committed"), (0, first_end, "committed")]:
        with pytest.raises(ValueError, match=match):
            store.batch_bytes(start, stop)
    assert store.batch_bytes(first_start, second_end) == primary.messages[1] + primary.messages[2]
    primary.handle.close()


def forged(message: bytes, previous_checksum: int | None = None, edit=None) -> bytes:
    """A copy of a one-batch message with its previous_checksum replaced and/or its records edited (edit(words)),
    then its checksum and commit word recomputed with the core's own checksum: a well-formed committed batch."""
    words = np.frombuffer(bytearray(message), dtype="<u8").reshape(-1, 8).copy()
    if previous_checksum is not None:
        words[0, WORD_PREVIOUS_CHECKSUM] = previous_checksum
    if edit is not None:
        edit(words)
    checksum = batch_checksum(words[0], [words[1:].tobytes()])
    assert checksum == _core.crc32c(words[0, :5].tobytes(), _core.crc32c(words[1:].tobytes()))
    words[0, WORD_CHECKSUM] = checksum
    words[0, WORD_COMMIT] = (COMMIT_MAGIC << 32) | checksum
    return words.tobytes()


def flipped(message: bytes, byte: int, bit: int = 3) -> bytes:
    damaged = bytearray(message)
    damaged[byte] ^= 1 << bit
    return bytes(damaged)


def standby_view(standby: ledger.Ledger, path: str) -> tuple:
    """What a refused message must not change: the state, the chain head, and the journal files; and the journal
    memory past the write position (the private mapping with durability "fsync") must hold zeros only."""
    engine, files = standby.store.engine, standby.store.journal.files
    tail = files.chunks(engine.write_position, min(engine.mapped_end, engine.write_position + 4096))
    assert not any(words.any() for _, words in tail), "records left past the write position"
    return (standby.stats()["journal_position"], standby.store.engine.last_checksum, standby.accounts().tolist(),
            journal_records(path))


BAD_MESSAGES = {
    # name: (what to send, given the messages and the index of the next one to deliver; the refusal's words)
    "duplicate": (lambda messages, index: messages[index - 1], "duplicate"),
    "gap": (lambda messages, index: messages[index + 1], "gap"),
    "flipped bit in an event": (lambda messages, index: flipped(messages[index], RECORD_SIZE + 24), "checksum"),
    "flipped bit in the magic": (lambda messages, index: flipped(messages[index], 1), "no batch header"),
    "flipped bit in the header's time": (lambda messages, index: flipped(messages[index], 9), "checksum"),
    "flipped bit in the header's position": (lambda messages, index: flipped(messages[index], 16, 6), "gap"),
    "forged chain": (lambda messages, index: forged(messages[index], previous_checksum=0x1234), "hash chain"),
    "truncated by a record": (lambda messages, index: messages[index][:-RECORD_SIZE], "truncated"),
    "truncated mid-record": (lambda messages, index: messages[index][:-5], "whole 64-byte records"),
    "empty": (lambda messages, index: b"", "whole 64-byte records"),
    "no commit word": (lambda messages, index: messages[index][:56] + bytes(8) + messages[index][64:], "uncommitted"),
    "garbage": (lambda messages, index: random.Random(1).randbytes(4 * RECORD_SIZE), "no batch header"),
    "two batches, the second damaged": (
        lambda messages, index: messages[index] + flipped(messages[index + 1], RECORD_SIZE + 30, 0), "checksum"),
}


@pytest.mark.parametrize("durability", ["fsync", "os"])
def test_every_refusal_applies_nothing_and_the_standby_takes_the_next_correct_message(tmp_path, durability):
    clock = Clock()
    primary = Primary(str(tmp_path / "primary"), clock)
    ids = workload(primary.handle, clock, seed=23, rounds=60)
    messages = primary.messages
    assert len(messages) > 2 * len(BAD_MESSAGES) + 2
    path = str(tmp_path / "standby")
    standby = open_standby(path, durability)
    deliver(standby, messages[:2])
    index = 2
    for name, (make, words) in BAD_MESSAGES.items():
        standby.flush()
        before = standby_view(standby, path)
        with pytest.raises(ledger.LedgerReplicationError, match=words):
            standby.store.append_replicated(make(messages, index))
        standby.flush()
        assert standby_view(standby, path) == before, f"{name}: the refused message changed the standby"
        deliver(standby, messages[index:index + 2])   # still usable
        index += 2
    deliver(standby, messages[index:])
    assert_same_state(primary.handle, standby, ids)
    check_verified(standby)
    primary.handle.close()
    standby.close()
    assert journal_records(path) == journal_records(str(tmp_path / "primary"))


def test_a_forged_batch_with_a_good_checksum_and_chain_that_replay_refuses_is_undone_whole(tmp_path):
    """Checksum and chain hold, but the second event debits an account that does not exist: the core's replay
    applied the first event, then undoes it; the next correct message is taken."""
    clock = Clock()
    primary = Primary(str(tmp_path / "primary"), clock)
    handle = primary.handle
    handle.create_account(1, min_balance=ledger.BALANCE_MIN)
    handle.create_account(2)
    handle.create_account(3)
    assert not handle.transfers(transfer_rows([(10, 1, 2, 50, 0, 0, 0), (11, 1, 3, 60, 0, 0, 0)])).any()
    handle.transfer(12, 2, 3, 5)
    standby = open_standby(str(tmp_path / "standby"))
    deliver(standby, primary.messages[:3])

    def nowhere(words: np.ndarray) -> None:
        words[2, 1] = 77   # the second event's debit_account: no such account

    bad = forged(primary.messages[3], edit=nowhere)
    before = standby_view(standby, str(tmp_path / "standby"))
    for _ in range(2):   # refused the same way twice: the first refusal left nothing behind
        with pytest.raises(ledger.LedgerReplicationError, match="replay refused.*integrity.*nothing of it"):
            standby.store.append_replicated(bad)
        assert standby_view(standby, str(tmp_path / "standby")) == before
        assert standby.balance(2) == 0 and standby.lookup_transfers([10])["state"][0] == 0

    def nowhere_first(words: np.ndarray) -> None:
        words[1, 1] = 77

    # The same in the second batch of a message: the first batch, whole and good, is kept.
    with pytest.raises(ledger.LedgerReplicationError, match="the 1 batches of the message before it were applied"):
        standby.store.append_replicated(primary.messages[3] + forged(primary.messages[4], edit=nowhere_first))
    assert standby.stats()["journal_position"] == primary.ranges[3][1]
    deliver(standby, primary.messages[4:])
    assert_same_state(handle, standby, [10, 11, 12])
    check_verified(standby)
    handle.close()
    standby.close()


def test_a_following_standby_refuses_commands_and_serves_reads(tmp_path):
    clock = Clock()
    primary = Primary(str(tmp_path / "primary"), clock)
    workload(primary.handle, clock, seed=2, rounds=5)
    standby = open_standby(str(tmp_path / "standby"))
    deliver(standby, primary.messages)
    position = standby.stats()["journal_position"]
    accounts = ledger.accounts_batch(1)
    accounts["id"], accounts["ledger"] = 500, 1
    for command in (lambda: standby.transfer(1, WALLETS[0], WALLETS[1], 1),
                    lambda: standby.transfers(transfer_rows([(2, WALLETS[0], WALLETS[1], 1, 0, 0, 0)])),
                    lambda: standby.create_account(500), lambda: standby.create_accounts(accounts)):
        with pytest.raises(ledger.LedgerError, match="standby following a primary"):
            command()
    assert standby.stats()["journal_position"] == position
    assert standby.balance(WALLETS[0]) == primary.handle.balance(WALLETS[0])   # reads go on
    standby.store.follow(lambda: ledger.LedgerUnavailableError("the primary is node-b"))
    with pytest.raises(ledger.LedgerUnavailableError, match="node-b"):
        standby.transfer(1, WALLETS[0], WALLETS[1], 1)
    primary.handle.close()
    standby.close()
    plain = ledger.open(str(tmp_path / "plain"), create=True)
    with pytest.raises(ledger.LedgerError, match="not following"):
        plain.store.append_replicated(primary.messages[0])
    plain.close()


def test_a_promoted_standby_publishes_from_where_it_took_over_and_a_third_node_follows_it(tmp_path):
    clock = Clock()
    primary = Primary(str(tmp_path / "primary"), clock)
    ids = workload(primary.handle, clock, seed=31, rounds=20)
    promoted = Primary(str(tmp_path / "standby"), Clock(clock.t))
    promoted.handle.store.follow()
    deliver(promoted.handle, primary.messages)
    assert promoted.messages == [], "a standby publishes nothing it is given"
    primary.handle.close()
    promoted.handle.store.stop_following()
    took_over_at = promoted.handle.stats()["journal_position"]
    assert promoted.handle.transfer(5, WALLETS[0], WALLETS[1], 1) == ledger.TransferResult.OK
    assert promoted.ranges[0][0] == took_over_at
    third = open_standby(str(tmp_path / "third"))
    deliver(third, primary.messages + promoted.messages)
    assert_same_state(promoted.handle, third, ids + [5])
    check_verified(promoted.handle, third)
    promoted.handle.close()
    third.close()


@pytest.mark.parametrize("overlap_rows_min", [2, 32769])   # published on the sync thread; on the owner's
def test_a_grouped_primary_publishes_every_batch_once_and_the_standby_converges(tmp_path, overlap_rows_min):
    messages: list[bytes] = []
    ranges: list[tuple[int, int]] = []
    holder: dict[str, Server] = {}

    def publish(start: int, end: int) -> None:
        ranges.append((start, end))
        messages.append(holder["server"].ledger.store.batch_bytes(start, end))

    server = Server(str(tmp_path / "primary"), durability="fsync", slot_count=64, publish=publish,
                    overlap_rows_min=overlap_rows_min, segment_records_log2=SEGMENT_RECORDS_LOG2)
    holder["server"] = server
    standby = open_standby(str(tmp_path / "standby"))
    try:
        server.ledger.create_account(SETTLEMENT, min_balance=ledger.BALANCE_MIN)
        for wallet in WALLETS:
            server.ledger.create_account(wallet)
        ring = producer(server)
        rng = random.Random(overlap_rows_min)
        ids = list(range(100, 100 + 40 * 12))
        codes, statuses = np.zeros(12, np.uint8), np.zeros(12, np.uint8)
        for group in range(40):
            rows = [(ids[group * 12 + k], SETTLEMENT if k % 3 == 0 else rng.choice(WALLETS), rng.choice(WALLETS),
                     rng.randint(1, 50), F.LINKED if k % 4 == 1 else 0, 0, 0) for k in range(12)]
            firsts = [ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_rows(rows[:6]), 500),
                      ring.submit(_ring.SLOT_KIND_TRANSFER, transfer_rows(rows[6:]), 500)]
            assert server.drain_once()
            for first in firsts:
                ring.wait_results(first, 6, codes[:6], statuses[:6], 5000, 5000)
            deliver(standby, messages[standby_taken(standby, ranges):])
        server.settle()
        deliver(standby, messages[standby_taken(standby, ranges):])
        end = server.ledger.stats()["journal_position"]
        assert ranges[0][0] == 1 and ranges[-1][1] == end
        assert all(previous[1] == following[0] for previous, following in zip(ranges, ranges[1:]))
        assert_same_state(server.ledger, standby, ids)
        check_verified(server.ledger, standby)
    finally:
        server.close()
        standby.close()
    assert journal_records(str(tmp_path / "standby")) == journal_records(str(tmp_path / "primary"))


def standby_taken(standby: ledger.Ledger, ranges: list[tuple[int, int]]) -> int:
    """How many of the published batches the standby holds (its write position is the end of the last)."""
    position = standby.stats()["journal_position"]
    return sum(1 for _, end in ranges if end <= position)


def test_a_failed_sync_poisons_the_standby_and_a_reopened_one_follows_on(tmp_path):
    """A batch applied by replay whose sync fails may be ahead of the files: the handle is poisoned (as for a
    command); reopening recovers from the journal, and the reopened standby takes the stream from where its
    journal ends."""
    clock = Clock()
    primary = Primary(str(tmp_path / "primary"), clock)
    ids = workload(primary.handle, clock, seed=17, rounds=30)
    path = str(tmp_path / "standby")
    failing = {"on": False}

    def inject(operation: str) -> None:
        if failing["on"] and operation == "sync":
            raise OSError(5, "Input/output error (injected)")

    standby = open_with_hooks(path, create=True, fault_injector=inject, segment_records_log2=SEGMENT_RECORDS_LOG2)
    standby.store.follow()
    deliver(standby, primary.messages[:10])
    failing["on"] = True
    with pytest.raises(OSError, match="injected"):
        standby.store.append_replicated(primary.messages[10])
    assert standby.store.engine.poisoned
    with pytest.raises(ledger.LedgerPoisonedError):
        standby.store.append_replicated(primary.messages[11])
    standby.close()
    reopened = open_standby(path)
    taken = standby_taken(reopened, primary.ranges)
    assert taken in (10, 11)   # the batch whose sync failed was written: the files may hold it
    deliver(reopened, primary.messages[taken:])
    assert_same_state(primary.handle, reopened, ids)
    check_verified(reopened)
    primary.handle.close()
    reopened.close()
    assert journal_records(path) == journal_records(str(tmp_path / "primary"))


def test_replay_undoes_every_kind_of_event_of_a_batch_it_refuses(tmp_path):
    """Forged batches whose checksum and chain hold but whose last event contradicts the state: an accounts
    batch (a second account with an existing id), an EXPIRE then a transfer, a POST then a transfer. Replay
    applied the events before the bad one; each is undone (the pending transfer stays pending, no account is
    left behind), and the real batch is then taken."""
    clock = Clock()
    primary = Primary(str(tmp_path / "primary"), clock)
    handle = primary.handle
    for id_ in (1, 2, 3):
        handle.create_account(id_, min_balance=ledger.BALANCE_MIN if id_ == 1 else 0)
    handle.transfer(10, 1, 2, 500)
    assert handle.transfer(20, 2, 3, 100, flags=F.PENDING, timeout=1) == 0
    assert handle.transfer(21, 2, 3, 50, flags=F.PENDING) == 0
    accounts = ledger.accounts_batch(2)
    accounts["id"], accounts["ledger"] = [4, 5], 1
    assert not handle.create_accounts(accounts).any()                          # message 6
    clock.advance(2 * 10**9)
    assert handle.transfer(22, 2, 3, 1) == 0                                   # message 7: EXPIRE 20, then 22
    assert not handle.transfers(transfer_rows([(23, 0, 0, 30, F.POST_PENDING, 21, 0),
                                               (24, 2, 3, 1, 0, 0, 0)])).any()  # message 8: POST 21, then 24
    messages = primary.messages
    assert len(messages) == 9
    path = str(tmp_path / "standby")
    standby = open_standby(path)
    deliver(standby, messages[:6])

    def existing_id(words: np.ndarray) -> None:
        words[2, 0] = 2

    def nowhere(words: np.ndarray) -> None:
        words[2, 1] = 77

    for index, edit, check in [
            (6, existing_id, lambda: standby.account(4) is None and standby.stats()["accounts"] == 3),
            (7, nowhere, lambda: standby.lookup_transfers([20])["state"][0] == ledger.TransferState.PENDING),
            (8, nowhere, lambda: standby.lookup_transfers([21, 23])["state"].tolist()
             == [ledger.TransferState.PENDING, 0])]:
        before = standby_view(standby, path)
        balances = [(standby.balance(id_), standby.available(id_)) for id_ in (2, 3)]
        with pytest.raises(ledger.LedgerReplicationError, match="replay refused.*integrity"):
            standby.store.append_replicated(forged(messages[index], edit=edit))
        assert standby_view(standby, path) == before
        assert [(standby.balance(id_), standby.available(id_)) for id_ in (2, 3)] == balances
        assert check()
        deliver(standby, [messages[index]])
    assert_same_state(handle, standby, list(range(10, 25)))
    check_verified(standby)
    scheduled = standby.stats()["pending_expiries_scheduled"]
    handle.close()
    standby.close()
    with ledger.open(path) as replayed:   # the fold of the journal from genesis: no deadline left over by an undo
        assert replayed.stats()["pending_expiries_scheduled"] == scheduled


def test_a_standby_snapshots_reopens_from_its_snapshot_and_follows_on(tmp_path):
    clock = Clock()
    primary = Primary(str(tmp_path / "primary"), clock)
    ids = workload(primary.handle, clock, seed=41, rounds=60, large=1500)
    path = str(tmp_path / "standby")
    standby = open_standby(path)
    half = len(primary.messages) // 2
    deliver(standby, primary.messages[:half])
    info = standby.snapshot()
    assert info.position == primary.ranges[half - 1][1]
    standby.close()
    reopened = open_standby(path)
    assert reopened.recovered_from is not None and reopened.recovered_from.position == info.position
    deliver(reopened, primary.messages[half:])
    assert_same_state(primary.handle, reopened, ids)
    check_verified(reopened)
    primary.handle.close()
    reopened.close()
    assert journal_records(path) == journal_records(str(tmp_path / "primary"))
