"""Damaged journal records from before the newest snapshot: opening replays only the journal after the snapshot, so
these records were never checked by the process that reads them. Every read of one (lookups, history, explain,
balance at a past moment, a POST/VOID of an old pending transfer, an expiry, an EXISTS retry) must give
LedgerCorruptError naming the file, byte offset and journal position: never a wrong answer, a crash, or a call
applied in part. `Ledger.scrub()`, `ledger scrub DIR` and `ledger serve`'s background scrub report each damage.

The ledger every test starts from (positions fixed by construction, checked in `built`):
  1 header, 2..4 ACCOUNT 1 (may go negative), 2, 3
  5 header, 6 TRANSFER 100 (1 -> 2, 1000), 7 TRANSFER 101 (1 -> 2, 50)
  8 header, 9 PENDING 200 (1 -> 3, 500, no timeout), 10 PENDING 201 (1 -> 3, 40, timeout 60 s)
  snapshot at 11
  11 header, 12 TRANSFER 300 (1 -> 2, 7)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import ledger
from ledger import cli
from ledger.enums import TransferFlags, TransferResult

SEGMENT_RECORDS_LOG2 = 10
SEGMENT_HEADER_BYTES = 4096
RECORD_BYTES = 64
AMOUNT_OFFSET = 24          # docs/FORMAT.md, "Event record"
WORD_B_OFFSET = 56          # previous credit position:40 | offset in batch:24
HEADER_CHECKSUM_OFFSET = 40
HEADER_COMMIT_OFFSET = 56
COMMIT_MAGIC = 0xC0111117
POSITION_MASK = (1 << 40) - 1

TRANSFER_100, TRANSFER_101, PENDING_200, PENDING_201, TRANSFER_300 = 6, 7, 9, 10, 12
BATCH_A, BATCH_B, BATCH_C = 5, 8, 11
SNAPSHOT_POSITION = 11
END_POSITION = 13
CHILD_TIMEOUT_S = 120
CHILD_MEMORY_BYTES = 2 * 2**30   # a walk that loops allocates until this stops it (it took 12.8 GB)


def segment_path(directory):
    return os.path.join(directory, "journal", "00000000.segment")


def byte_offset(position, field=0):
    return SEGMENT_HEADER_BYTES + position * RECORD_BYTES + field


def flip(directory, position, field, bit):
    with open(segment_path(directory), "r+b") as file:
        file.seek(byte_offset(position, field) + bit // 8)
        value = file.read(1)[0]
        file.seek(byte_offset(position, field) + bit // 8)
        file.write(bytes([value ^ (1 << (bit % 8))]))


def read_word(directory, position, field):
    with open(segment_path(directory), "rb") as file:
        file.seek(byte_offset(position, field))
        return int.from_bytes(file.read(8), "little")


def write_word(directory, position, field, value):
    with open(segment_path(directory), "r+b") as file:
        file.seek(byte_offset(position, field))
        file.write(value.to_bytes(8, "little"))


def reseal(directory, header_position, count):
    """Recompute a batch's checksum and commit word after its bytes were changed on purpose: the batch then
    checks out on its own (only the hash chain to the next batch is broken), so only the walk's own checks can
    catch a bad pointer in it."""
    with open(segment_path(directory), "r+b") as file:
        file.seek(byte_offset(header_position + 1))
        events = file.read(count * RECORD_BYTES)
        file.seek(byte_offset(header_position))
        header = file.read(40)
        crc = ledger._core.crc32c(header, ledger._core.crc32c(events))
        file.seek(byte_offset(header_position, HEADER_CHECKSUM_OFFSET))
        file.write(crc.to_bytes(8, "little"))
        file.seek(byte_offset(header_position, HEADER_COMMIT_OFFSET))
        file.write(((COMMIT_MAGIC << 32) | crc).to_bytes(8, "little"))


def build(directory, clock, after_snapshot=None):
    """The ledger of the module docstring; `after_snapshot(handle)` replaces batch C."""
    with ledger.open(directory, create=True, clock=clock, segment_records_log2=SEGMENT_RECORDS_LOG2) as handle:
        accounts = ledger.accounts_batch(3)
        accounts["id"] = [1, 2, 3]
        accounts["min_balance"][0] = ledger.BALANCE_MIN
        assert not handle.create_accounts(accounts).any()
        batch = ledger.transfers_batch(2)
        batch["id"], batch["debit_account"], batch["credit_account"], batch["amount"] = [100, 101], 1, 2, [1000, 50]
        assert not handle.transfers(batch).any()
        batch["id"], batch["credit_account"], batch["amount"] = [200, 201], 3, [500, 40]
        batch["flags"], batch["timeout"] = TransferFlags.PENDING, [0, 60]
        assert not handle.transfers(batch).any()
        assert handle.snapshot().position == SNAPSHOT_POSITION
        if after_snapshot is None:
            assert handle.transfer(300, 1, 2, 7) == TransferResult.OK
        else:
            after_snapshot(handle)
        positions = handle.lookup_transfers([100, 101, 200, 201])["sequence"].tolist()
    assert positions == [TRANSFER_100, TRANSFER_101, PENDING_200, PENDING_201]
    return directory


@pytest.fixture
def built(tmp_path, clock):
    return build(str(tmp_path / "ledger"), clock)


def open_again(directory, clock, readonly=False):
    return ledger.open(directory, readonly=readonly, clock=clock, segment_records_log2=SEGMENT_RECORDS_LOG2)


def assert_names(error, directory, *positions):
    """The error names the segment file, and the byte offset and journal position of one of `positions` (a read
    reports the record it read: any of a damaged batch's records)."""
    message = str(error.value)
    assert segment_path(directory) in message, message
    assert any(f"byte offset {byte_offset(position)}, journal position {position}:" in message
               for position in positions), message


def unchanged(handle):
    """What a call that was refused must leave as it was."""
    return (handle.stats()["journal_position"], handle.stats()["transfers"],
            [tuple(handle.account(id)) for id in (1, 2, 3)])


@pytest.mark.parametrize("readonly", [False, True], ids=["writer", "readonly"])
def test_a_flipped_amount_before_the_snapshot_fails_every_read(built, clock, readonly):
    flip(built, TRANSFER_100, AMOUNT_OFFSET, 3)
    with open_again(built, clock, readonly) as handle:
        assert handle.recovered_from.position == SNAPSHOT_POSITION
        with pytest.raises(ledger.LedgerCorruptError, match="checksum") as error:
            handle.lookup_transfers([100])
        assert_names(error, built, TRANSFER_100)
        assert f"its batch header is at journal position {BATCH_A}" in str(error.value)
        for read in (lambda: handle.history(2), lambda: handle.explain(2),
                     lambda: handle.balance(2, at=TRANSFER_100 - 1), lambda: handle.lookup_transfers([300, 100])):
            with pytest.raises(ledger.LedgerCorruptError) as error:
                read()
            assert_names(error, built, TRANSFER_100, TRANSFER_101)
        # Reads that never touch the damaged batch still answer, and answer right.
        assert handle.lookup_transfers([300])["amount"].tolist() == [7]
        assert handle.balance(2) == 1057 and handle.balance(2, at=TRANSFER_300) == 1057
        assert handle.lookup_transfers([200])["amount"].tolist() == [500]


def test_an_exists_retry_of_a_damaged_transfer_applies_nothing(built, clock):
    flip(built, TRANSFER_100, AMOUNT_OFFSET, 3)
    with open_again(built, clock) as handle:
        before = unchanged(handle)
        with pytest.raises(ledger.LedgerCorruptError) as error:
            handle.transfer(100, 1, 2, 1000)
        assert_names(error, built, TRANSFER_100)
        batch = ledger.transfers_batch(2)
        batch["id"], batch["debit_account"], batch["credit_account"], batch["amount"] = [400, 100], 1, 2, [5, 1000]
        with pytest.raises(ledger.LedgerCorruptError):
            handle.transfers(batch)
        assert unchanged(handle) == before
        assert handle.lookup_transfers([400])["state"].tolist() == [0], "a row of the refused call was applied"
        assert handle.transfer(401, 1, 2, 5) == TransferResult.OK  # the handle goes on
        report = handle.verify()  # a replay from genesis meets the damage too
        assert not report.ok and "(checksum)" in report.problems[0], report


@pytest.mark.parametrize("flag", [TransferFlags.POST_PENDING, TransferFlags.VOID_PENDING], ids=["post", "void"])
def test_resolving_a_damaged_pending_transfer_applies_nothing(built, clock, flag):
    flip(built, PENDING_200, AMOUNT_OFFSET, 1)  # 500 reads as 502
    with open_again(built, clock) as handle:
        before = unchanged(handle)
        with pytest.raises(ledger.LedgerCorruptError) as error:
            handle.transfer(500, 0, 0, 0, flags=flag, pending_id=200)
        assert_names(error, built, PENDING_200)
        batch = ledger.transfers_batch(3)
        batch["id"], batch["debit_account"], batch["credit_account"], batch["amount"] = [501, 502, 503], 1, 2, 5
        batch["debit_account"][1] = batch["credit_account"][1] = batch["amount"][1] = 0
        batch["flags"][1], batch["pending_id"][1] = flag, 200
        with pytest.raises(ledger.LedgerCorruptError):
            handle.transfers(batch)
        assert unchanged(handle) == before
        assert handle.lookup_transfers([501, 502, 503])["state"].tolist() == [0, 0, 0]
        # The other pending transfer, in the same damaged batch, is refused too (its batch fails its checksum).
        with pytest.raises(ledger.LedgerCorruptError):
            handle.transfer(504, 0, 0, 0, flags=flag, pending_id=201)
        assert unchanged(handle) == before


def test_expiring_a_damaged_pending_transfer_applies_nothing(built, clock):
    flip(built, PENDING_201, AMOUNT_OFFSET, 2)
    clock.advance(120 * 10**9)  # past 201's deadline: the next call would expire it
    with open_again(built, clock) as handle:
        before = unchanged(handle)
        with pytest.raises(ledger.LedgerCorruptError) as error:
            handle.transfer(600, 1, 2, 1)
        assert_names(error, built, PENDING_201)
        assert unchanged(handle) == before
        assert handle.stats()["pending_expiries_scheduled"] == 1, "the deadline must stay scheduled"


def test_replaying_a_post_of_a_damaged_pending_transfer_refuses_to_open(tmp_path, clock):
    directory = build(str(tmp_path / "ledger"), clock, lambda handle: handle.transfer(
        700, 0, 0, 0, flags=TransferFlags.POST_PENDING, pending_id=200))
    flip(directory, PENDING_200, AMOUNT_OFFSET, 4)
    with pytest.raises(ledger.LedgerCorruptError) as error:
        open_again(directory, clock)
    assert_names(error, directory, PENDING_200)


CHILD = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
    import ledger
    from ledger.enums import TransferFlags
    handle = ledger.open(sys.argv[1], readonly=sys.argv[2] == "readonly", segment_records_log2={log2})
    reads = {{
        "lookup": lambda: handle.lookup_transfers([101, 200]),
        "history": lambda: handle.history(2),
        "explain": lambda: handle.explain(2),
        "balance_at": lambda: handle.balance(2, at={at}),
        "post": lambda: handle.transfer(800, 0, 0, 0, flags=TransferFlags.POST_PENDING, pending_id=200),
        "exists": lambda: handle.transfer(101, 1, 2, 50),
    }}
    try:
        print("ANSWER", reads[sys.argv[3]]())
    except ledger.LedgerCorruptError as error:
        print("CORRUPT", error)
""")


def run_child(directory, read, readonly=False):
    """Run one read in a fresh process (a crash there must not take the test run down): its outcome line."""
    script = CHILD.format(memory=CHILD_MEMORY_BYTES, log2=SEGMENT_RECORDS_LOG2, at=BATCH_A)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script, directory, "readonly" if readonly else "writer", read],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=environment)
    assert done.returncode == 0, f"{read}: exit {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout.strip()


@pytest.mark.parametrize("bit", [7 * 8 + 7, 5 * 8 + 1], ids=["offset_past_the_start", "offset_to_a_non_header"])
def test_a_flipped_offset_in_batch_is_an_error_not_a_crash(built, bit):
    flip(built, TRANSFER_101, WORD_B_OFFSET, bit)
    for read, readonly in (("lookup", False), ("history", False), ("exists", False), ("lookup", True),
                           ("history", True)):
        outcome = run_child(built, read, readonly)
        assert outcome.startswith("CORRUPT"), (read, outcome)
        assert f"journal position {TRANSFER_101}:" in outcome and segment_path(built) in outcome, outcome
    flip(built, PENDING_200, WORD_B_OFFSET, bit)
    outcome = run_child(built, "post")  # (the child's real clock is past 201's deadline: its expiry reads first)
    assert outcome.startswith("CORRUPT"), outcome
    assert f"journal position {PENDING_200}:" in outcome or f"journal position {PENDING_201}:" in outcome, outcome


@pytest.mark.parametrize("target", [TRANSFER_101, TRANSFER_300, 0], ids=["cycle", "forward", "to_zero"])
@pytest.mark.parametrize("resealed", [False, True], ids=["flipped", "resealed"])
def test_a_damaged_back_pointer_is_an_error_not_a_runaway_walk(built, target, resealed):
    """101's credit back-pointer (to 100, account 2's event before it) made to point at 101 itself (a cycle),
    forward at 300, or at 0 (the chain would end before the account's creation: a history cut short). Flipped:
    its batch fails its checksum. Resealed (the checksum recomputed, as if written so): the batch checks out, and
    only the walk's rule (strictly backwards, to an event of the account, ending at its creation) catches it."""
    word = read_word(built, TRANSFER_101, WORD_B_OFFSET)
    assert word & POSITION_MASK == TRANSFER_100
    write_word(built, TRANSFER_101, WORD_B_OFFSET, (word & ~POSITION_MASK) | target)
    if resealed:
        reseal(built, BATCH_A, 2)
    for read, readonly in (("history", False), ("explain", False), ("balance_at", False), ("history", True)):
        outcome = run_child(built, read, readonly)
        assert outcome.startswith("CORRUPT"), (read, outcome)
        assert f"journal position {TRANSFER_101}:" in outcome, outcome
        assert ("back-pointer" if resealed else "checksum") in outcome, outcome


def scrub_cli(directory, *options, capsys):
    code = cli.main(["scrub", directory, *options])
    return code, capsys.readouterr()


def test_scrub_reports_each_damaged_batch(built, clock, capsys):
    with open_again(built, clock, readonly=True) as handle:
        clean = handle.scrub()
    assert clean.ok and clean.batches == 4 and clean.end_position == END_POSITION and not clean.damaged
    assert scrub_cli(built, capsys=capsys)[0] == cli.EXIT_OK
    flip(built, TRANSFER_100, AMOUNT_OFFSET, 0)      # batch A: checksum
    flip(built, PENDING_201, WORD_B_OFFSET, 7 * 8 + 7)  # batch B: checksum (the offset word is under it too)
    with open_again(built, clock, readonly=True) as handle:
        report = handle.scrub()
        assert not report.ok
        assert [(damage.position, damage.path, damage.byte_offset) for damage in report.damaged] == [
            (BATCH_A, segment_path(built), byte_offset(BATCH_A)), (BATCH_B, segment_path(built), byte_offset(BATCH_B))]
        assert all("checksum" in damage.reason for damage in report.damaged)
        # Reads of the batches in between still work; the damaged ones are refused.
        assert handle.lookup_transfers([300])["amount"].tolist() == [7]
        with pytest.raises(ledger.LedgerCorruptError):
            handle.lookup_transfers([200])
    code, output = scrub_cli(built, capsys=capsys)
    assert code == cli.EXIT_DATA
    lines = [line for line in output.out.splitlines() if line.startswith("damaged batch")]
    assert len(lines) == 2 and all(segment_path(built) in line for line in lines), output.out
    assert f"byte offset {byte_offset(BATCH_A)}, journal position {BATCH_A}:" in lines[0]
    code, output = scrub_cli(built, "--json", capsys=capsys)
    assert code == cli.EXIT_DATA
    payload = json.loads(output.out)
    assert not payload["ok"] and [damage["position"] for damage in payload["damaged"]] == [BATCH_A, BATCH_B]


def test_scrub_steps_over_a_wrecked_header(built, clock):
    """Batch B's header magic zeroed: its count cannot be trusted, so scrub finds the next good batch itself."""
    write_word(built, BATCH_B, 0, 0)
    with open_again(built, clock, readonly=True) as handle:
        report = handle.scrub()
        assert [damage.position for damage in report.damaged] == [BATCH_B], report
        assert "header" in report.damaged[0].reason and report.end_position == END_POSITION
        with pytest.raises(ledger.LedgerCorruptError, match="header") as error:
            handle.lookup_transfers([200])
        assert_names(error, built, PENDING_200)


def test_scrub_finds_a_broken_chain(built, clock):
    word = read_word(built, TRANSFER_101, WORD_B_OFFSET)
    write_word(built, TRANSFER_101, WORD_B_OFFSET, (word & ~POSITION_MASK) | TRANSFER_101)
    reseal(built, BATCH_A, 2)  # batch A checks out alone; batch B no longer chains to it
    with open_again(built, clock, readonly=True) as handle:
        report = handle.scrub()
    assert [damage.position for damage in report.damaged] == [BATCH_B], report
    assert "chain" in report.damaged[0].reason


def test_scrub_of_damage_after_the_snapshot_reports_the_open_failure(built, capsys):
    flip(built, TRANSFER_300, AMOUNT_OFFSET, 0)
    code, output = scrub_cli(built, capsys=capsys)
    assert code == cli.EXIT_DATA
    assert output.out.startswith("damaged: ") and segment_path(built) in output.out, output


def test_serve_scrubs_in_the_background_and_reports_damage(built, clock):
    from ledger.ring import Server
    flip(built, TRANSFER_100, AMOUNT_OFFSET, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        server = Server(built, snapshot_every_s=None, create=False, segment_records_log2=SEGMENT_RECORDS_LOG2)
        try:
            deadline = time.monotonic() + 30
            while not server.status()["scrub_damaged"] and time.monotonic() < deadline:
                server.scrub.tick()
                time.sleep(0.01)
            status = server.status()
        finally:
            server.close()
    assert len(status["scrub_damaged"]) == 1, status
    assert f"journal position {BATCH_A}:" in status["scrub_damaged"][0]
    assert segment_path(built) in status["scrub_damaged"][0]
    assert any("scrub found" in str(warning.message) for warning in caught)
    assert status["scrub_bytes_per_second"] == ledger.scrub.SCRUB_BYTES_PER_SECOND


def test_only_records_before_the_snapshot_are_checked_on_read(built, clock):
    with open_again(built, clock) as handle:
        assert handle._engine.verified_from == SNAPSHOT_POSITION
        assert handle.lookup_transfers([100, 300])["amount"].tolist() == [1000, 7]
        assert handle.scrub().ok
    with ledger.open(None) as memory:
        assert memory._engine.verified_from == 0  # from genesis: replay or this process checked everything


def test_serve_answers_a_batch_that_meets_damage_as_not_applied_and_goes_on(built, clock):
    import threading
    from ledger.ring import Server
    flip(built, PENDING_200, AMOUNT_OFFSET, 1)
    server = Server(built, snapshot_every_s=None, create=False, clock=clock, segment_records_log2=SEGMENT_RECORDS_LOG2)
    thread = threading.Thread(target=server.serve_forever)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        thread.start()
        try:
            with ledger.connect(built) as client:
                with pytest.raises(ledger.LedgerCorruptError, match="nothing of it was applied"):
                    client.transfer(900, 0, 0, 0, flags=TransferFlags.POST_PENDING, pending_id=200)
                assert client.transfer(901, 1, 2, 3) == TransferResult.OK
                assert client.balance(3) == 0 and client.balance(2) == 1060
        finally:
            server.stop()
            thread.join(timeout=60)
    assert not thread.is_alive()
    messages = [str(warning.message) for warning in caught]
    assert any("was not applied" in message and f"journal position {PENDING_200}:" in message
               for message in messages), messages


def _large_batch_posting_200_at(count: int, index: int) -> np.ndarray:
    """`count` one-unit transfers from 1 to 2 (ids 10,000..), the row at `index` a POST_PENDING of transfer 200."""
    batch = ledger.transfers_batch(count)
    batch["id"] = np.arange(10_000, 10_000 + count)
    batch["debit_account"], batch["credit_account"], batch["amount"] = 1, 2, 1
    batch["debit_account"][index] = batch["credit_account"][index] = batch["amount"][index] = 0
    batch["flags"][index], batch["pending_id"][index] = TransferFlags.POST_PENDING, 200
    return batch


def test_a_large_batch_written_ahead_that_meets_damage_poisons_and_keeps_nothing(built, clock):
    """A batch large enough to be written to the files in chunks while it is applied (16,384 rows or more): the
    damaged record is met in its last chunk, after earlier chunks reached the files. Nothing is applied; the
    handle is poisoned (the journal holds events of a batch that will never be committed); reopening drops them."""
    flip(built, PENDING_200, AMOUNT_OFFSET, 1)
    count = 20_000
    with open_again(built, clock) as handle:
        before = unchanged(handle)
        batch = _large_batch_posting_200_at(count, -1)
        with pytest.raises(ledger.LedgerCorruptError):
            handle.transfers(batch)
        with pytest.raises(ledger.LedgerPoisonedError):
            handle.transfer(1, 1, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the torn tail of the undone batch
        with open_again(built, clock) as handle:
            assert unchanged(handle) == before
            assert (handle.lookup_transfers(batch["id"][:-1])["state"] == 0).all()
            assert handle.transfer(10_000, 1, 2, 1) == TransferResult.OK


def test_a_large_batch_that_meets_damage_before_writing_ahead_applies_nothing(built, clock):
    flip(built, PENDING_200, AMOUNT_OFFSET, 1)
    count = 20_000
    with open_again(built, clock) as handle:
        before = unchanged(handle)
        batch = _large_batch_posting_200_at(count, 5)
        with pytest.raises(ledger.LedgerCorruptError):
            handle.transfers(batch)
        assert unchanged(handle) == before
        assert handle.transfer(10_000, 1, 2, 1) == TransferResult.OK


def test_scrub_runs_beside_a_live_writer(built, clock, capsys):
    with open_again(built, clock) as writer:
        assert writer.transfer(1000, 1, 2, 1) == TransferResult.OK
        code, output = scrub_cli(built, "--json", capsys=capsys)
        assert code == cli.EXIT_OK, output
        assert json.loads(output.out)["end_position"] == END_POSITION + 2
        assert writer.scrub().ok
