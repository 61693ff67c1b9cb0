"""The peer interface and the timed loop that drives one peer (one row of the results table).

Only `Peer.apply` is timed: set-up (creating and funding accounts) and the read-back for the cross-check are not.
Each `apply` call is one step of the progress bar and a point where the time limit may stop the run; a peer
that commits per batch makes every step one batch, so a stop never splits a commit."""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ledger.bench_peers.workload import PeerState, Workload, compare, reference_state

# progress(transfers_done, transfers_target) after every step.
Progress = Callable[[int, int], None]


class Peer(Protocol):
    group: str  # "sqlite", "postgres", "redis", "python", "ledger": what --peers selects
    label: str  # one line for the table: engine, commit unit, durability
    step_size: int  # transfers per apply() call: the commit batch, or a run of per-transfer commits
    per_commit: bool  # commits (and syncs) every transfer: runs only a capped prefix, see RunLimits
    # What a row is compared with (like with like): "transfer" when each transfer is its own call or commit,
    # "batch" when a batch is committed (and synced) as one; durable when a commit is synced before apply returns.
    commit_unit: str
    durable: bool

    def open(self, workload: Workload, directory: Path) -> None:
        """Create and fund the accounts (not timed)."""

    def apply(self, start: int, stop: int) -> None:
        """Apply transfers [start, stop) in order, durably as the label says, before returning (timed)."""

    def state(self) -> PeerState:
        """Read balances and accepted transfer ids back from the peer's own store (not timed)."""

    def close(self) -> None:
        """Release files and connections; idempotent."""


@dataclasses.dataclass(frozen=True)
class RunLimits:
    per_commit_transfers: int  # a per-transfer-commit peer runs only this prefix (a sync per transfer is slow)
    time_limit_s: float  # a run stops at the first step boundary after this much timed work

    def __post_init__(self) -> None:
        assert self.per_commit_transfers >= 1 and self.time_limit_s > 0


@dataclasses.dataclass
class RowResult:
    group: str
    label: str
    transfers: int  # how many of the workload's transfers this row applied (a prefix)
    seconds: float  # time spent in apply()
    accepted: int
    rejected: int
    check: str  # "ok", or what differs from ledger
    stopped_by: str | None  # None: ran its whole target; "time limit" when the limit cut it short
    commit_unit: str = "batch"  # the peer's: "transfer" or "batch"
    durable: bool = True

    @property
    def transfers_per_second(self) -> float:
        return self.transfers / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "transfers_per_second": self.transfers_per_second}


def run_peer(peer: Peer, workload: Workload, directory: Path, limits: RunLimits,
             progress: Progress | None = None) -> RowResult:
    """Open the peer, time apply() over the workload (or its capped prefix), read back, cross-check, close."""
    assert peer.step_size >= 1
    target = min(workload.transfer_count, limits.per_commit_transfers) if peer.per_commit else workload.transfer_count
    directory.mkdir(parents=True, exist_ok=False)
    try:
        peer.open(workload, directory)
        # Write back what earlier rows and the set-up left dirty, so no row pays for another's writes.
        os.sync()
        done, seconds, stopped_by = _timed_steps(peer, target, limits.time_limit_s, progress)
        state = peer.state()
    finally:
        peer.close()
    reference = reference_state(workload, done)
    problem = compare(state, reference, workload)
    return RowResult(group=peer.group, label=peer.label, transfers=done, seconds=seconds,
                     accepted=int(state.accepted_ids.size), rejected=done - int(state.accepted_ids.size),
                     check=problem or "ok", stopped_by=stopped_by, commit_unit=peer.commit_unit,
                     durable=peer.durable)


def _timed_steps(peer: Peer, target: int, time_limit_s: float,
                 progress: Progress | None) -> tuple[int, float, str | None]:
    done = 0
    seconds = 0.0
    while done < target:
        stop = min(target, done + peer.step_size)
        began = time.perf_counter()
        peer.apply(done, stop)
        seconds += time.perf_counter() - began
        done = stop
        if progress is not None:
            progress(done, target)
        if seconds > time_limit_s and done < target:
            return done, seconds, "time limit"
    return done, seconds, None
