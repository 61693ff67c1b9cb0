"""Every committed on-disk format fixture (snapshots/v*/) must still open, verify and give its expected balances."""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

import ledger

ROOT = os.path.join(os.path.dirname(__file__), "..", "snapshots")
FIXTURES = sorted(glob.glob(os.path.join(ROOT, "v*")))


def test_there_is_a_fixture_for_the_current_format():
    from ledger import _core
    assert os.path.isdir(os.path.join(ROOT, f"v{_core.FORMAT_VERSION}"))


@pytest.mark.parametrize("fixture", FIXTURES, ids=[os.path.basename(path) for path in FIXTURES])
def test_fixture_opens_verifies_and_matches(fixture, tmp_path):
    with open(os.path.join(fixture, "expected.json")) as file:
        expected = json.load(file)
    directory = str(tmp_path / "data")
    shutil.copytree(fixture, directory)  # opening for writing must not touch the committed copy
    with ledger.open(directory) as handle:
        assert handle.recovered_from is not None, "the fixture's snapshot must load"
        assert handle.stats()["journal_position"] == expected["journal_position"]
        report = handle.verify()
        assert report.ok, report
        for account_id, fields in expected["accounts"].items():
            account = handle.account(int(account_id))
            assert account is not None
            for name, value in fields.items():
                assert getattr(account, name) == value, (account_id, name)
        states = handle.lookup_transfers([int(key) for key in expected["transfers"]])["state"]
        assert states.tolist() == list(expected["transfers"].values())
        # It keeps working after the upgrade: a new transfer applies and survives a reopen.
        assert handle.transfer(99_999_999, 1, 100, 1) == ledger.TransferResult.OK
    with ledger.open(directory, readonly=True) as handle:
        assert handle.verify().ok
        assert handle.lookup_transfers([99_999_999])["state"][0] == ledger.TransferState.POSTED
