"""Verification: every balance is a fold over the journal, so rebuild it and compare.

`verify_live(ledger)` replays the journal from genesis into a second, independent engine that reads the same
journal memory (every batch checksum, the hash chain and every per-account back-pointer are re-checked on the
way). Whenever the replay reaches the position of a snapshot file in `<dir>/snapshots/`, that snapshot is read
(its header checksum, body checksum and state hash re-checked) and compared with the replayed state there. At the
end the rebuilt state is compared with the live one, and conservation and the balance limits are checked.

Two states are compared piece by piece: the account arrays field by field, the scalars (journal position, time,
hash chain head, counts), both id tables as sets of (id, value) entries (two tables of different capacities hold
the same entries in different slots: each side's entries are looked up in the other table, see
`_table_differences`) and the pending expiries (see `_pending_expiries`).

Time is checked too (`_time_problems`): every batch's timestamps come after the previous batch's and stay at or
below TIMESTAMP_MAX (the clock rule of docs/SEMANTICS.md), and every pending deadline is its event's timestamp
plus its timeout, not a sum that wrapped past 2**64."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from ledger import _core
from ledger.enums import TIMESTAMP_MAX, TransferState
from ledger.errors import LedgerCorruptError
from ledger.format import POSITION_BITS, POSITION_MASK, REPLAY_END  # a transfer table value: position | state << 40
from ledger.progress import Progress
from ledger.snapshot import SCALARS, journal_base, list_snapshots, load_into, read_snapshot, snapshot_path

if TYPE_CHECKING:
    from ledger.store import Store

__all__ = ["VerifyReport", "verify_live", "check_invariants", "state_differences"]

VERIFY_SLICE = 1 << 22  # journal records replayed between progress updates
TABLE_CHUNK_SLOTS = 1 << 20  # id table slots compared per step: bounds verify's temporary memory (~50 MB)
TABLE_LOAD_MAX = 0.7   # an id table holds at most 70% keys (docs/FORMAT.md): every probe walk meets an empty slot
TABLE_SLOTS_MIN = 1 << 10
SNAPSHOTS_CHECKED_MAX = 1000  # Ledger.snapshot keeps at most 1000; more files than that is not ours


@dataclasses.dataclass
class VerifyReport:
    """What Ledger.verify() found: ok is True when `problems` (one sentence each, first divergence first) is
    empty; the batches and events replayed, the accounts and transfers rebuilt, the snapshot files checked."""

    ok: bool
    batches: int
    events: int
    accounts: int
    transfers: int
    seconds: float
    problems: list[str]
    snapshots: int = 0  # snapshot files checked against the replay at their position

    @property
    def events_per_second(self) -> float:
        """Replay speed of this verify."""
        return self.events / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        status = "OK" if self.ok else "FAILED"
        lines = [f"verify {status}: {self.events} events in {self.batches} batches replayed and checked in "
                 f"{self.seconds:.3f} s ({self.events_per_second:,.0f} events/s); {self.accounts} accounts, "
                 f"{self.transfers} transfers; {self.snapshots} snapshots checked"]
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


# ---- Comparing two states -------------------------------------------------------------------------------------

def _pending_positions(transfer_slots: np.ndarray) -> np.ndarray:
    """The event positions of the transfers still pending in an id table, a chunk of slots at a time."""
    found = []
    for start in range(0, transfer_slots.shape[0], TABLE_CHUNK_SLOTS):
        values = transfer_slots["value"][start:start + TABLE_CHUNK_SLOTS]
        found.append(values[(values >> np.uint64(POSITION_BITS)) == int(TransferState.PENDING)] & POSITION_MASK)
    return np.concatenate(found) if found else np.empty(0, np.uint64)


def _pending_expiries(heap: np.ndarray, transfer_slots: np.ndarray) -> np.ndarray:
    """The expiry heap entries that still matter, sorted: those whose event is a transfer still pending.

    The heap deletes lazily: the entry of a transfer posted, voided or expired stays until a live batch reaches
    its deadline and pops it, and replay never pops (the EXPIRE events are in the journal). So a live heap and a
    replayed one differ in such stale entries, harmlessly; the entries of transfers still pending must agree."""
    kept = heap[np.isin(heap["position"], _pending_positions(transfer_slots))]
    return kept[np.lexsort((kept["position"], kept["deadline"]))]


def _table_problem(what: str, label: str, slots: np.ndarray, count: int) -> str | None:
    """Why `slots` cannot be searched as an id table, if it cannot (a snapshot's section is only checksummed)."""
    size = slots.shape[0]
    if size < TABLE_SLOTS_MIN or size & (size - 1):
        return f"{what}: {size} slots in {label}, not a power of two of at least {TABLE_SLOTS_MIN}"
    if count > size * TABLE_LOAD_MAX:
        return f"{what}: {count} entries in {size} slots in {label}, more than {TABLE_LOAD_MAX:.0%} full"
    return None


def _entries_missing(slots: np.ndarray, other: np.ndarray) -> tuple[int, tuple[np.void, bool, int] | None]:
    """How many entries of `slots` the table `other` lacks or holds with another value, and the first of them
    (the entry, whether `other` has its id, and the value it has), a chunk of slots at a time."""
    differ = 0
    first = None
    for start in range(0, slots.shape[0], TABLE_CHUNK_SLOTS):
        chunk = slots[start:start + TABLE_CHUNK_SLOTS]
        entries = chunk[chunk["key"] != 0]
        values = np.empty(entries.shape[0], np.uint64)
        found = np.empty(entries.shape[0], np.uint8)
        _core.table_values_in(other, np.ascontiguousarray(entries["key"]), values, found)
        wrong = np.flatnonzero((found == 0) | (values != entries["value"]))
        if wrong.size and first is None:
            index = int(wrong[0])
            first = (entries[index], bool(found[index]), int(values[index]))
        differ += wrong.size
    return differ, first


def _table_differences(what: str, labels: tuple[str, str], slots: tuple[np.ndarray, np.ndarray],
                       describe: Callable[[np.void], str]) -> list[str]:
    """Two id tables as sets of (id, value) entries (two tables of different capacities hold the same entries in
    different slots): each side's entries are looked up in the other table, so a table that repeats an id, or
    holds one where its probe walk does not reach it, differs too. No sorted copies of either table (for 100M
    transfers those took about 6 GB at the peak)."""
    counts = [_core.count_table_keys(side) for side in slots]
    problems = [problem for label, side, count in zip(labels, slots, counts)
                if (problem := _table_problem(what, label, side, count)) is not None]
    if problems:
        return problems
    if counts[0] != counts[1]:
        return [f"{what}: {counts[0]} entries in {labels[0]}, {counts[1]} in {labels[1]}"]
    differ, first = _entries_missing(slots[0], slots[1])
    lacking, first_lacking = _entries_missing(slots[1], slots[0])
    if first is not None:
        entry, present, value = first
        theirs = describe(np.array([(int(entry["key"]), value)], slots[0].dtype)[0]) if present \
            else f"no entry for id {int(entry['key'])}"
        return [f"{what}: {differ} entries differ, first {describe(entry)} in {labels[0]}, {theirs} in {labels[1]}"]
    if first_lacking is not None:
        entry = first_lacking[0]
        return [f"{what}: {lacking} entries differ, first no entry for id {int(entry['key'])} in {labels[0]}, "
                f"{describe(entry)} in {labels[1]}"]
    return []


def _describe_transfer(entry: np.void) -> str:
    state = int(entry["value"]) >> POSITION_BITS
    name = TransferState(state).name if state in TransferState._value2member_map_ else f"unknown state {state}"
    return f"transfer {int(entry['key'])} at position {int(entry['value']) & POSITION_MASK} {name}"


def _describe_account(entry: np.void) -> str:
    return f"account {int(entry['key'])} in slot {int(entry['value'])}"


def _describe_expiry(entry: np.void) -> str:
    return f"deadline {int(entry['deadline'])} ns of position {int(entry['position'])}"


def _first_difference(what: str, labels: tuple[str, str], expected: np.ndarray, actual: np.ndarray,
                      describe: Callable[[np.void], str]) -> list[str]:
    """One sentence about the first entry (in sorted order) where two sorted entry arrays differ, if any."""
    if expected.shape != actual.shape:
        return [f"{what}: {expected.shape[0]} entries in {labels[0]}, {actual.shape[0]} in {labels[1]}"]
    differ = np.flatnonzero(expected != actual)
    if differ.size == 0:
        return []
    index = int(differ[0])
    return [f"{what}: {differ.size} entries differ, first {describe(expected[index])} in {labels[0]}, "
            f"{describe(actual[index])} in {labels[1]}"]


def _account_differences(labels: tuple[str, str], expected: dict[str, np.ndarray],
                         actual: dict[str, np.ndarray]) -> list[str]:
    hot, cold = expected["accounts_hot"], expected["accounts_cold"]
    if hot.shape != actual["accounts_hot"].shape:
        return [f"account count differs: {hot.shape[0]} in {labels[0]}, {actual['accounts_hot'].shape[0]} "
                f"in {labels[1]}"]
    problems = []
    for name in hot.dtype.names:
        differ = np.flatnonzero(hot[name] != actual["accounts_hot"][name])
        if differ.size:
            slot = int(differ[0])
            problems.append(f"account {int(cold['id'][slot])}: {name} is {hot[name][slot]} in {labels[0]}, "
                            f"{actual['accounts_hot'][name][slot]} in {labels[1]} ({differ.size} accounts differ)")
    for name in cold.dtype.names:
        differ = np.flatnonzero(cold[name] != actual["accounts_cold"][name])
        if differ.size:
            problems.append(f"{differ.size} accounts differ in {name} between {labels[0]} and {labels[1]}")
    return problems


def state_differences(labels: tuple[str, str], expected: tuple[dict[str, int], dict[str, np.ndarray]],
                      actual: tuple[dict[str, int], dict[str, np.ndarray]]) -> list[str]:
    """Every difference between two states, each given as (scalars, arrays) in the shape of
    Engine.state_views(): one sentence each, naming the two sides by `labels`. Empty: the same state."""
    (expected_scalars, expected_arrays), (actual_scalars, actual_arrays) = expected, actual
    problems = [f"{name} is {expected_scalars[name]} in {labels[0]}, {actual_scalars[name]} in {labels[1]}"
                for name in SCALARS if expected_scalars[name] != actual_scalars[name]]
    problems += _account_differences(labels, expected_arrays, actual_arrays)
    for name, what, describe in (("account_slots", "account id table", _describe_account),
                                 ("transfer_slots", "transfer id table", _describe_transfer)):
        problems += _table_differences(what, labels, (expected_arrays[name], actual_arrays[name]), describe)
    expiries = [_pending_expiries(arrays["expiry_heap"], arrays["transfer_slots"])
                for arrays in (expected_arrays, actual_arrays)]
    problems += _first_difference("pending expiries", labels, *expiries, _describe_expiry)
    return problems


def _time_problems(rebuilt: _core.Engine) -> list[str]:
    """The clock rule, over a replayed engine: the first batch whose timestamps do not strictly increase or pass
    TIMESTAMP_MAX (replay notes it, one compare per batch), and pending deadlines that wrapped (a deadline before
    its own event's timestamp: the uint64 sum timestamp + timeout * 10**9 overflowed)."""
    problems = []
    if rebuilt.timestamp_problem is not None:
        position, timestamp, count, previous = rebuilt.timestamp_problem
        problems.append(f"batch at journal position {position}: timestamps {timestamp} .. {timestamp + count - 1} ns "
                        f"do not strictly increase from the previous event's {previous} ns within "
                        f"TIMESTAMP_MAX={TIMESTAMP_MAX}")
    _, arrays = rebuilt.state_views()
    pending = _pending_expiries(arrays["expiry_heap"], arrays["transfer_slots"])
    if pending.size:
        events = rebuilt.decode_events(np.ascontiguousarray(pending["position"], dtype=np.uint64))
        wrapped = np.flatnonzero(pending["deadline"] < events["timestamp"])
        if wrapped.size:
            first = int(wrapped[0])
            problems.append(f"{wrapped.size} pending deadlines wrapped past 2**64 ns, first transfer "
                            f"{int(events['id'][first])} at position {int(pending['position'][first])}: timestamp "
                            f"{int(events['timestamp'][first])} ns + {int(events['aux'][first])} s of timeout gives "
                            f"deadline {int(pending['deadline'][first])} ns")
    return problems


# ---- Verifying a live ledger ----------------------------------------------------------------------------------

def _replay_through(rebuilt: _core.Engine, stop: int, progress: Progress) -> tuple[int, int, int]:
    """Replay `rebuilt` up to `stop` (to the last batch boundary at or before it) in slices, so that a long replay
    shows progress. Returns (stop reason, batches, events)."""
    reason, position = REPLAY_END, rebuilt.write_position
    batches = events = 0
    while position < stop:
        reason, position, slice_batches, slice_events = rebuilt.replay(min(stop, position + VERIFY_SLICE))
        batches += slice_batches
        events += slice_events
        progress.update(position)
        if reason != REPLAY_END:
            break  # a failed check: the caller reports where
        if slice_batches == 0:
            # The next batch is larger than a slice, or ends past `stop`: replay the rest in one go.
            reason, position, slice_batches, slice_events = rebuilt.replay(stop)
            batches += slice_batches
            events += slice_events
            break
    return reason, batches, events


def _snapshots_to_check(directory: str | None, end: int) -> tuple[list[tuple[int, str]], list[str]]:
    """(position, path) of the snapshot files at or before `end`, oldest first, and any problem with the set.
    A snapshot after `end` was written after the state being verified (a writer beside a read-only verify)."""
    if directory is None:
        return [], []
    found = [(position, path) for position, path in list_snapshots(directory) if position <= end]
    problems = []
    if len(found) > SNAPSHOTS_CHECKED_MAX:
        problems.append(f"{len(found)} snapshot files in {os.path.join(directory, 'snapshots')}; only the newest "
                        f"{SNAPSHOTS_CHECKED_MAX} were checked")
    return sorted(found[:SNAPSHOTS_CHECKED_MAX]), problems


def _check_snapshot(rebuilt: _core.Engine, position: int, path: str) -> list[str] | None:
    """Read one snapshot file (its checksums and state hash are checked on the way) and compare it with the
    replayed state, which stopped at the last batch boundary at or before the position in the file's name.
    Reads the whole file into memory (as large as the state) for the comparison, one snapshot at a time.
    None: the file is gone (deleted since it was listed: a writer beside this read-only verify keeps only its
    newest), so there is nothing to check."""
    try:
        scalars, arrays, _ = read_snapshot(path)
    except FileNotFoundError:
        return None
    except (LedgerCorruptError, OSError, ValueError, MemoryError) as error:
        message = str(error)
        return [message if path in message else f"{path}: {message}"]
    if scalars["write_position"] != position:
        return [f"{path}: holds journal position {scalars['write_position']}, its name says {position}"]
    if rebuilt.write_position != position:
        return [f"{path}: the journal has no batch ending at position {position} (the last batch before it ends "
                f"at {rebuilt.write_position}): the snapshot does not belong to this journal"]
    return state_differences((path, "the replay of the journal"), (scalars, arrays), rebuilt.state_views())


def verify_live(store: "Store") -> VerifyReport:
    """Ledger.verify: replay the store's journal into a fresh engine and compare it with the live state."""
    live = store.engine
    journal = store.journal
    end = live.write_position
    started = time.perf_counter()
    snapshots, problems = _snapshots_to_check(store.path, end)
    base = None if store.path is None else journal_base(store.path)
    rebuilt = _core.Engine(journal.segment_records_log2, journal.view,
                           segment_files=journal.segment_files() if hasattr(journal, "segment_files") else None,
                           **({} if base is not None else {"account_capacity": live.account_count,
                                                          "transfer_capacity": live.transfer_count}))
    try:
        rebuilt.map_through(end)
        checked = 0
        if base is not None:
            # A journal that begins at its base snapshot (a rejoined node): the replay starts from that snapshot
            # (its checksums and state hash checked as it loads) and is chained from its last checksum.
            snapshots = [(position, path) for position, path in snapshots if position > base]
            load_into(snapshot_path(store.path, base), base, rebuilt, live.account_count, live.transfer_count,
                      base=True)
            checked = 1
        batches = events = 0
        reason = REPLAY_END
        with Progress(end, "verify", "records") as progress:
            # Stop at every snapshot's position on the way: the order of `problems` is the order of positions,
            # so the first problem is the first divergence.
            for stop, path in snapshots + [(end, None)]:
                reason, stop_batches, stop_events = _replay_through(rebuilt, stop, progress)
                batches += stop_batches
                events += stop_events
                if reason != REPLAY_END:
                    break
                found = None if path is None else _check_snapshot(rebuilt, stop, path)
                if found is not None:
                    problems += found
                    checked += 1
        seconds = time.perf_counter() - started
        if rebuilt.write_position != end:
            problems.append(f"replay stopped at journal position {rebuilt.write_position} "
                            f"({_core.REPLAY_REASONS[reason]}); the live state is at {end}")
        problems += state_differences(("the live state", "the replayed state"), live.state_views(),
                                      rebuilt.state_views())
        problems += _time_problems(rebuilt)
        hot, _ = rebuilt.account_arrays()
        problems += check_invariants(hot)
        return VerifyReport(not problems, batches, events, int(hot.shape[0]), int(rebuilt.transfer_count),
                            seconds, problems, checked)
    finally:
        rebuilt.readonly = True
        rebuilt.close()
