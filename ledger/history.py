"""The verifiable read side: an account's history, its balance at any past moment, and explanations that add up.

Everything here reads the journal through each account's back-pointers (every event records the previous event
position of its debit and of its credit account, docs/FORMAT.md), so the cost is a number of the *account's*
events, never the size of the journal:

- `balance_at(handle, id, at)` / `account_at(...)`: the live counters minus the effect of the account's events after
  `at`. Cost: the account's events after `at` (walking back from its newest event). The other direction, folding
  forward from the creation, would first need the same walk to find the positions (pointers only point back), so
  walking back is never the dearer one.
- `history(handle, id, since, until, limit)`: the account's events in `[since, until]`, oldest first, with running
  counters. Cost: the account's events after `until` (to back out the running balance from the live counters) plus
  the ones returned.
- `explain(handle, id, since, until)`: reads *all* of the account's events (it is an audit: it folds them forward
  from the creation and checks the result against the live state and against the backward walk).
- Turning a moment (nanoseconds or a datetime) into a journal position is a binary search over the journal
  (timestamps rise strictly with position): about 40 probes, one record each.

Moments (`since`, `until`, `at`: a journal position, a datetime or an `At`) are ledger/moments.py's.

Row fields (`HISTORY_DTYPE`), one row per event that touched the account, creation included:
- `position`, `timestamp` (ns), `transfer_id` (the event's id: the transfer, or for EXPIRE the pending transfer,
  or for ACCOUNT the account id), `kind` (`EventKind`), `pending_id` (for POST, VOID and EXPIRE: the pending transfer
  they resolve; else 0), `code`, `user_data`;
- `counterparty`: the other account (0 for ACCOUNT); `direction`: +1 when this account is the credit side (money
  comes in), -1 when it is the debit side, 0 for ACCOUNT;
- `amount`: what the event carries: moved (TRANSFER), reserved (PENDING), posted (POST), released (VOID, EXPIRE);
  0 for ACCOUNT (whose record holds min_balance there);
- `posted_delta`: the change of this account's balance (credits_posted - debits_posted);
- `pending_delta`: the change of this account's (credits_pending - debits_pending). On the debit side it is exactly
  how much the event moved `available` beyond `posted_delta` (a reservation of 30 is -30; posting or releasing it
  later gives +30 back); on the credit side it moves the ceiling (what the balance could rise to), not `available`;
- `balance_after`, `available_after`: the account's balance and available after the event.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import operator
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol, TypeVar

import numpy as np

from ledger import _core
from ledger.enums import described
from ledger.batches import Account
from ledger.errors import LedgerCorruptError
from ledger.format import POSITION_LIMIT  # back-pointers are 40 bits: no journal position reaches it
from ledger.moments import At, Moment, format_ns
from ledger.moments import as_at as _as_at  # private here: history uses it, it does not offer it

if TYPE_CHECKING:
    from ledger.store import Store


class Handle(Protocol):
    """What the account walk needs of a handle: its store (a ledger.Ledger is one). A protocol rather than an
    import of ledger.api, which calls this module: the dependency goes one way, api -> history -> store."""

    @property
    def store(self) -> Store: ...

__all__ = [
    "HISTORY_DTYPE",
    "Counters",
    "Difference",
    "EventKind",
    "Explanation",
    "account_at",
    "balance_at",
    "explain",
    "explain_difference",
    "history",
]

ID_MAX = 2**64 - 1


@described(
    ACCOUNT="an account was created",
    TRANSFER="a plain transfer was posted",
    PENDING="a pending transfer reserved its amount",
    POST="a pending transfer was posted (in full or in part)",
    VOID="a pending transfer was voided",
    EXPIRE="a pending transfer expired: its timeout passed (written by the engine, not by a caller)",
)
class EventKind(enum.IntEnum):
    """The `kind` of a journal event (docs/FORMAT.md), as found in history rows."""

    ACCOUNT = 1
    TRANSFER = 2
    PENDING = 3
    POST = 4
    VOID = 5
    EXPIRE = 6


assert {kind.value: kind.name.lower() for kind in EventKind} == _core.EVENT_KINDS, "EventKind drifted from the core"

HISTORY_DTYPE = np.dtype(
    [
        ("position", "<u8"),
        ("timestamp", "<u8"),
        ("transfer_id", "<u8"),
        ("counterparty", "<u8"),
        ("amount", "<i8"),
        ("posted_delta", "<i8"),
        ("pending_delta", "<i8"),
        ("balance_after", "<i8"),
        ("available_after", "<i8"),
        ("user_data", "<u8"),
        ("pending_id", "<u8"),
        ("code", "<u2"),
        ("kind", "u1"),
        ("direction", "i1"),
    ],
    align=True,
)


# ---- Moments to journal positions ----------------------------------------------------------------------

def _time_of_position(engine: _core.Engine, position: int) -> int:
    """The timestamp of the event at `position`; for a batch header, the time of its first event (a batch has at
    least one). Event times rise strictly with position, so this is non-decreasing, which the binary search needs;
    a header is never an event, so its tie with the first event does not change which events a cut includes."""
    try:
        return int(engine.decode_events(np.array([position], np.uint64))["timestamp"][0])
    except IndexError:
        headers = engine.batch_headers(position, position + 1, 1)  # raises IndexError if it is not a header either
        return int(headers[0][1])


def _last_position_through_ns(engine: _core.Engine, ns: int) -> int:
    """The largest journal position whose time is at or before `ns` (0 if none): the events at or before that
    position are exactly those with timestamp <= ns. Binary search: O(log journal size) record reads."""
    low, high = 0, engine.write_position - 1  # time(0) is minus infinity: position 0 is never written
    while low < high:
        middle = (low + high + 1) // 2
        if _time_of_position(engine, middle) <= ns:
            low = middle
        else:
            high = middle - 1
    return low


def _last_position_through(engine: _core.Engine, moment: Moment) -> int:
    """Inclusive upper bound: the events at or before `moment` are those at positions <= the result."""
    at = _as_at(moment)
    if at.position is not None:
        return min(at.position, POSITION_LIMIT - 1)
    assert at.ns is not None
    return _last_position_through_ns(engine, at.ns)


def _first_position_from(engine: _core.Engine, moment: Moment) -> int:
    """Inclusive lower bound: the events at or after `moment` are those at positions >= the result."""
    at = _as_at(moment)
    if at.position is not None:
        return min(at.position, POSITION_LIMIT)
    assert at.ns is not None
    return _last_position_through_ns(engine, at.ns - 1) + 1


def _describe(moment: Moment) -> str:
    return str(_as_at(moment))


# ---- Counters and per-event movements -------------------------------------------------------------------------

class Counters(NamedTuple):
    """The four counters of an account (Python ints: sums of them never wrap)."""

    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int

    @property
    def balance(self) -> int:
        """credits_posted - debits_posted."""
        return self.credits_posted - self.debits_posted

    @property
    def available(self) -> int:
        """balance - debits_pending."""
        return self.credits_posted - self.debits_posted - self.debits_pending

    def minus(self, other: Counters) -> Counters:
        """These counters less `other`'s, field by field (what moved between two moments)."""
        return Counters(*(mine - theirs for mine, theirs in zip(self, other)))


ZERO = Counters(0, 0, 0, 0)


class Movements(NamedTuple):
    """Per-event effects on one account (int64 arrays aligned with the decoded events)."""

    direction: np.ndarray
    counterparty: np.ndarray
    amount: np.ndarray
    pending_id: np.ndarray
    debits_posted: np.ndarray
    credits_posted: np.ndarray
    debits_pending: np.ndarray
    credits_pending: np.ndarray

    def total(self) -> Counters:
        # Each sum is the difference of two counter values in [0, 2**63), so it fits int64 (numpy wraps
        # modulo 2**64 in between, and the true result is in range).
        return Counters(int(self.debits_posted.sum()), int(self.credits_posted.sum()),
                        int(self.debits_pending.sum()), int(self.credits_pending.sum()))


def _account_id(id: Any) -> int:
    if isinstance(id, bool):
        raise TypeError("an account id must be an int, not bool")
    id = operator.index(id)
    if not 0 < id < ID_MAX:
        raise ValueError(f"account id {id} is invalid (ids are 1 .. 2**64 - 2)")
    return id


def _positions(handle: Handle, id: int) -> tuple[int, int]:
    """(creation position, newest event position) of the account; KeyError if it does not exist."""
    positions = handle.store.engine.account_positions(id)
    if positions is None:
        raise KeyError(f"account {id} not found")
    return int(positions[0]), int(positions[1])


def _live(handle: Handle, id: int) -> Counters:
    account = handle.account(id)
    assert account is not None, f"account {id} vanished"
    return Counters(account.debits_posted, account.credits_posted, account.debits_pending, account.credits_pending)


def _decode(handle: Handle, positions_newest_first: np.ndarray) -> np.ndarray:
    """The events at these positions, oldest first."""
    return handle.store.engine.decode_events(np.ascontiguousarray(positions_newest_first[::-1], dtype=np.uint64))


def _walk(handle: Handle, id: int, after_position: int = 0, before_position: int = POSITION_LIMIT,
          limit: int | None = None) -> np.ndarray:
    """Positions of the account's events with after_position < position < before_position, newest first."""
    after_position = max(after_position, 0)
    before_position = min(before_position, POSITION_LIMIT)
    if after_position + 1 >= before_position or limit == 0:
        return np.zeros(0, np.uint64)
    if limit is None:
        return handle.store.engine.account_history(id, before_position, after_position)
    return handle.store.engine.account_history(id, before_position, after_position, limit)


def _corrupt_event(handle: Handle, position: int, problem: str) -> LedgerCorruptError:
    """The error for an event read from the journal that contradicts what the account's history must be."""
    path, offset = handle.store.location(position)
    where = f"in {path} at byte offset {offset}, " if path is not None else ""
    return LedgerCorruptError(f"journal corrupt ({problem}) {where}journal position {position}: an event of the "
                              f"account's history read from the journal; nothing was changed")


def _pending_amounts(handle: Handle, pending_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The reserved amount of each pending transfer (a POST event carries what it posted, not what it released);
    positions: the POST events' journal positions, for the error if one names no known pending transfer."""
    if pending_ids.size == 0:
        return np.zeros(0, np.int64)
    records = handle.lookup_transfers(pending_ids)
    unknown = np.flatnonzero(records["state"] == 0)
    if unknown.size:
        raise _corrupt_event(handle, int(positions[unknown[0]]),
                             f"a POST refers to pending transfer {int(pending_ids[unknown[0]])}, which is unknown")
    return records["amount"].astype(np.int64)


def _movements(handle: Handle, id: int, events: np.ndarray) -> Movements:
    kind = events["kind"]
    amount = events["amount"]
    creation = kind == EventKind.ACCOUNT
    # An ACCOUNT record keeps ledger and flags in debit_account, which may equal the id: decide on kind first.
    direction = np.where(creation, 0, np.where(events["credit_account"] == id, 1, -1)).astype(np.int8)
    foreign = np.flatnonzero((direction == -1) & (events["debit_account"] != id))
    if foreign.size:
        raise _corrupt_event(handle, int(events["position"][foreign[0]]), f"an event not of account {id}")
    counterparty = np.where(direction == 1, events["debit_account"],
                            np.where(direction == -1, events["credit_account"], 0)).astype(np.uint64)
    resolves = (kind == EventKind.POST) | (kind == EventKind.VOID) | (kind == EventKind.EXPIRE)
    pending_id = np.where(resolves, events["aux"], 0).astype(np.uint64)
    posted = np.where((kind == EventKind.TRANSFER) | (kind == EventKind.POST), amount, 0).astype(np.int64)
    released = np.where((kind == EventKind.VOID) | (kind == EventKind.EXPIRE), amount, 0).astype(np.int64)
    is_post = kind == EventKind.POST
    released[is_post] = _pending_amounts(handle, events["aux"][is_post], events["position"][is_post])
    pending_change = np.where(kind == EventKind.PENDING, amount, 0).astype(np.int64) - released
    debit_side, credit_side = direction == -1, direction == 1
    return Movements(
        direction=direction,
        counterparty=counterparty,
        amount=np.where(creation, 0, amount).astype(np.int64),
        pending_id=pending_id,
        debits_posted=np.where(debit_side, posted, 0),
        credits_posted=np.where(credit_side, posted, 0),
        debits_pending=np.where(debit_side, pending_change, 0),
        credits_pending=np.where(credit_side, pending_change, 0),
    )


def _rows(events: np.ndarray, moves: Movements, opening: Counters) -> np.ndarray:
    """History rows with the running counters, starting from `opening` (the counters before the first event)."""
    rows = np.zeros(events.shape[0], HISTORY_DTYPE)
    rows["position"] = events["position"]
    rows["timestamp"] = events["timestamp"]
    rows["transfer_id"] = events["id"]
    rows["kind"] = events["kind"]
    rows["code"] = events["code"]
    rows["user_data"] = events["user_data"]
    rows["counterparty"] = moves.counterparty
    rows["direction"] = moves.direction
    rows["amount"] = moves.amount
    rows["pending_id"] = moves.pending_id
    rows["posted_delta"] = moves.credits_posted - moves.debits_posted
    rows["pending_delta"] = moves.credits_pending - moves.debits_pending
    # Running counters in int64: every value is a real past counter (in range), so wrap-around in the cumulative
    # sums cancels out.
    with np.errstate(over="ignore"):
        debits_posted = np.int64(opening.debits_posted) + np.cumsum(moves.debits_posted, dtype=np.int64)
        credits_posted = np.int64(opening.credits_posted) + np.cumsum(moves.credits_posted, dtype=np.int64)
        debits_pending = np.int64(opening.debits_pending) + np.cumsum(moves.debits_pending, dtype=np.int64)
    rows["balance_after"] = credits_posted - debits_posted
    rows["available_after"] = credits_posted - debits_posted - debits_pending
    return rows


# ---- As of a past moment --------------------------------------------------------------------------------------

def _counters_through(handle: Handle, id: int, last_position: int) -> Counters:
    """The account's counters after every event at a position <= last_position: the live counters minus the
    effect of its later events (found walking back from the newest one)."""
    creation, _ = _positions(handle, id)
    assert last_position >= creation, "the account did not exist yet"
    later = _decode(handle, _walk(handle, id, after_position=last_position))
    return _live(handle, id).minus(_movements(handle, id, later).total())


def _check_not_past_end(engine: _core.Engine, at: At) -> None:
    """A balance "as of" a moment past the journal's end is not known yet (more events may come), and asking for
    one is most often a typo or a timestamp read as a position: a ValueError naming the end, never the present
    balance passed off as the answer. The end itself (the next position to be written) is the present."""
    end = engine.write_position
    if at.position is not None and at.position > end:
        raise ValueError(f"journal position {at.position} is past the journal's end {end} (the next position to "
                         f"be written; the newest event is at {end - 1})")
    if at.ns is not None:
        now = max(time.time_ns(), engine.last_timestamp)  # the engine's clock may run ahead of this one
        if at.ns > now:
            raise ValueError(f"{format_ns(at.ns)} is in the future (now is {format_ns(now)}; the journal's newest "
                             f"event is at {format_ns(engine.last_timestamp)}, position {end - 1})")


def _existing_through(handle: Handle, id: int, at: Moment) -> int:
    """The inclusive position for `at`; KeyError when the account was created after it, ValueError when `at` is
    past the journal's end."""
    id = _account_id(id)
    creation, _ = _positions(handle, id)
    _check_not_past_end(handle.store.engine, _as_at(at))
    last_position = _last_position_through(handle.store.engine, at)
    if last_position < creation:
        created_ns = handle.account(id).timestamp  # type: ignore[union-attr]
        raise KeyError(f"account {id} did not exist yet at {_describe(at)}: it was created at journal position "
                       f"{creation} ({format_ns(created_ns)})")
    return last_position


_Read = TypeVar("_Read", bound=Callable[..., Any])


def _holding_engine(read: _Read) -> _Read:
    """Run a read with the handle's engine lock held throughout: it walks the journal and the live state in several
    calls, and a batch of another thread between them would mix two states (or grow what it reads)."""
    @functools.wraps(read)
    def held(handle: Handle, *args: Any, **kwargs: Any) -> Any:
        engine = handle.store.engine
        engine.__enter__()  # (called by name, not `with`: a test may stand a proxy in for the engine)
        try:
            return read(handle, *args, **kwargs)
        finally:
            engine.__exit__(None, None, None)
    return held  # type: ignore[return-value]


@_holding_engine
def balance_at(handle: Handle, id: int, at: Moment) -> int:
    """The balance (credits_posted - debits_posted) of account `id` after every event at or before `at`.
    Cost: the account's events after `at`. KeyError if the account does not exist or did not exist yet then;
    ValueError if `at` is past the journal's end (a position after `stats()["journal_position"]`, or a time in
    the future)."""
    last_position = _existing_through(handle, id, at)
    return _counters_through(handle, int(id), last_position).balance


@_holding_engine
def account_at(handle: Handle, id: int, at: Moment) -> Account:
    """The account as it was after every event at or before `at`: an `Account` whose four counters are those of
    that moment (its limits, ledger, flags and user_data never change). Same cost and errors as balance_at."""
    last_position = _existing_through(handle, id, at)
    counters = _counters_through(handle, int(id), last_position)
    account = handle.account(int(id))
    assert account is not None
    return account._replace(**counters._asdict())


# ---- History --------------------------------------------------------------------------------------------------

def _window(handle: Handle, since: Moment | None, until: Moment | None) -> tuple[int, int]:
    """The inclusive position range [first, last] for since/until (None: from the start / through the end)."""
    engine = handle.store.engine
    end = engine.write_position - 1  # the newest committed record
    first = 0 if since is None else _first_position_from(engine, since)
    last = end if until is None else _last_position_through(engine, until)
    if since is not None and until is not None:
        since_at, until_at = _as_at(since), _as_at(until)
        reversed_moments = since_at.ns is not None and until_at.ns is not None and since_at.ns > until_at.ns
        if reversed_moments or first > last + 1:
            raise ValueError(f"since ({since_at}) is after until ({until_at})")
    last = min(last, end)
    # An empty window is first == last + 1 (since in the future, or a moment between two events).
    return min(first, last + 1), last


def _history_between(handle: Handle, id: int, first: int, last: int, limit: int | None) -> np.ndarray:
    creation, _ = _positions(handle, id)
    if last < max(first, creation):
        return np.zeros(0, HISTORY_DTYPE)
    later = _decode(handle, _walk(handle, id, after_position=last))
    window = _decode(handle, _walk(handle, id, after_position=first - 1, before_position=last + 1, limit=limit))
    moves = _movements(handle, id, window)
    closing = _live(handle, id).minus(_movements(handle, id, later).total())
    return _rows(window, moves, closing.minus(moves.total()))


@_holding_engine
def history(handle: Handle, id: int, since: Moment | None = None, until: Moment | None = None,
            limit: int | None = None) -> np.ndarray:
    """The events that touched account `id` with since <= moment <= until (both inclusive; None: unbounded), oldest
    first, as a HISTORY_DTYPE array with running balance and available. `limit` keeps the *newest* `limit` of
    them (page backwards with `until=rows["position"][0] - 1`). KeyError if the account does not exist.
    Cost: the account's events after `until` plus those returned."""
    id = _account_id(id)
    if limit is not None:
        limit = operator.index(limit)
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
    _positions(handle, id)  # KeyError before any work
    first, last = _window(handle, since, until)
    return _history_between(handle, id, first, last, limit)


# ---- Explanations ---------------------------------------------------------------------------------------------

_TABLE_HEADERS = ("position", "time (UTC)", "kind", "transfer", "counterparty", "amount", "posted", "pending",
                  "balance", "available", "code")
_LEFT_ALIGNED = ("time (UTC)", "kind")


def rows_to_text(rows: np.ndarray) -> str:
    """A readable table of history rows: `posted` and `pending` are the signed changes (posted_delta,
    pending_delta), `balance` and `available` the values after the event."""
    table = [_TABLE_HEADERS] + [_row_cells(row) for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(_TABLE_HEADERS))]
    return "\n".join(
        "  ".join(cell.ljust(width) if name in _LEFT_ALIGNED else cell.rjust(width)
                  for cell, width, name in zip(line, widths, _TABLE_HEADERS)).rstrip()
        for line in table)


def _row_cells(row: np.void) -> tuple[str, ...]:
    creation = row["kind"] == EventKind.ACCOUNT
    return (str(int(row["position"])), format_ns(int(row["timestamp"])), EventKind(int(row["kind"])).name.lower(),
            str(int(row["transfer_id"])), "-" if creation else str(int(row["counterparty"])),
            f"{int(row['amount']):,}", f"{int(row['posted_delta']):+,}", f"{int(row['pending_delta']):+,}",
            f"{int(row['balance_after']):,}", f"{int(row['available_after']):,}", str(int(row["code"])))


def row_to_dict(row: np.void) -> dict[str, Any]:
    """One history row as JSON-ready plain values (kind as its name, time also as ISO-8601)."""
    out: dict[str, Any] = {name: int(row[name]) for name in HISTORY_DTYPE.names}
    out["kind"] = EventKind(out["kind"]).name.lower()
    out["time"] = format_ns(out["timestamp"])
    return out


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it holds a numpy array
class Explanation:
    """How account `account_id` went from `opening` (after every event before `first_position`) to `closing`
    (after every event at or before `last_position`): the events in between, with running balances.

    `problems` lists every check that failed (empty: `ok`):
    - folding all of the account's events forward from its creation ends at the live counters;
    - opening balance + sum(posted_delta) == closing balance (and the same for available with pending_delta);
    - the closing counters equal `account_at(last_position)`, computed the other way (back from the live state);
    - the rows equal `history(since, until)`, also computed back from the live state;
    - after every event, min_balance <= available and balance + credits_pending <= max_balance."""

    account_id: int
    first_position: int
    last_position: int
    opening: Counters
    closing: Counters
    rows: np.ndarray
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True if the movements add up from the opening to the closing counters (no problems found)."""
        return not self.problems

    @property
    def opening_balance(self) -> int:
        """The balance before the first movement listed."""
        return self.opening.balance

    @property
    def closing_balance(self) -> int:
        """The balance after the last movement listed."""
        return self.closing.balance

    @property
    def posted_total(self) -> int:
        """closing_balance - opening_balance: the net posted movement over the range."""
        return self.closing.balance - self.opening.balance

    def to_text(self) -> str:
        """The explanation as lines of text for a person (what `ledger explain` prints)."""
        lines = [f"account {self.account_id}, journal positions {self.first_position} through {self.last_position}",
                 f"opening balance {self.opening.balance:,}, available {self.opening.available:,}"]
        lines.append(rows_to_text(self.rows))
        lines.append(f"closing balance {self.closing.balance:,}, available {self.closing.available:,}")
        lines.append(f"check: opening {self.opening.balance:,} {self.posted_total:+,} posted over "
                     f"{len(self.rows)} events = closing {self.closing.balance:,}: "
                     + ("OK" if self.ok else "FAILED"))
        lines.extend(f"  problem: {problem}" for problem in self.problems)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The explanation as plain JSON-ready data (what `ledger explain --json` prints)."""
        return {
            "account": self.account_id,
            "first_position": self.first_position,
            "last_position": self.last_position,
            "opening": {**self.opening._asdict(), "balance": self.opening.balance,
                        "available": self.opening.available},
            "closing": {**self.closing._asdict(), "balance": self.closing.balance,
                        "available": self.closing.available},
            "posted_total": self.posted_total,
            "ok": self.ok,
            "problems": list(self.problems),
            "events": [row_to_dict(row) for row in self.rows],
        }

    def __str__(self) -> str:
        return self.to_text()


def _fold(handle: Handle, id: int) -> tuple[np.ndarray, Movements, np.ndarray]:
    """All of the account's events, their movements, and the counters after each (int64 [n, 4] array) folded
    forward from zero at the creation."""
    events = _decode(handle, _walk(handle, id))
    moves = _movements(handle, id, events)
    with np.errstate(over="ignore"):
        after = np.stack([np.cumsum(moves.debits_posted, dtype=np.int64),
                          np.cumsum(moves.credits_posted, dtype=np.int64),
                          np.cumsum(moves.debits_pending, dtype=np.int64),
                          np.cumsum(moves.credits_pending, dtype=np.int64)], axis=1)
    return events, moves, after


def _counters_before(after: np.ndarray, index: int) -> Counters:
    """The folded counters before event `index` (zero before the first)."""
    return ZERO if index == 0 else Counters(*(int(value) for value in after[index - 1]))


def _limit_problems(handle: Handle, id: int, rows: np.ndarray, after: np.ndarray) -> list[str]:
    account = handle.account(id)
    assert account is not None
    if rows.size == 0:
        return []
    debits_posted, credits_posted, credits_pending = (after[:, 0].astype(object), after[:, 1].astype(object),
                                                      after[:, 3].astype(object))
    problems = []
    low = np.flatnonzero(rows["available_after"] < account.min_balance)
    if low.size:
        problems.append(f"available below min_balance {account.min_balance:,} after position "
                        f"{int(rows['position'][low[0]])}")
    ceiling = credits_posted + credits_pending - debits_posted  # Python ints: the ceiling may pass int64
    high = np.flatnonzero(ceiling > account.max_balance)
    if high.size:
        problems.append(f"balance + credits_pending above max_balance {account.max_balance:,} after position "
                        f"{int(rows['position'][high[0]])}")
    return problems


@_holding_engine
def explain(handle: Handle, id: int, since: Moment | None = None, until: Moment | None = None) -> Explanation:
    """Opening balance (before `since`), every event in [since, until] with its running balance, closing balance,
    and the checks listed on `Explanation`. Reads all of the account's events (an audit); KeyError if the account
    does not exist, or did not exist yet at `until`."""
    id = _account_id(id)
    creation, _ = _positions(handle, id)
    first, last = _window(handle, since, until)
    if last < creation:
        raise KeyError(f"account {id} did not exist yet at {_describe(until)}: it was created at journal position "
                       f"{creation}")
    return _explain_between(handle, id, first, last)


def _explain_between(handle: Handle, id: int, first: int, last: int) -> Explanation:
    events, moves, after = _fold(handle, id)
    positions = events["position"]
    start, stop = int(np.searchsorted(positions, first, "left")), int(np.searchsorted(positions, last, "right"))
    opening = _counters_before(after, start)
    closing = _counters_before(after, max(stop, start))
    window_moves = Movements(*(field[start:stop] for field in moves))
    rows = _rows(events[start:stop], window_moves, opening)
    problems = []
    folded_to_now = _counters_before(after, len(events))
    if folded_to_now != _live(handle, id):
        problems.append(f"folding the journal gives {folded_to_now}, the live state is {_live(handle, id)}")
    movements = window_moves.total()
    if opening.balance + movements.balance != closing.balance:
        problems.append(f"opening {opening.balance} + posted {movements.balance} != closing {closing.balance}")
    if rows.size and int(rows["balance_after"][-1]) != closing.balance:
        problems.append(f"the running balance ends at {int(rows['balance_after'][-1])}, not {closing.balance}")
    backward = _counters_through(handle, id, last)
    if backward != closing:
        problems.append(f"as of position {last} the backward walk gives {backward}, the forward fold {closing}")
    if not np.array_equal(_history_between(handle, id, first, last, None), rows):
        problems.append("history() computed back from the live state differs from the forward fold")
    problems.extend(_limit_problems(handle, id, rows, after[start:stop]))
    return Explanation(id, first, last, opening, closing, rows, tuple(problems))


@dataclasses.dataclass(frozen=True, eq=False)
class Difference:
    """The answer of `explain_difference`: one explanation per account involved and the difference they explain.
    One account: `difference` = its balance at the later point minus at the earlier one, explained by the
    events in between. Two accounts: `difference` = balance of the first minus balance of the second, each
    explained by its whole history up to its point."""

    explanations: tuple[Explanation, ...]
    difference: int

    @property
    def ok(self) -> bool:
        """True if every explanation adds up."""
        return all(explanation.ok for explanation in self.explanations)

    def to_text(self) -> str:
        """Each explanation as text, and the difference between the balances."""
        parts = [explanation.to_text() for explanation in self.explanations]
        if len(self.explanations) == 1:
            only = self.explanations[0]
            summary = (f"account {only.account_id} changed by {self.difference:+,} between positions "
                       f"{only.first_position - 1} and {only.last_position}")
        else:
            a, b = self.explanations
            summary = (f"account {a.account_id} ({a.closing.balance:,} at position {a.last_position}) minus account "
                       f"{b.account_id} ({b.closing.balance:,} at position {b.last_position}) = {self.difference:+,}")
        return "\n\n".join(parts + [summary])

    def to_dict(self) -> dict[str, Any]:
        """The difference and each explanation as plain JSON-ready data."""
        return {"difference": self.difference, "ok": self.ok,
                "explanations": [explanation.to_dict() for explanation in self.explanations]}

    def __str__(self) -> str:
        return self.to_text()


@_holding_engine
def explain_difference(handle: Handle, id_a: int, id_b: int | None = None, at_a: Moment | None = None,
                       at_b: Moment | None = None) -> Difference:
    """Why two balances differ.

    One account (`id_b` None): how account `id_a` went from its balance at `at_a` (None: before it existed, 0) to
    its balance at `at_b` (None: now): the events after `at_a` up to and including `at_b`.
    Two accounts: account `id_a` at `at_a` against account `id_b` at `at_b` (None: now): each one's events from its
    creation up to its point; the difference is balance_a - balance_b."""
    id_a = _account_id(id_a)
    engine = handle.store.engine
    if id_b is None:
        first = 0 if at_a is None else _last_position_through(engine, at_a) + 1
        explanation = explain(handle, id_a, since=first, until=at_b)
        return Difference((explanation,), explanation.posted_total)
    first_side = explain(handle, id_a, until=at_a)
    second_side = explain(handle, _account_id(id_b), until=at_b)
    return Difference((first_side, second_side), first_side.closing.balance - second_side.closing.balance)
