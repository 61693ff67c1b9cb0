"""recovery.drop_batches_from: a step-down primary drops the batches the stream does not hold, on a closed
ledger (docs/FORMAT.md, "Dropping batches"). Each test builds a small journal (segments of 2**10 records, so
batches cross segment files), records the balances after every batch (the model of a prefix of the journal),
drops from a batch boundary, and checks that the ledger reopens there, verifies, and chains new batches on."""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal

import numpy as np
import pytest

import ledger
from ledger import cli, recovery
from ledger.format import DURABLE_STRICT
from ledger.snapshot import list_snapshots

RECORDS_LOG2 = 10
ACCOUNTS = 8


def build(path, *, batches=12, rows=150, durability="fsync", snapshot_after=()):
    """A ledger of one account batch then `batches` transfer batches of `rows` events: returns
    [(header position, end, balances after it)] per batch."""
    handle = ledger.open(path, create=True, durability=durability, segment_records_log2=RECORDS_LOG2)
    made = []
    try:
        accounts = ledger.accounts_batch(ACCOUNTS)
        accounts["id"] = np.arange(1, ACCOUNTS + 1)
        accounts["min_balance"] = -(1 << 60)
        made.append(_commit(handle, lambda: handle.create_accounts(accounts)))
        generator = np.random.default_rng(7)
        for number in range(batches):
            rows_here = int(generator.integers(1, rows + 1))
            transfers = ledger.transfers_batch(rows_here)
            transfers["id"] = np.arange(1, rows_here + 1) + number * 100_000
            transfers["debit_account"] = generator.integers(1, ACCOUNTS + 1, rows_here)
            transfers["credit_account"] = transfers["debit_account"] % ACCOUNTS + 1
            transfers["amount"] = generator.integers(1, 1000, rows_here)
            made.append(_commit(handle, lambda: handle.transfers(transfers)))
            if number in snapshot_after:
                handle.snapshot()
    finally:
        handle.close()
    return made


def _commit(handle, call):
    start = handle.stats()["journal_position"]
    results = call()
    assert not np.asarray(results["result"] if results.dtype.names else results).any()
    return start, handle.stats()["journal_position"], balances(handle)


def balances(handle):
    return [handle.balance(account) for account in range(1, ACCOUNTS + 1)]


def reopen_and_check(path, position, expected_balances):
    """Opens at `position` with `expected_balances`, verifies, and a new batch chains on (verify again)."""
    with ledger.open(path) as handle:
        assert handle.stats()["journal_position"] == position
        assert balances(handle) == expected_balances
        assert handle.verify().ok
        handle.transfer(999_999_999, 1, 2, 5)
    with ledger.open(path, readonly=True) as handle:
        report = handle.verify()
        assert report.ok, report.problems
        assert handle.stats()["journal_position"] > position


def segment_count(path):
    return len([name for name in os.listdir(path / "journal") if name.endswith(".segment")])


def test_drop_the_last_batch(tmp_path, caplog):
    made = build(tmp_path / "l")
    header, end, _ = made[-1]
    with caplog.at_level(logging.WARNING, logger="ledger"):
        assert recovery.drop_batches_from(str(tmp_path / "l"), header) == [(header, end)]
    assert len([r for r in caplog.records if "dropping batch" in r.getMessage()]) == 1
    assert f"[{header}, {end})" in caplog.text
    reopen_and_check(tmp_path / "l", header, made[-2][2])


def test_drop_several_batches_across_segments(tmp_path):
    made = build(tmp_path / "l", batches=30)
    assert made[-1][1] > 2 << RECORDS_LOG2     # three segment files at least
    header = made[5][0]
    dropped = recovery.drop_batches_from(str(tmp_path / "l"), header)
    assert dropped == [(start, end) for start, end, _ in made[5:]]
    assert segment_count(tmp_path / "l") == ((header - 1) >> RECORDS_LOG2) + 1
    reopen_and_check(tmp_path / "l", header, made[4][2])
    assert cli.main(["verify", str(tmp_path / "l")]) == 0   # `ledger verify DIR`


def test_drop_everything(tmp_path):
    made = build(tmp_path / "l")
    assert len(recovery.drop_batches_from(str(tmp_path / "l"), 1)) == len(made)
    assert segment_count(tmp_path / "l") == 1
    with ledger.open(tmp_path / "l") as handle:
        assert handle.stats()["journal_position"] == 1
        assert handle.account(1) is None
        handle.create_account(1)
    with ledger.open(tmp_path / "l", readonly=True) as handle:
        assert handle.verify().ok


def test_position_at_the_end_drops_nothing(tmp_path):
    made = build(tmp_path / "l", batches=3)
    before = {name: (tmp_path / "l" / "journal" / name).read_bytes() for name in os.listdir(tmp_path / "l" / "journal")}
    assert recovery.drop_batches_from(str(tmp_path / "l"), made[-1][1]) == []
    after = {name: (tmp_path / "l" / "journal" / name).read_bytes() for name in os.listdir(tmp_path / "l" / "journal")}
    assert before == after
    reopen_and_check(tmp_path / "l", made[-1][1], made[-1][2])


@pytest.mark.parametrize("offset", [1, 2, -1])
def test_a_position_inside_a_batch_or_past_the_end_is_refused(tmp_path, offset):
    made = build(tmp_path / "l", batches=3, rows=20)
    header, end, _ = made[2] if offset > 0 else made[-1]
    position = header + offset if offset > 0 else end + 1
    with pytest.raises(ValueError, match=f"journal position {position} .*not the header position"):
        recovery.drop_batches_from(str(tmp_path / "l"), position)
    reopen_and_check(tmp_path / "l", made[-1][1], made[-1][2])
    with pytest.raises(ValueError, match="journal position"):
        recovery.drop_batches_from(str(tmp_path / "l"), 0)


def test_a_held_lock_is_refused(tmp_path):
    made = build(tmp_path / "l", batches=2)
    with ledger.open(tmp_path / "l"):
        with pytest.raises(ledger.LedgerLockedError, match="close the ledger"):
            recovery.drop_batches_from(str(tmp_path / "l"), made[-1][0])
    assert recovery.drop_batches_from(str(tmp_path / "l"), made[-1][0]) == [made[-1][:2]]


def test_snapshots_after_the_position_go_and_one_before_stays(tmp_path):
    made = build(tmp_path / "l", batches=10, snapshot_after=(2, 5, 8))
    positions = sorted(position for position, _ in list_snapshots(str(tmp_path / "l")))
    assert positions == [made[3][1], made[6][1], made[9][1]]
    recovery.drop_batches_from(str(tmp_path / "l"), made[6][1])   # the snapshot at exactly the position stays
    assert sorted(position for position, _ in list_snapshots(str(tmp_path / "l"))) == positions[:2]
    recovery.drop_batches_from(str(tmp_path / "l"), made[5][0])
    assert sorted(position for position, _ in list_snapshots(str(tmp_path / "l"))) == positions[:1]
    reopen_and_check(tmp_path / "l", made[5][0], made[4][2])


def test_os_durability_lowers_the_durable_mark(tmp_path):
    made = build(tmp_path / "l", batches=10, durability="os")
    mark = recovery.DurableMark(str(tmp_path / "l" / "journal"))
    assert mark.read() == made[-1][1]
    recovery.drop_batches_from(str(tmp_path / "l"), made[4][0])
    assert mark.read() == made[4][0]
    with ledger.open(tmp_path / "l", durability="os") as handle:
        assert handle.stats()["journal_position"] == made[4][0]
        assert balances(handle) == made[3][2]
    with ledger.open(tmp_path / "l", readonly=True) as handle:
        assert handle.verify().ok
    assert mark.read() != DURABLE_STRICT


# -- a crash during the drop --

def _killed_at(step: int):
    """A fault injector that SIGKILLs the process at its `step`-th call."""
    calls = []

    def inject(name: str) -> None:
        calls.append(name)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGKILL)
    return inject


def _drop_in_child(path: str, position: int, step: int) -> None:
    recovery.drop_fault_injector = _killed_at(step)
    recovery.drop_batches_from(path, position)


def _steps(path, position) -> list[str]:
    names: list[str] = []
    recovery.drop_fault_injector = names.append
    try:
        recovery.drop_batches_from(str(path), position)
    finally:
        recovery.drop_fault_injector = None
    return names


@pytest.mark.filterwarnings("ignore:ledger. recovery zeroed a torn tail")   # what a crashed drop leaves
@pytest.mark.parametrize("durability", ["fsync", "os"])
def test_a_crash_at_every_step_of_a_drop_leaves_a_journal_that_opens_and_a_drop_that_finishes(tmp_path, durability):
    made = build(tmp_path / "original", batches=14, durability=durability, snapshot_after=(3, 9))
    keep = 5                  # made[0] is the account batch: batches made[5:] go, the snapshot after made[10] too
    position = made[keep][0]
    shutil.copytree(tmp_path / "original", tmp_path / "count")
    steps = _steps(tmp_path / "count", position)
    assert {"snapshot", "mark", "commit", "zero", "segment"} <= set(steps)
    context = multiprocessing.get_context("fork")
    ends = {end: state for _, end, state in made}
    for step in range(1, len(steps) + 1):
        crashed = tmp_path / f"crash-{step}"
        shutil.copytree(tmp_path / "original", crashed)
        child = context.Process(target=_drop_in_child, args=(str(crashed), position, step))
        child.start()
        child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL, (step, steps[step - 1], child.exitcode)
        with ledger.open(crashed, durability=durability) as handle:   # opens: a prefix of the batches it had
            reached = handle.stats()["journal_position"]
            assert position <= reached <= made[-1][1] and reached in ends, (step, steps[step - 1], reached)
            assert balances(handle) == ends[reached]
        assert recovery.drop_batches_from(str(crashed), position) == [(s, e) for s, e, _ in made if s >= position
                                                                       and e <= reached]
        reopen_and_check(crashed, position, made[keep - 1][2])
        shutil.rmtree(crashed)


@pytest.mark.filterwarnings("ignore:ledger. recovery zeroed a torn tail")
def test_a_machine_crash_that_wrote_an_earlier_zero_before_a_later_one_still_opens(tmp_path):
    """The disk writes pages back in any order: after a machine crash an earlier dropped batch may be zeroed and
    a later one still committed (a gap). The durable mark, lowered to the position before any zero is written,
    makes that a torn tail; without it (strict) the same files are corruption."""
    made = build(tmp_path / "original", batches=8)
    position = made[3][0]
    assert position < 1 << RECORDS_LOG2    # in segment 0, where the test zeroes its commit word
    shutil.copytree(tmp_path / "original", tmp_path / "count")
    steps = _steps(tmp_path / "count", position)
    gap = tmp_path / "gap"
    shutil.copytree(tmp_path / "original", gap)
    child = multiprocessing.get_context("fork").Process(
        target=_drop_in_child, args=(str(gap), position, steps.index("commit") + 1))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    assert recovery.DurableMark(str(gap / "journal")).read() == position
    path, offset = (gap / "journal" / "00000000.segment"), 4096 + position * 64 + 56
    with open(path, "r+b") as file:      # the first dropped batch's zero reached the disk, no later one did
        file.seek(offset)
        file.write(bytes(8))
    strict = tmp_path / "strict"
    shutil.copytree(gap, strict)
    os.unlink(strict / "journal" / "DURABLE")
    with pytest.raises(ledger.LedgerCorruptError):
        ledger.open(strict)
    with ledger.open(gap) as handle:
        assert handle.stats()["journal_position"] == position
        assert balances(handle) == made[2][2]
    assert recovery.drop_batches_from(str(gap), position) == []
    reopen_and_check(gap, position, made[2][2])
