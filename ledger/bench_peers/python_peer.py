"""A plain-Python engine: balances in a dict, applied transfers in a dict (the idempotency index), and an
append-only journal of accepted transfers written and fdatasync'ed once per batch (group commit). What a careful
Python programmer would write without a database; the floor any engine must beat."""
from __future__ import annotations

import array
import os
from pathlib import Path

import numpy as np

from ledger.bench_peers.workload import PeerState, Workload

JOURNAL_NAME = "journal.bin"
RECORD_FIELDS = 4  # id, debit account, credit account, amount: int64 each


class PythonPeer:
    group = "python"
    per_commit = False
    commit_unit = "batch"
    durable = True  # fdatasync per batch

    def __init__(self, batch_size: int) -> None:
        assert batch_size >= 1
        self.step_size = batch_size
        self.label = f"Python dict + journal, fdatasync per batch of {batch_size:,}"
        self.journal_fd: int | None = None

    def open(self, workload: Workload, directory: Path) -> None:
        self.workload = workload
        self.balances = dict(zip(workload.all_account_ids().tolist(), workload.opening_balances().tolist()))
        self.applied: dict[int, tuple[int, int, int]] = {}
        self.journal_path = directory / JOURNAL_NAME
        self.journal_fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # The new file's directory entry must be durable too, once.
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)

    def apply(self, start: int, stop: int) -> None:
        balances = self.balances
        applied = self.applied
        records = array.array("q")
        for id, debit, credit, amount in zip(*self.workload.columns(start, stop)):
            if id in applied:  # idempotency: an applied id is never applied twice
                continue
            if balances[debit] < amount:  # overdraft check
                continue
            balances[debit] -= amount
            balances[credit] += amount
            applied[id] = (debit, credit, amount)
            records.extend((id, debit, credit, amount))
        payload = records.tobytes()
        written = os.write(self.journal_fd, payload)
        assert written == len(payload), "short write to the journal"
        os.fdatasync(self.journal_fd)

    def state(self) -> PeerState:
        # Rebuild from the journal, not from the dicts: the record on disk is what must match.
        records = np.fromfile(self.journal_path, np.int64).reshape(-1, RECORD_FIELDS)
        ids = self.workload.all_account_ids()
        balances = self.workload.opening_balances().copy()
        assert np.all(ids[:-1] < ids[1:]), "account ids must be sorted for searchsorted"
        debit_index = np.searchsorted(ids, records[:, 1].astype(np.uint64))
        credit_index = np.searchsorted(ids, records[:, 2].astype(np.uint64))
        np.subtract.at(balances, debit_index, records[:, 3])
        np.add.at(balances, credit_index, records[:, 3])
        in_memory = np.array([self.balances[int(id)] for id in ids], np.int64)
        assert np.array_equal(balances, in_memory), "journal and in-memory balances disagree"
        return PeerState(balances=balances, accepted_ids=np.sort(records[:, 0].astype(np.uint64)))

    def close(self) -> None:
        if self.journal_fd is not None:
            os.close(self.journal_fd)
            self.journal_fd = None
