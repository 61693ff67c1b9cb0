"""Every option of ledger.open has its stated limits (README "Limits"), for on-disk and in-memory ledgers alike:
a value outside them is a ValueError naming the option and the range, a non-integer a TypeError; the bounds
themselves open."""
from __future__ import annotations

import pytest

import ledger

SEGMENT_RECORDS_LOG2_RANGE = (10, 24)
FLUSH_INTERVAL_MS_RANGE = (1, 60_000)
CAPACITY_MAX = 2**36
CAPACITY_OPTIONS = ("accounts_capacity", "transfers_capacity", "journal_records_reserved")


def opened(tmp_path, where, **options):
    path = None if where == "memory" else str(tmp_path / "data")
    return ledger.open(path, create=path is not None, durability="os" if path and "flush_interval_ms" in options
                       else "fsync", **options)


@pytest.mark.parametrize("where", ["memory", "disk"])
@pytest.mark.parametrize("name, value, message", [
    ("segment_records_log2", 9, r"segment_records_log2 must be in \[10, 24\], got 9"),
    ("segment_records_log2", 25, r"segment_records_log2 must be in \[10, 24\], got 25"),
    ("segment_records_log2", -1, r"segment_records_log2 must be in \[10, 24\]"),
    ("flush_interval_ms", 0, r"flush_interval_ms must be in \[1, 60000\], got 0"),
    ("flush_interval_ms", 60_001, r"flush_interval_ms must be in \[1, 60000\], got 60001"),
    *[(name, value, rf"{name} must be in \[0, 2\*\*36\], got {value}")
      for name in CAPACITY_OPTIONS for value in (-1, CAPACITY_MAX + 1)],
])
def test_a_value_outside_the_limits_is_a_clear_error(tmp_path, where, name, value, message):
    with pytest.raises(ValueError, match=message):
        opened(tmp_path, where, **{name: value})
    assert not (tmp_path / "data").exists(), "a refused open must not create the ledger"


@pytest.mark.parametrize("where", ["memory", "disk"])
@pytest.mark.parametrize("name", ["segment_records_log2", "flush_interval_ms", *CAPACITY_OPTIONS])
def test_a_non_integer_is_a_type_error(tmp_path, where, name):
    with pytest.raises(TypeError):
        opened(tmp_path, where, **{name: 12.5})


@pytest.mark.parametrize("where", ["memory", "disk"])
@pytest.mark.parametrize("name, value", [
    ("segment_records_log2", SEGMENT_RECORDS_LOG2_RANGE[0]), ("segment_records_log2", SEGMENT_RECORDS_LOG2_RANGE[1]),
    ("flush_interval_ms", FLUSH_INTERVAL_MS_RANGE[0]), ("flush_interval_ms", FLUSH_INTERVAL_MS_RANGE[1]),
    *[(name, 0) for name in CAPACITY_OPTIONS],
])
def test_the_bounds_open(tmp_path, where, name, value):
    """(2**36 itself is not opened here: it allocates its tables up front, far more than this machine has.)"""
    with opened(tmp_path, where, **{name: value}) as handle:
        assert handle.create_account(1) == ledger.AccountResult.OK
        assert handle.stats()["accounts"] == 1
