"""Verification: every balance is a fold over the journal, so rebuild it and compare.

`verify_live(ledger)` replays the journal from genesis into a second, independent engine that reads the same
journal memory (every batch checksum, the hash chain and every per-account back-pointer are re-checked on the
way), then compares the rebuilt state with the live one field by field, and checks conservation and the
balance limits on the result."""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import numpy as np

from ledger import _core
from ledger.progress import Progress

if TYPE_CHECKING:
    from ledger.api import Ledger

__all__ = ["VerifyReport", "verify_live", "check_invariants"]

VERIFY_SLICE = 1 << 22  # journal records replayed between progress updates


@dataclasses.dataclass
class VerifyReport:
    ok: bool
    batches: int
    events: int
    accounts: int
    transfers: int
    seconds: float
    problems: list[str]

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        status = "OK" if self.ok else "FAILED"
        lines = [f"verify {status}: {self.events} events in {self.batches} batches replayed in {self.seconds:.3f} s "
                 f"({self.events_per_second:,.0f} events/s); {self.accounts} accounts, {self.transfers} transfers"]
        lines += [f"  problem: {problem}" for problem in self.problems]
        return "\n".join(lines)


def check_invariants(hot: np.ndarray) -> list[str]:
    """Conservation per ledger and the limits, over hot account records (ACCOUNT_HOT_DTYPE)."""
    problems = []
    for ledger_id in np.unique(hot["ledger"]):
        rows = hot[hot["ledger"] == ledger_id]
        # Python ints: sums of int64 counters may exceed int64.
        balance_sum = sum(int(x) for x in rows["credits_posted"]) - sum(int(x) for x in rows["debits_posted"])
        if balance_sum != 0:
            problems.append(f"ledger {ledger_id}: balances sum to {balance_sum}, not 0 (money not conserved)")
        pending = sum(int(x) for x in rows["debits_pending"]) - sum(int(x) for x in rows["credits_pending"])
        if pending != 0:
            problems.append(f"ledger {ledger_id}: pending debits and credits differ by {pending}")
    available = hot["credits_posted"].astype(object) - hot["debits_posted"] - hot["debits_pending"]
    below = np.flatnonzero(available < hot["min_balance"].astype(object))
    if below.size:
        problems.append(f"{below.size} accounts below min_balance (first at slot {int(below[0])})")
    ceiling = hot["credits_posted"].astype(object) + hot["credits_pending"] - hot["debits_posted"]
    above = np.flatnonzero(ceiling > hot["max_balance"].astype(object))
    if above.size:
        problems.append(f"{above.size} accounts above max_balance (first at slot {int(above[0])})")
    return problems


def verify_live(handle: "Ledger") -> VerifyReport:
    live = handle._engine
    journal = handle._journal
    end = live.write_position
    started = time.perf_counter()
    rebuilt = _core.Engine(journal.segment_records_log2, journal.view,
                           account_capacity=live.account_count, transfer_capacity=live.transfer_count)
    try:
        rebuilt.map_through(end)
        batches = events = 0
        reason, position = 0, rebuilt.write_position
        with Progress(end, "verify", "records") as progress:
            while position < end:
                # In slices, so a long replay shows progress; each slice stops at a batch boundary.
                reason, position, slice_batches, slice_events = rebuilt.replay(min(end, position + VERIFY_SLICE))
                batches += slice_batches
                events += slice_events
                progress.update(position)
                if reason != 0:
                    break  # a failed check: reported below
                if slice_batches == 0:
                    # The next batch is larger than a slice: replay the rest in one go.
                    reason, position, slice_batches, slice_events = rebuilt.replay(end)
                    batches += slice_batches
                    events += slice_events
                    break
        seconds = time.perf_counter() - started
        problems = []
        if position != end:
            problems.append(f"replay stopped at journal position {position} ({_core.REPLAY_REASONS[reason]}); "
                            f"the live state is at {end}")
        live_hot, live_cold = live.account_arrays()
        hot, cold = rebuilt.account_arrays()
        if live_hot.shape != hot.shape:
            problems.append(f"account count differs: live {live_hot.shape[0]}, replayed {hot.shape[0]}")
        else:
            for name in live_hot.dtype.names:
                differ = np.flatnonzero(live_hot[name] != hot[name])
                if differ.size:
                    slot = int(differ[0])
                    problems.append(f"account {int(live_cold['id'][slot])}: {name} is {live_hot[name][slot]} live, "
                                    f"{hot[name][slot]} replayed ({differ.size} accounts differ)")
            for name in live_cold.dtype.names:
                differ = np.flatnonzero(live_cold[name] != cold[name])
                if differ.size:
                    problems.append(f"{differ.size} accounts differ in {name}")
        if rebuilt.transfer_count != live.transfer_count:
            problems.append(f"transfer count differs: live {live.transfer_count}, replayed {rebuilt.transfer_count}")
        if rebuilt.last_checksum != live.last_checksum:
            problems.append("hash chain head differs between live and replayed state")
        problems += check_invariants(hot)
        return VerifyReport(not problems, batches, events, int(hot.shape[0]), int(rebuilt.transfer_count),
                            seconds, problems)
    finally:
        rebuilt.readonly = True
        rebuilt.close()
