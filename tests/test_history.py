"""History, balance as of a past moment, and explanations (ledger/history.py), checked against two independent
references:

- the states recorded from the live engine after every call (counters of every account, the journal position
  and the last timestamp at that moment);
- a plain-Python replay that folds every journal event in order (dicts and Python ints, no back-pointers), which
  gives the state at *every* position, including in the middle of a batch.
"""
from __future__ import annotations

import bisect
import datetime
import importlib
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ledger
from ledger import TransferFlags
from ledger.history import EventKind
from ledger.moments import At, format_ns

# The module itself (the package may export a function named `history`, which would shadow the attribute).
history_module = importlib.import_module("ledger.history")

START_NS = 1_700_000_000 * 10**9
SECOND_NS = 10**9
SETTLEMENT = 1
COUNTERS = ("debits_posted", "credits_posted", "debits_pending", "credits_pending")
HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(HERE)


class Clock:
    """The engine's injected clock: integer nanoseconds, moved by the workload."""

    def __init__(self) -> None:
        self.ns = START_NS

    def __call__(self) -> int:
        return self.ns


# ---- Workload and recorded states -----------------------------------------------------------------------------

@dataclass
class Snapshot:
    """What the live engine said right after one call."""

    last_position: int  # the newest committed record (journal_position - 1)
    last_timestamp_ns: int
    counters: dict[int, tuple[int, int, int, int]]


@dataclass
class Workload:
    handle: ledger.Ledger
    clock: Clock
    random: random.Random
    account_ids: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    next_transfer_id: int = 1_000

    def record(self) -> None:
        accounts = self.handle.accounts()
        counters = {int(row["id"]): tuple(int(row[name]) for name in COUNTERS) for row in accounts}
        self.snapshots.append(Snapshot(self.handle.stats()["journal_position"] - 1,
                                       self.handle._engine.last_timestamp, counters))

    def new_id(self) -> int:
        self.next_transfer_id += 1
        return self.next_transfer_id

    def create_account(self, id: int, max_balance: int = ledger.BALANCE_MAX) -> None:
        min_balance = ledger.BALANCE_MIN if id == SETTLEMENT else 0
        assert self.handle.create_account(id, min_balance=min_balance, max_balance=max_balance) == 0
        self.account_ids.append(id)
        self.record()

    def row(self, kind: str, debit: int, credit: int, amount: int, timeout: int, pick: int) -> dict[str, int]:
        """One transfer row; POST and VOID pick a pending id (most of them still pending, some resolved)."""
        row = {"id": self.new_id(), "debit_account": debit, "credit_account": credit, "amount": amount,
               "flags": 0, "pending_id": 0, "timeout": 0, "code": pick % 7, "user_data": pick}
        if kind == "pending":
            row.update(flags=int(TransferFlags.PENDING), timeout=timeout)
            self.pending_ids.append(row["id"])
        elif kind in ("post", "void") and self.pending_ids:
            pending_id = self.pending_ids[pick % len(self.pending_ids)]
            flags = TransferFlags.POST_PENDING if kind == "post" else TransferFlags.VOID_PENDING
            # POST: 0 = all, or a part (possibly too much: a failing row is fine, it writes nothing).
            amount = 0 if kind == "void" or pick % 3 == 0 else amount
            row.update(debit_account=0, credit_account=0, amount=amount, flags=int(flags), pending_id=pending_id)
        return row

    def transfers(self, rows: list[dict[str, int]], advance_ns: int) -> None:
        self.clock.ns += advance_ns
        batch = ledger.transfers_batch(len(rows))
        for index, row in enumerate(rows):
            for name, value in row.items():
                batch[name][index] = value
        self.handle.transfers(batch)
        self.record()


def random_workload(handle: ledger.Ledger, clock: Clock, seed: int, calls: int) -> Workload:
    """Funding, plain transfers, pending transfers that get posted (fully or partly), voided or expired, linked
    chains (some failing), accounts created along the way, and calls that only expire."""
    work = Workload(handle, clock, random.Random(seed))
    rng = work.random
    work.create_account(SETTLEMENT)
    for id in range(2, 6):
        work.create_account(id, max_balance=rng.choice([ledger.BALANCE_MAX, 5_000]))
    for _ in range(calls):
        choice = rng.random()
        if choice < 0.05:
            work.create_account(max(work.account_ids) + 1)
            continue
        rows = []
        for _ in range(rng.choice([0, 1, 1, 2, 3, 5])):
            kind = rng.choice(["fund", "plain", "plain", "pending", "pending", "post", "void"])
            debit, credit = rng.sample(work.account_ids, 2)
            if kind == "fund":
                debit, kind = SETTLEMENT, "plain"
            rows.append(work.row(kind, debit, credit, rng.randint(1, 800), rng.choice([0, 1, 2, 5]),
                                 rng.randrange(1 << 20)))
        if len(rows) > 1 and rng.random() < 0.3:
            for row in rows[:-1]:
                row["flags"] |= int(TransferFlags.LINKED)
        work.transfers(rows, rng.choice([1, 1_000, SECOND_NS // 2, SECOND_NS, 3 * SECOND_NS]))
    return work


# ---- The plain-Python replay ----------------------------------------------------------------------------------

@dataclass
class Replay:
    """Every account's counters after each of its events, from a fold over the whole journal in order."""

    positions: dict[int, list[int]]  # account -> positions of its events (ascending)
    timestamps: dict[int, list[int]]
    states: dict[int, list[tuple[int, int, int, int]]]  # account -> counters after each of its events
    event_positions: list[int]
    event_timestamps: list[int]

    def counters_through(self, id: int, last_position: int) -> tuple[int, int, int, int] | None:
        """The account's counters after every event at or before last_position; None before it existed."""
        index = bisect.bisect_right(self.positions[id], last_position)
        return None if index == 0 else self.states[id][index - 1]

    def last_position_through_ns(self, ns: int) -> int:
        index = bisect.bisect_right(self.event_timestamps, ns)
        return 0 if index == 0 else self.event_positions[index - 1]


def replay(handle: ledger.Ledger) -> Replay:
    engine = handle._engine
    counters: dict[int, list[int]] = {}
    pending_amounts: dict[int, int] = {}
    result = Replay({}, {}, {}, [], [])
    for header_position, _, count in engine.batch_headers():
        events = engine.decode_events(np.arange(header_position + 1, header_position + 1 + count, dtype=np.uint64))
        for event in events:
            kind, amount = int(event["kind"]), int(event["amount"])
            debit, credit = int(event["debit_account"]), int(event["credit_account"])
            touched = []
            if kind == EventKind.ACCOUNT:
                counters[int(event["id"])] = [0, 0, 0, 0]
                touched = [int(event["id"])]
            else:
                released = 0
                if kind == EventKind.TRANSFER:
                    counters[debit][0] += amount
                    counters[credit][1] += amount
                elif kind == EventKind.PENDING:
                    counters[debit][2] += amount
                    counters[credit][3] += amount
                    pending_amounts[int(event["id"])] = amount
                else:
                    released = pending_amounts.pop(int(event["aux"]))
                    if kind == EventKind.POST:
                        counters[debit][0] += amount
                        counters[credit][1] += amount
                    counters[debit][2] -= released
                    counters[credit][3] -= released
                touched = [debit, credit]
            for id in touched:
                result.positions.setdefault(id, []).append(int(event["position"]))
                result.timestamps.setdefault(id, []).append(int(event["timestamp"]))
                result.states.setdefault(id, []).append(tuple(counters[id]))
            result.event_positions.append(int(event["position"]))
            result.event_timestamps.append(int(event["timestamp"]))
    return result


def check_replay_matches_snapshots(work: Workload, reference: Replay) -> None:
    """The replay itself agrees with the live engine after every call (else it proves nothing)."""
    for snapshot in work.snapshots:
        for id, counters in snapshot.counters.items():
            assert reference.counters_through(id, snapshot.last_position) == counters


def counters_of(account: ledger.Account) -> tuple[int, int, int, int]:
    return tuple(getattr(account, name) for name in COUNTERS)


def balance_of(counters: tuple[int, int, int, int]) -> int:
    return counters[1] - counters[0]


# ---- Shared checks --------------------------------------------------------------------------------------------

def check_as_of_recorded_states(handle: ledger.Ledger, work: Workload, rng: random.Random, samples: int) -> None:
    """balance_at / account_at at recorded moments (position, position of the next header, timestamp) equal
    what the live engine said then."""
    chosen = rng.sample(work.snapshots, min(samples, len(work.snapshots)))
    for snapshot in chosen:
        ids = rng.sample(sorted(snapshot.counters), min(3, len(snapshot.counters)))
        for id in ids:
            expected = snapshot.counters[id]
            for at in (snapshot.last_position, snapshot.last_position + 1, At(ns=snapshot.last_timestamp_ns),
                       At(position=snapshot.last_position)):
                assert counters_of(history_module.account_at(handle, id, at)) == expected, (id, at)
                assert history_module.balance_at(handle, id, at) == balance_of(expected)
            assert handle.balance(id, at=snapshot.last_position) == balance_of(expected)


def check_every_position(handle: ledger.Ledger, reference: Replay, rng: random.Random, samples: int) -> None:
    """At random positions (mid-batch included) and random nanoseconds, for every account: the replay's state, or
    KeyError when the account did not exist yet."""
    end = handle.stats()["journal_position"]
    first_ns, last_ns = reference.event_timestamps[0], reference.event_timestamps[-1]
    for _ in range(samples):
        position = rng.randrange(0, end + 3)
        ns = rng.randint(first_ns - 5, last_ns + 5)
        for id in reference.positions:
            for at, last_position in ((position, position), (At(ns=ns), reference.last_position_through_ns(ns))):
                expected = reference.counters_through(id, last_position)
                if at == position and position > end:
                    with pytest.raises(ValueError, match=f"journal position {position} is past the journal's end"):
                        history_module.balance_at(handle, id, at)
                elif expected is None:
                    with pytest.raises(KeyError, match="did not exist yet"):
                        history_module.balance_at(handle, id, at)
                else:
                    assert counters_of(history_module.account_at(handle, id, at)) == expected, (id, at)


def check_history(handle: ledger.Ledger, reference: Replay, rng: random.Random) -> None:
    """Complete (one row per event that touched the account), ordered, and the running columns agree with the
    replay; windows and limits are slices of the full history."""
    for id in reference.positions:
        rows = history_module.history(handle, id)
        assert rows.dtype == history_module.HISTORY_DTYPE
        assert rows["position"].tolist() == reference.positions[id]
        assert rows["timestamp"].tolist() == reference.timestamps[id]
        assert (np.diff(rows["timestamp"].astype(np.int64)) > 0).all()
        states = reference.states[id]
        assert rows["balance_after"].tolist() == [balance_of(state) for state in states]
        assert rows["available_after"].tolist() == [state[1] - state[0] - state[2] for state in states]
        assert int(rows["posted_delta"].sum()) == handle.balance(id)
        pending_balance = [0] + [state[3] - state[2] for state in states]
        assert rows["pending_delta"].tolist() == np.diff(pending_balance).tolist()
        assert rows["kind"][0] == EventKind.ACCOUNT and rows["direction"][0] == 0
        moved = rows["kind"] != EventKind.ACCOUNT
        assert (rows["counterparty"][moved] != id).all() and (rows["direction"][moved] != 0).all()
        check_history_windows(handle, id, rows, rng)


def check_history_windows(handle: ledger.Ledger, id: int, rows: np.ndarray, rng: random.Random) -> None:
    end = handle.stats()["journal_position"]
    for _ in range(4):
        since, until = sorted(rng.randrange(0, end + 2) for _ in range(2))
        inside = rows[(rows["position"] >= since) & (rows["position"] <= until)]
        assert np.array_equal(history_module.history(handle, id, since=since, until=until), inside)
        limit = rng.randrange(0, 5)
        assert np.array_equal(handle.history(id, since=since, until=until, limit=limit),
                              inside[len(inside) - min(limit, len(inside)):])
        timed = history_module.history(handle, id, since=At(ns=int(rows["timestamp"][0])),
                                       until=At(ns=int(rows["timestamp"][-1])))
        assert np.array_equal(timed, rows)


def check_explain(handle: ledger.Ledger, reference: Replay, rng: random.Random) -> None:
    end = handle.stats()["journal_position"]
    for id in reference.positions:
        creation = reference.positions[id][0]
        since = rng.randrange(0, end + 1)
        until = rng.randrange(max(since - 1, creation), end + 1)
        explanation = handle.explain(id, since=since, until=until)
        assert explanation.ok, explanation.problems
        opening = reference.counters_through(id, since - 1) or (0, 0, 0, 0)
        assert tuple(explanation.opening) == opening
        assert tuple(explanation.closing) == reference.counters_through(id, until)
        assert explanation.opening_balance + int(explanation.rows["posted_delta"].sum()) == \
            explanation.closing_balance == handle.balance(id, at=until)
        assert np.array_equal(explanation.rows, handle.history(id, since=since, until=until))
        assert str(id) in explanation.to_text() and "OK" in explanation.to_text()
        json.dumps(explanation.to_dict())


# ---- Tests ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def memory_workload():
    clock = Clock()
    handle = ledger.open(None, clock=clock)
    work = random_workload(handle, clock, seed=5, calls=400)
    reference = replay(handle)
    check_replay_matches_snapshots(work, reference)
    yield handle, work, reference
    handle.close()


def test_workload_covers_every_event_kind(memory_workload):
    _, _, reference = memory_workload
    handle = memory_workload[0]
    kinds = set()
    for id in reference.positions:
        kinds.update(history_module.history(handle, id)["kind"].tolist())
    assert kinds == {kind.value for kind in EventKind}


def test_balance_at_recorded_states(memory_workload):
    handle, work, _ = memory_workload
    check_as_of_recorded_states(handle, work, random.Random(1), samples=150)


def test_balance_at_every_position_and_moment(memory_workload):
    handle, _, reference = memory_workload
    check_every_position(handle, reference, random.Random(2), samples=80)


def test_history_is_complete_and_ordered(memory_workload):
    handle, _, reference = memory_workload
    check_history(handle, reference, random.Random(3))


def test_explain_adds_up(memory_workload):
    handle, _, reference = memory_workload
    check_explain(handle, reference, random.Random(4))


def test_explain_difference(memory_workload):
    handle, work, reference = memory_workload
    middle = work.snapshots[len(work.snapshots) // 2]
    one = history_module.explain_difference(handle, 2, at_a=middle.last_position)
    assert one.ok and len(one.explanations) == 1
    assert one.difference == handle.balance(2) - middle.counters[2][1] + middle.counters[2][0]
    assert (one.explanations[0].rows["position"] > middle.last_position).all()
    two = history_module.explain_difference(handle, 2, 3, at_a=middle.last_position)
    assert two.ok and two.difference == balance_of(middle.counters[2]) - handle.balance(3)
    assert two.explanations[1].rows.size == len(reference.positions[3])
    assert "minus account 3" in two.to_text()
    json.dumps(two.to_dict())


def test_cost_is_per_account(memory_workload):
    """No journal scan: balance_at decodes the account's later events plus the ~log2(journal) probes of the
    time-to-position search; history decodes the later events and the window."""
    handle, _, reference = memory_workload
    decoded = []

    class CountingEngine:
        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def decode_events(self, positions):
            decoded.append(len(positions))
            return self.engine.decode_events(positions)

        def batch_headers(self, start=1, end=2**40, limit=1 << 20):
            assert limit == 1, "a walk over batch headers is a journal scan"
            return self.engine.batch_headers(start, end, limit)

    id = 2
    positions = reference.positions[id]
    at = positions[len(positions) * 3 // 4]
    later = sum(1 for position in positions if position > at)
    engine = handle._engine
    handle.store.engine = CountingEngine(engine)
    try:
        history_module.balance_at(handle, id, at)
        assert sum(decoded) == later
        decoded.clear()
        history_module.balance_at(handle, id, At(ns=reference.timestamps[id][len(positions) * 3 // 4]))
        assert sum(decoded) <= later + 2 * engine.write_position.bit_length() + 2
        decoded.clear()
        rows = history_module.history(handle, id, until=at, limit=3)
        assert sum(decoded) == later + len(rows)
    finally:
        handle.store.engine = engine


def test_errors(memory_workload):
    handle, _, reference = memory_workload
    late = max(reference.positions)  # created along the way
    creation = reference.positions[late][0]
    with pytest.raises(KeyError, match=f"account {late} did not exist yet at journal position {creation - 1}"):
        handle.balance(late, at=creation - 1)
    with pytest.raises(KeyError, match="did not exist yet"):
        handle.explain(late, until=creation - 1)
    assert handle.balance(late, at=creation) == 0
    with pytest.raises(KeyError, match="account 999999 not found"):
        handle.history(999_999)
    with pytest.raises(ValueError, match="invalid"):
        handle.history(0)
    with pytest.raises(ValueError, match="after until"):
        handle.history(2, since=10, until=5)
    with pytest.raises(ValueError, match="after until"):
        handle.history(2, since=At(ns=START_NS + 10), until=At(ns=START_NS))
    with pytest.raises(ValueError, match="limit"):
        handle.history(2, limit=-1)
    with pytest.raises(ValueError, match=">= 0"):
        handle.balance(2, at=-1)
    with pytest.raises(TypeError):
        handle.balance(2, at="12")
    with pytest.raises(TypeError):
        handle.balance(2, at=True)
    assert handle.history(2, since=10**9).size == 0  # a window in the future is empty, not an error
    assert handle.history(2, limit=0).size == 0


def test_a_moment_past_the_journal_end_is_an_error(memory_workload):
    """balance(at=) / account_at past the end used to answer with today's balance: a position past the end (a
    typo, or a timestamp read as a position) and a moment in the future are ValueErrors naming the journal's end;
    the end itself (stats()["journal_position"], the next position to be written) is the present."""
    handle, _, _ = memory_workload
    end = handle.stats()["journal_position"]
    assert handle.balance(2, at=end) == handle.balance(2)
    for at in (end + 1, 2**40 - 1, 2**40, 1_700_000_000 * 10**9):
        with pytest.raises(ValueError, match=f"journal position {at} is past the journal's end {end}"):
            handle.balance(2, at=at)
        with pytest.raises(ValueError, match="past the journal's end"):
            history_module.account_at(handle, 2, At(position=at))
    future = time.time_ns() + 3600 * 10**9
    with pytest.raises(ValueError, match=f"{format_ns(future)} is in the future"):
        handle.balance(2, at=At(ns=future))
    with pytest.raises(ValueError, match="in the future"):
        handle.balance(2, at=datetime.datetime(2999, 1, 1))


def test_datetime_moments(memory_workload):
    handle, work, _ = memory_workload
    snapshot = work.snapshots[len(work.snapshots) // 3]
    # A datetime has microseconds: take the snapshot's time rounded down to one, and compare with At(ns=...).
    ns = snapshot.last_timestamp_ns // 1_000 * 1_000
    moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(microseconds=ns // 1000)
    assert handle.balance(2, at=moment) == handle.balance(2, at=At(ns=ns))
    zone = datetime.timezone(datetime.timedelta(hours=-5))
    assert handle.balance(2, at=moment.astimezone(zone)) == handle.balance(2, at=At(ns=ns))


STEP = st.tuples(
    st.sampled_from(["plain", "fund", "pending", "post", "void", "expire", "account"]),
    st.integers(0, 7), st.integers(0, 7), st.integers(1, 300), st.sampled_from([0, 1, 2]),
    st.sampled_from([1, SECOND_NS // 3, SECOND_NS, 4 * SECOND_NS]), st.booleans())


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=1, max_size=25), seed=st.integers(0, 2**16))
def test_as_of_any_position_matches_replay(steps, seed):
    """Hypothesis drives short workloads step by step; every position, every account, and explain over random
    windows must agree with the replay."""
    clock = Clock()
    with ledger.open(None, clock=clock) as handle:
        work = Workload(handle, clock, random.Random(seed))
        work.create_account(SETTLEMENT)
        work.create_account(2)
        for kind, a, b, amount, timeout, advance, linked in steps:
            if kind == "account":
                work.create_account(max(work.account_ids) + 1)
                continue
            debit = work.account_ids[a % len(work.account_ids)]
            credit = work.account_ids[b % len(work.account_ids)]
            if kind == "fund":
                debit, kind = SETTLEMENT, "plain"
            rows = [] if kind == "expire" else [work.row(kind, debit, credit, amount, timeout, a * 8 + b)]
            if linked and rows:  # a chain of two; the second row may fail and undo the first
                rows[0]["flags"] |= int(TransferFlags.LINKED)
                rows.append(work.row("plain", credit, debit, amount, 0, b))
            work.transfers(rows, advance)
        reference = replay(handle)
        check_replay_matches_snapshots(work, reference)
        end = handle.stats()["journal_position"]
        for id in reference.positions:
            for position in range(end + 1):
                expected = reference.counters_through(id, position)
                if expected is not None:
                    assert counters_of(history_module.account_at(handle, id, position)) == expected
            assert history_module.history(handle, id)["position"].tolist() == reference.positions[id]
        check_explain(handle, reference, work.random)


# ---- On disk and the command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def disk_workload(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("history") / "data")
    clock = Clock()
    with ledger.open(directory, create=True, durability="os", clock=clock, segment_records_log2=10) as handle:
        work = random_workload(handle, clock, seed=11, calls=900)  # > 1 segment of 1024 records
    return directory, work


def test_on_disk_after_reopen(disk_workload):
    directory, work = disk_workload
    with ledger.open(directory, readonly=True) as handle:
        assert handle._engine.segment_count > 1
        reference = replay(handle)
        check_replay_matches_snapshots(work, reference)
        rng = random.Random(6)
        check_as_of_recorded_states(handle, work, rng, samples=60)
        check_every_position(handle, reference, rng, samples=20)
        check_history(handle, reference, rng)
        check_explain(handle, reference, rng)


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=REPOSITORY + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ledger", *arguments], capture_output=True, text=True,
                          env=environment, timeout=60, check=False)


def test_cli_through_subprocess(disk_workload):
    directory, work = disk_workload
    middle = work.snapshots[len(work.snapshots) // 2]
    done = run_cli("history", directory, "2", "--json", "--until", str(middle.last_position))
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows and all(row["position"] <= middle.last_position for row in rows)
    assert rows[-1]["balance_after"] == balance_of(middle.counters[2])

    done = run_cli("explain", directory, "2", "--json", "--since", "5")
    assert done.returncode == 0, done.stderr
    explanation = json.loads(done.stdout)
    assert explanation["ok"] and explanation["first_position"] == 5

    done = run_cli("balance", directory, "2", "--json", "--at", f"{middle.last_timestamp_ns}ns")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["balance"] == balance_of(middle.counters[2])

    done = run_cli("balance", directory, "2", "--at", "1999-01-01T00:00:00Z")
    assert done.returncode == 2 and "did not exist yet" in done.stderr and done.stderr.count("\n") == 1
    done = run_cli("history", directory, "424242")
    assert done.returncode == 2 and "not found" in done.stderr and done.stderr.count("\n") == 1


def test_cli_in_process(disk_workload, capsys):
    from ledger import cli

    directory, work = disk_workload
    middle = work.snapshots[len(work.snapshots) // 2]
    assert cli.main(["history", directory, "3", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "position"
    assert cli.main(["explain", directory, "3", "--until", str(middle.last_position)]) == 0
    assert "OK" in capsys.readouterr().out
    moment = format_ns(middle.last_timestamp_ns)
    assert cli.main(["balance", directory, "3", "--at", moment]) == 0
    assert f"balance {balance_of(middle.counters[3]):,}," in capsys.readouterr().out
    assert cli.main(["balance", directory, "3"]) == 0  # the existing form still works
    capsys.readouterr()
    for arguments in (["balance", directory, "3", "--at", "soon"], ["history", directory, "3", "--limit", "-1"],
                      ["history", directory, "3", "--since", "9", "--until", "2"],
                      ["explain", directory, "0"], ["history", directory + "-missing", "3"]):
        assert cli.main(arguments) == 2, arguments
        error = capsys.readouterr().err
        assert error.startswith("ledger: ") and error.count("\n") == 1, error


def test_cli_explains_a_difference_between_two_accounts(disk_workload, capsys):
    from ledger import cli

    directory, work = disk_workload
    middle = work.snapshots[len(work.snapshots) // 2]
    assert cli.main(["explain", directory, "2", "--vs", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    with ledger.open(directory, readonly=True) as handle:
        assert answer["difference"] == handle.balance(2) - handle.balance(3)
        now_3 = handle.balance(3)
    assert answer["ok"] and [side["account"] for side in answer["explanations"]] == [2, 3]
    assert cli.main(["explain", directory, "2", "--vs", "3", "--until", str(middle.last_position),
                     "--vs-until", str(2**40 - 1)]) == 0  # account 3 as of the last position: now
    text = capsys.readouterr().out
    assert f"minus account 3 ({now_3:,} at position" in text
    assert f"({balance_of(middle.counters[2]):,} at position {middle.last_position})" in text
    for arguments in (["explain", directory, "2", "--vs", "3", "--since", "5"],
                      ["explain", directory, "2", "--vs-until", "5"],
                      ["explain", directory, "2", "--vs", "424242"]):
        assert cli.main(arguments) == 2, arguments
        error = capsys.readouterr().err
        assert error.startswith("ledger: ") and error.count("\n") == 1, error
