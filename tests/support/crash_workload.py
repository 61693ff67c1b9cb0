"""A deterministic workload for crash testing: batch k is a pure function of k, so after a crash the parent can
rebuild exactly what the journal must contain with an in-memory model ledger.

Run as a writer:  python tests/support/crash_workload.py DIR DURABILITY ACK_LOG
It appends "k\\n" to ACK_LOG after batch k's call returned (i.e. was acknowledged), forever, until killed.
With LEDGER_CRASH_POINT=OPERATION:N in its environment it kills itself (SIGKILL) the N-th time the journal is
about to do OPERATION (allocate, write, write-header, sync, synced: the journal's fault-injection points), so a
crash lands exactly between two steps of a commit instead of wherever a timer happens to fall.
With LEDGER_CRASH_SNAPSHOT_EVERY=N it also starts a snapshot (wait=False, keep 2) after every N-th batch, so kills
land while forked children write snapshots, and orphan them."""
from __future__ import annotations

import fcntl
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

import ledger

ACCOUNTS = 40
SETTLEMENT = 1
FIRST_ACCOUNT = 100
SEGMENT_RECORDS_LOG2 = 12  # small segments: crashes also land on segment creation
BATCH_ID_STRIDE = 1 << 20


def accounts() -> np.ndarray:
    rows = ledger.accounts_batch(ACCOUNTS + 1)
    rows["id"][0] = SETTLEMENT
    rows["min_balance"][0] = ledger.BALANCE_MIN
    rows["id"][1:] = np.arange(FIRST_ACCOUNT, FIRST_ACCOUNT + ACCOUNTS)
    return rows


def batch(k: int) -> np.ndarray:
    """Batch k: funding from the settlement account, transfers that sometimes overdraw, and LINKED chains."""
    rng = np.random.default_rng(k)
    count = int(rng.choice([1, 3, 17, 200, 1500]))
    rows = ledger.transfers_batch(count)
    rows["id"] = (k + 1) * BATCH_ID_STRIDE + np.arange(count)
    debit = FIRST_ACCOUNT + rng.integers(0, ACCOUNTS, count)
    credit = FIRST_ACCOUNT + (debit - FIRST_ACCOUNT + rng.integers(1, ACCOUNTS, count)) % ACCOUNTS
    funding = rng.random(count) < 0.2
    debit[funding] = SETTLEMENT
    rows["debit_account"] = debit
    rows["credit_account"] = credit
    rows["amount"] = rng.integers(1, 5_000, count)
    linked = rng.random(count) < 0.3
    linked[-1] = False
    rows["flags"] = np.where(linked, ledger.TransferFlags.LINKED, 0)
    # Row 0 always applies (funding, not linked), so every batch leaves a trace: its first id.
    rows[0]["debit_account"] = SETTLEMENT
    rows[0]["flags"] = 0
    return rows


def first_id(k: int) -> int:
    return (k + 1) * BATCH_ID_STRIDE


def applied_batches(handle: ledger.Ledger) -> int:
    """How many batches (0..m-1) the ledger holds: every batch's first row always applies."""
    k = 0
    while handle.lookup_transfers([first_id(k)])["state"][0] != 0:
        k += 1
    return k


class Model:
    """The in-memory reference: the same batches applied to ledger.open(None), in order, keeping the account
    state after each batch."""

    def __init__(self) -> None:
        self.handle = ledger.open(None)
        assert not self.handle.create_accounts(accounts()).any()
        self.codes: list[np.ndarray] = []
        self.states: list[np.ndarray] = [self.handle.accounts()]

    def codes_of(self, k: int) -> np.ndarray:
        while len(self.codes) <= k:
            self.codes.append(self.handle.transfers(batch(len(self.codes))))
            self.states.append(self.handle.accounts())
        return self.codes[k]

    def state_after(self, k: int) -> np.ndarray:
        """Account counters after batches 0..k-1."""
        if k > 0:
            self.codes_of(k - 1)
        return self.states[k]


CRASH_OPERATIONS = ("allocate", "write", "write-header", "sync", "synced")
HERE = os.path.dirname(os.path.abspath(__file__))
WRITER_TIMEOUT_S = 20.0   # a writer that neither acknowledges nor dies by then is a hang: the test fails


def crash_injector(point: str | None):
    """A fault injector that SIGKILLs this process at the N-th OPERATION (point "OPERATION:N"), or None."""
    if not point:
        return None
    operation, count_text = point.split(":")
    assert operation in CRASH_OPERATIONS, operation
    remaining = [int(count_text)]

    def injector(name: str) -> None:
        if name == operation:
            remaining[0] -= 1
            if remaining[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    return injector


ACCOUNTS_ACKNOWLEDGED = "accounts"   # the ack log's first line, once create_accounts() returned


def _ack_lines(ack_log: str) -> list[str]:
    if not os.path.exists(ack_log):
        return []
    with open(ack_log) as log:
        return log.read().split()


def acknowledged_count(ack_log: str) -> int:
    """How many transfer batches (0..n-1) the writers acknowledged."""
    batches = [line for line in _ack_lines(ack_log) if line != ACCOUNTS_ACKNOWLEDGED]
    return int(batches[-1]) + 1 if batches else 0


def accounts_acknowledged(ack_log: str) -> bool:
    """Whether a writer's create_accounts() returned: before it, a writer killed at its first step (creating
    segment 0, say) leaves a ledger without accounts, which is right, and which the model must not be held to."""
    return ACCOUNTS_ACKNOWLEDGED in _ack_lines(ack_log)


def kill_once(directory: str, durability: str, ack_log: str, rng: random.Random, kill_number: int,
              snapshot_every: int = 0) -> bool:
    """Start a writer and crash it: every third kill at an exact step of a commit (the writer kills itself at a
    random fault-injection point), the others a few milliseconds after it has acknowledged a new batch (so the
    kill lands in the middle of work, not during import). Returns whether a batch was acknowledged first."""
    before = acknowledged_count(ack_log)
    environment = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if snapshot_every:
        environment["LEDGER_CRASH_SNAPSHOT_EVERY"] = str(snapshot_every)
    if kill_number % 3 == 0:
        operations = CRASH_OPERATIONS[1:] if durability == "fsync" else ("allocate", "sync", "synced")
        environment["LEDGER_CRASH_POINT"] = f"{rng.choice(operations)}:{rng.randint(1, 40)}"
    writer_process = subprocess.Popen([sys.executable, os.path.join(HERE, "crash_workload.py"), directory,
                                       durability, ack_log], env=environment)
    deadline = time.monotonic() + WRITER_TIMEOUT_S
    if kill_number % 3 == 0:
        writer_process.wait(WRITER_TIMEOUT_S)   # it kills itself
    else:
        while acknowledged_count(ack_log) <= before and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))
        writer_process.send_signal(signal.SIGKILL)
        writer_process.wait()
    assert writer_process.returncode == -signal.SIGKILL, f"writer ended with {writer_process.returncode}"
    if snapshot_every:
        wait_until_unlocked(directory)
    return acknowledged_count(ack_log) > before


LOCK_RELEASE_TIMEOUT_S = 5.0


def wait_until_unlocked(directory: str) -> None:
    """A writer killed just after it forked a snapshot child leaves its LOCK held (the child shares the flock)
    until the child lets go of it, the child's first step: milliseconds, more on a busy machine."""
    deadline = time.monotonic() + LOCK_RELEASE_TIMEOUT_S
    try:
        fd = os.open(os.path.join(directory, "LOCK"), os.O_RDONLY)
    except FileNotFoundError:  # killed before it took the lock
        return
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "LOCK still held by a snapshot child of the killed writer"
                time.sleep(0.002)
    finally:
        os.close(fd)


def writer(directory: str, durability: str, ack_log: str) -> None:
    handle = ledger.api.open_with_hooks(directory, create=True, durability=durability,
                                        segment_records_log2=SEGMENT_RECORDS_LOG2,
                                        fault_injector=crash_injector(os.environ.get("LEDGER_CRASH_POINT")))
    if handle.account(SETTLEMENT) is None:
        handle.create_accounts(accounts())
    if not accounts_acknowledged(ack_log):
        # Created just now, or by a writer killed after they were durable and before it could log it (a crash
        # point right after their sync): either way this writer's batches build on them, so they count as
        # acknowledged from here on (the check after a crash holds a ledger without them to no batch).
        with open(ack_log, "a") as log:
            log.write(f"{ACCOUNTS_ACKNOWLEDGED}\n")
    k = applied_batches(handle)
    snapshot_every = int(os.environ.get("LEDGER_CRASH_SNAPSHOT_EVERY", "0"))
    job = None
    with open(ack_log, "a", buffering=1) as log:
        while True:
            handle.transfers(batch(k))
            log.write(f"{k}\n")  # written only after the call returned: the batch was acknowledged
            k += 1
            if snapshot_every and k % snapshot_every == 0 and (job is None or job.done()):
                job = handle.snapshot(wait=False, keep=2)


if __name__ == "__main__":
    writer(sys.argv[1], sys.argv[2], sys.argv[3])
