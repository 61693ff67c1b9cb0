"""Segment files over a ledger's life: damage to any segment is reported as corruption (and a failed open lets go
of everything it took), and a ledger of thousands of segments runs within small descriptor and mapping limits."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ledger
from ledger.journal import SEGMENT_HEADER_BYTES, segment_name

SMALL_RECORDS_LOG2 = 10          # 1,024 records a segment: many segments from few transfers
TRANSFERS_PER_BATCH = 900        # a batch of these fills most of a small segment
SOURCE, SINK = 1, 2


def _write_segments(directory: str, batches: int) -> None:
    """A ledger of small segments: two accounts and `batches` batches of transfers between them."""
    with ledger.open(directory, create=True, segment_records_log2=SMALL_RECORDS_LOG2) as handle:
        assert handle.create_account(SOURCE, min_balance=-(2**62)) == 0
        assert handle.create_account(SINK) == 0
        for batch_index in range(batches):
            batch = ledger.transfers_batch(TRANSFERS_PER_BATCH)
            first = batch_index * TRANSFERS_PER_BATCH + 1
            batch["id"] = np.arange(first, first + TRANSFERS_PER_BATCH)
            batch["debit_account"] = SOURCE
            batch["credit_account"] = SINK
            batch["amount"] = 1
            assert (handle.transfers(batch) == 0).all()


def _segment(directory: str, index: int) -> str:
    return os.path.join(directory, "journal", segment_name(index))


def _cut_second_segment_short(directory: str) -> str:
    path = _segment(directory, 1)
    os.truncate(path, SEGMENT_HEADER_BYTES + 64 * 100)
    return path


def _flip_header_byte_of_second_segment(directory: str) -> str:
    path = _segment(directory, 1)
    with open(path, "r+b") as file:
        file.seek(20)   # records_log2, under the header checksum
        byte = file.read(1)[0]
        file.seek(20)
        file.write(bytes([byte ^ 1]))
    return path


def _truncate_last_segment_to_nothing(directory: str) -> str:
    names = sorted(name for name in os.listdir(os.path.join(directory, "journal")) if name.endswith(".segment"))
    path = os.path.join(directory, "journal", names[-1])
    os.truncate(path, 0)
    return path


DAMAGE = {
    "second_segment_cut_short": _cut_second_segment_short,
    "flipped_header_byte": _flip_header_byte_of_second_segment,
    "empty_last_segment_truncated_to_zero": _truncate_last_segment_to_nothing,
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("pristine") / "ledger")
    _write_segments(directory, 5)
    assert len([n for n in os.listdir(os.path.join(directory, "journal")) if n.endswith(".segment")]) >= 5
    return directory


def _damaged_copy(pristine: str, tmp_path, damage: str) -> tuple[str, str]:
    import shutil
    directory = str(tmp_path / "ledger")
    shutil.copytree(pristine, directory)
    return directory, DAMAGE[damage](directory)


@pytest.mark.parametrize("readonly", [False, True], ids=["writer", "reader"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_segment_is_corruption_and_the_failed_open_lets_go(pristine, tmp_path, damage, readonly):
    directory, damaged = _damaged_copy(pristine, tmp_path, damage)
    with pytest.raises(ledger.LedgerCorruptError) as raised:
        ledger.open(directory, readonly=readonly)
    assert os.path.basename(damaged) in str(raised.value)
    # Everything the failed open took is let go: the writer lock (another writer may open at once) and every
    # descriptor of the journal's files.
    assert not [target for target in _open_files() if target.startswith(directory)]
    os.remove(damaged)  # the damage repaired by hand (the segment dropped): the directory opens for writing
    if damage == "empty_last_segment_truncated_to_zero":
        with ledger.open(directory) as handle:
            assert handle.verify().ok


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_cli_verify_of_a_damaged_segment_exits_3(pristine, tmp_path, damage):
    directory, damaged = _damaged_copy(pristine, tmp_path, damage)
    completed = subprocess.run([sys.executable, "-m", "ledger", "verify", directory], capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 3, (completed.stdout, completed.stderr)
    assert os.path.basename(damaged) in completed.stderr
    assert "internal error" not in completed.stderr


def test_failed_open_keeps_the_real_error_and_releases_the_lock(pristine, tmp_path):
    """The same process opens the directory for writing right after an open that failed on damage."""
    directory, _ = _damaged_copy(pristine, tmp_path, "second_segment_cut_short")
    for _ in range(2):
        with pytest.raises(ledger.LedgerCorruptError):
            ledger.open(directory)
    os.truncate(_segment(directory, 1), os.path.getsize(_segment(directory, 0)))  # "repaired": zeros
    with pytest.raises(ledger.LedgerCorruptError):   # the zeros before committed batches are still damage
        ledger.open(directory)
    fd = os.open(os.path.join(directory, "LOCK"), os.O_RDWR)
    try:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # nobody holds it
    finally:
        os.close(fd)


def _open_files() -> list[str]:
    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            pass
    return targets
