"""Moments (ledger/moments.py): the `At` type, what `since`, `until` and `at` accept, and the command line's forms
of a moment (`At.parse`): every valid form reads as the moment it names, and every invalid one is an error that
names the value as it was written."""
from __future__ import annotations

import datetime

import numpy as np
import pytest

import ledger
from ledger.format import POSITION_LIMIT
from ledger.moments import At, as_at, format_ns


def test_moments():
    with pytest.raises(ValueError, match="exactly one"):
        At()
    with pytest.raises(ValueError, match="exactly one"):
        At(ns=1, position=2)
    assert At.parse("123") == At(position=123)
    assert At.parse(str(2**40 - 1)) == At(position=2**40 - 1)
    # A timestamp copied without its unit is not taken for a position (there is none that large): the error says
    # how to write it.
    with pytest.raises(ValueError, match="1700000000000000005ns"):
        At.parse("1700000000000000005")
    with pytest.raises(ValueError, match="larger than any journal position"):
        At.parse(str(2**40))
    assert At.parse("1700000000000000005ns") == At(ns=1_700_000_000_000_000_005)
    assert At.parse("2023-11-14T22:13:20.000000005Z") == At(ns=1_700_000_000_000_000_005)
    assert At.parse("2023-11-14T22:13:20,5") == At(ns=1_700_000_000_500_000_000)  # no offset: UTC
    assert At.parse("2023-11-15T00:13:20+02:00") == At(ns=1_700_000_000 * 10**9)
    assert At.parse("2023-11-14") == At(ns=1_699_920_000 * 10**9)
    with pytest.raises(ValueError, match="ISO-8601"):
        At.parse("yesterday")
    with pytest.raises(ValueError, match="9 fractional"):
        At.parse("2023-11-14T22:13:20.0000000001Z")
    naive = datetime.datetime(2023, 11, 14, 22, 13, 20, 7)
    assert At.from_datetime(naive) == At.from_datetime(naive.replace(tzinfo=datetime.timezone.utc)) == \
        At(ns=1_700_000_000_000_007_000)
    assert format_ns(1_700_000_000_000_000_005) == "2023-11-14T22:13:20.000000005Z"
    assert At.parse(format_ns(1_234_567_890_123_456_789)) == At(ns=1_234_567_890_123_456_789)



@pytest.mark.parametrize("text, moment", [
    ("0", At(position=0)),
    (" 42 ", At(position=42)),  # the spaces a shell or a copy leaves around it
    (str(POSITION_LIMIT - 1), At(position=POSITION_LIMIT - 1)),
    ("0ns", At(ns=0)),
    ("2023-11-14T22:13:20Z", At(ns=1_700_000_000 * 10**9)),
    ("2023-11-14t22:13:20z", At(ns=1_700_000_000 * 10**9)),
    ("2023-11-14 22:13:20", At(ns=1_700_000_000 * 10**9)),  # a space for the T; no offset: UTC
    ("2023-11-14T22:13:20.123456789+00:00", At(ns=1_700_000_000_123_456_789)),
    ("2023-11-14T17:13:20.5-05:00", At(ns=1_700_000_000_500_000_000)),
])
def test_valid_forms(text, moment):
    assert At.parse(text) == moment


@pytest.mark.parametrize("text", ["", "-5", "ns", "12 ns", "12.5", "1e9", "0x10", "yesterday", "2023-13-01Z",
                                  "2023-11-14T25:00:00.5Z", "2023-11-14T22:13:20.123+99:00", "２０２３"])
def test_an_invalid_form_is_an_error_naming_it(text):
    # The value as written, not a rewritten form of it (the fraction cut off, Z turned into +00:00).
    with pytest.raises(ValueError, match="neither a journal position nor an ISO-8601 time") as error:
        At.parse(text)
    assert repr(text) in str(error.value)


@pytest.mark.parametrize("text, message", [
    (str(POSITION_LIMIT), f"{POSITION_LIMIT} is larger than any journal position"),
    ("2023-11-14T22:13:20.0000000001Z", "time '2023-11-14T22:13:20.0000000001Z' has more than 9 fractional"),
])
def test_out_of_range_forms_name_the_value(text, message):
    with pytest.raises(ValueError, match=message):
        At.parse(text)


def test_as_at_accepts_positions_datetimes_and_moments():
    assert as_at(7) == as_at(np.int64(7)) == as_at(At(position=7)) == At(position=7)
    assert as_at(datetime.datetime(2023, 11, 14, 22, 13, 20)) == At(ns=1_700_000_000 * 10**9)
    assert hash(At(position=np.uint64(7))) == hash(At(position=7))  # numpy integers normalised
    assert ledger.At is At  # the package's export is this one


@pytest.mark.parametrize("value, error, message", [
    (-1, ValueError, "a journal position must be >= 0, got -1"),
    (True, TypeError, "not bool True"),
    (1.5, TypeError, "not float 1.5"),
    ("12", TypeError, "not str '12'"),  # a str is At.parse's to read, not a moment
    (b"12", TypeError, "not bytes b'12'"),
])
def test_as_at_refuses_other_values_naming_them(value, error, message):
    with pytest.raises(error, match=message):
        as_at(value)


def test_at_refuses_bools_and_negative_positions():
    with pytest.raises(TypeError, match="not bool"):
        At(ns=True)
    with pytest.raises(TypeError, match="not bool"):
        At(position=True)
    with pytest.raises(ValueError, match="got -1"):
        At(position=-1)


def test_str_and_format_ns():
    assert str(At(position=12)) == "journal position 12"
    assert str(At(ns=5)) == "1970-01-01T00:00:00.000000005Z"
    assert format_ns(0) == "1970-01-01T00:00:00.000000000Z"
