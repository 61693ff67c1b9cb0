"""The core's numbers against the names the Python side gives them.

The core writes result codes, replay stop reasons, damage reasons and event kinds as bare numbers (Cython DEF
constants); ledger.enums, ledger.format, ledger.history and ledger.project name them. A number
changed on one side only would mislabel every outcome without any other test noticing, so each table is compared
here whole: every member, every value, both directions."""
from __future__ import annotations

import enum
import importlib

import pytest

from ledger import _core, enums

# By module path: the package exports functions named like some of these modules (ledger.tail is a function).
format, history, project = (importlib.import_module(f"ledger.{name}") for name in ("format", "history", "project"))

REPLAY_REASON_NAMES = {"end", "torn", "checksum", "chain", "header", "integrity", "damaged"}


def members(result_enum: type[enum.IntEnum]) -> dict[str, int]:
    return {member.name: member.value for member in result_enum}


@pytest.mark.parametrize(
    ("core_codes", "result_enum"),
    [(_core.TRANSFER_RESULT_CODES, enums.TransferResult), (_core.ACCOUNT_RESULT_CODES, enums.AccountResult)],
    ids=["transfer", "account"],
)
def test_result_codes_match_the_enums(core_codes: dict[str, int], result_enum: type[enum.IntEnum]) -> None:
    named = members(result_enum)
    assert set(core_codes) == set(named), "a result name on one side only"
    for name, code in core_codes.items():
        assert result_enum[name] == code, f"{result_enum.__name__}.{name}"
        assert result_enum(code).name == name, f"code {code}"
    # Both directions: no two names share a code, and the codes are 0 .. n - 1 (the core's tuple of members by code
    # relies on it), OK being 0 so that `results.any()` says whether any row failed.
    assert sorted(core_codes.values()) == list(range(len(core_codes)))
    assert core_codes["OK"] == 0


def test_event_kinds_match_history_and_the_format() -> None:
    assert _core.EVENT_KINDS == {kind.value: kind.name.lower() for kind in history.EventKind}
    assert _core.EVENT_KINDS == format.EVENT_KIND_NAMES
    by_name = {name: kind for kind, name in _core.EVENT_KINDS.items()}
    assert len(by_name) == len(_core.EVENT_KINDS)
    for name, kind in by_name.items():
        assert getattr(format, f"KIND_{name.upper()}") == kind, f"format.KIND_{name.upper()}"
    assert format.KIND_EXPIRE == max(_core.EVENT_KINDS)   # the readers check kinds as a range
    assert sorted(_core.EVENT_KINDS) == list(range(1, len(_core.EVENT_KINDS) + 1))
    assert list(project.KIND_NAMES[1:]) == [format.EVENT_KIND_NAMES[kind] for kind in sorted(by_name.values())]


def test_replay_reasons_match_the_format() -> None:
    assert set(_core.REPLAY_REASONS.values()) == REPLAY_REASON_NAMES
    by_name = {name: code for code, name in _core.REPLAY_REASONS.items()}
    assert len(by_name) == len(_core.REPLAY_REASONS), "two reasons share a code"
    assert _core.REPLAY_REASONS == format.REPLAY_REASONS
    for name, code in by_name.items():
        assert getattr(format, f"REPLAY_{name.upper()}") == code, f"format.REPLAY_{name.upper()}"
    assert format.REPLAY_END == 0


def test_damage_reasons_are_distinct_and_numbered_from_one() -> None:
    # 0 means "no damage" in the core; scrub and the damaged-read errors report the text of the others.
    assert sorted(_core.DAMAGE_REASONS) == list(range(1, len(_core.DAMAGE_REASONS) + 1))
    texts = list(_core.DAMAGE_REASONS.values())
    assert len(set(texts)) == len(texts)
    assert all(isinstance(text, str) and text for text in texts)
