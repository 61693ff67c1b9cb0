"""The cluster failover campaign (issue 14): node processes of one shard on a LocalCluster, client processes
sending transfers through ledger.connect("nats://..."), and faults at random moments: SIGKILL of the primary node
(`kill_primary_once`) or of the nats-server leading the stream's Raft group (`kill_stream_leader_once`). At the end
`check` reads every node's directory: each acknowledged transfer is there, each request is all or nothing, the
balances are those of exactly the transfers applied (money conserved), verify passes and every node holds the
same journal bytes. bench/cluster_campaign.py runs 200 kills; tests/test_cluster_campaign.py 10 and the server
kill.

A client (`client`, a child process) sends requests of 1 to REQUEST_TRANSFERS_MAX transfers with consecutive
ids from its own FIRST_ID, one call at a time, and appends to its ack log, flushed per line:
`request FIRST COUNT MONOTONIC_NS` before the call, `ok FIRST COUNT MONOTONIC_NS CODES` when it returned
(CODES: the result codes joined by ','; OK or EXISTS are acknowledged), `error FIRST COUNT MONOTONIC_NS CLASS`
when it raised.
Every transfer's accounts and amount are a function of its id (`transfer_of`), so the checker can recompute
every balance from the set of transfers a node holds."""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

import ledger
from ledger.cluster.servers import LocalCluster
from ledger.cluster.status import read_status

SHARD = "campaign"
ACCOUNTS = list(range(1, 9))             # every account may go negative: no transfer is refused for funds
REQUEST_TRANSFERS_MAX = 8
CLIENT_ID_STRIDE = 10**12                 # client k's ids start at (k + 1) * stride: never shared
CLIENT_TIMEOUT_MS = 20_000               # a call's budget, retries included: longer than any failover here
CLIENT_PAUSE_S = 0.002                    # between calls: load, not a busy loop on two shared cores
FAILOVER_WAIT_S = 30.0                    # a kill with no acknowledgement after it within this is a violation
START_WAIT_S = 30.0
STOP_WAIT_S = 30.0
CONVERGE_WAIT_S = 60.0
POLL_S = 0.05
REPORT_FRESH_S = 3.0                      # a node report younger than this is from a node that runs
SUPPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cluster_processes.py")
ACKNOWLEDGED_CODES = (int(ledger.TransferResult.OK), int(ledger.TransferResult.EXISTS))


def transfer_of(transfer_id: int) -> tuple[int, int, int]:
    """(debit account, credit account, amount) of transfer `transfer_id`: a function of the id alone."""
    debit = transfer_id % len(ACCOUNTS)
    credit = (debit + 1 + (transfer_id // len(ACCOUNTS)) % (len(ACCOUNTS) - 1)) % len(ACCOUNTS)
    assert debit != credit
    return ACCOUNTS[debit], ACCOUNTS[credit], 1 + transfer_id % 97


def request_batch(first: int, count: int) -> np.ndarray:
    """The transfers of one client request: ids first .. first+count-1."""
    batch = ledger.transfers_batch(count)
    for row, transfer_id in enumerate(range(first, first + count)):
        debit, credit, amount = transfer_of(transfer_id)
        batch[row]["id"], batch[row]["debit_account"], batch[row]["credit_account"] = transfer_id, debit, credit
        batch[row]["amount"], batch[row]["ledger"] = amount, 1
    return batch


def client(url: str, shard: str, first_id: int, ack_log: str, seed: int) -> None:
    """The client child's loop (see the module docstring); SIGTERM ends it after the call in progress."""
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    rng = random.Random(seed)
    next_id = first_id
    with ledger.connect(url, shard=shard, timeout_ms=CLIENT_TIMEOUT_MS) as connection, \
            open(ack_log, "a", buffering=1) as log:
        print("ready", flush=True)
        while not stopping.is_set():
            count = rng.randint(1, REQUEST_TRANSFERS_MAX)
            log.write(f"request {next_id} {count} {time.monotonic_ns()}\n")
            try:
                codes = connection.transfers(request_batch(next_id, count))
            except ledger.LedgerError as error:
                log.write(f"error {next_id} {count} {time.monotonic_ns()} {type(error).__name__}\n")
            else:
                log.write(f"ok {next_id} {count} {time.monotonic_ns()} {','.join(str(int(c)) for c in codes)}\n")
            next_id += count
            stopping.wait(CLIENT_PAUSE_S)


@dataclasses.dataclass
class AckLog:
    """One client's log, parsed: requests (first, count), acknowledged ones (first, count, answered ns, sent
    ns), errors, and answers with codes other than OK or EXISTS."""
    requests: list[tuple[int, int]]
    acknowledged: list[tuple[int, int, int, int]]
    errors: list[tuple[int, int, int, str]]
    bad_codes: list[tuple[int, str]]


class AckReader:
    """A client's ack log read as it grows: `update()` parses the complete lines written since the last call
    (a torn last line, the client still writing it, waits for the next) into `log`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.log = AckLog([], [], [], [])
        self.sent_ns: dict[int, int] = {}   # the requests in progress: first id -> when it was sent

    def update(self) -> AckLog:
        if not os.path.exists(self.path):
            return self.log
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            data = file.read()
        complete = data.rfind(b"\n") + 1
        self.offset += complete
        for line in data[:complete].decode().split("\n")[:-1]:
            self._parse(line.split())
        return self.log

    def _parse(self, fields: list[str]) -> None:
        parsed = self.log
        if fields[0] == "request" and len(fields) == 4:
            parsed.requests.append((int(fields[1]), int(fields[2])))
            self.sent_ns[int(fields[1])] = int(fields[3])
        elif fields[0] == "ok" and len(fields) == 5:
            first, count, at = int(fields[1]), int(fields[2]), int(fields[3])
            codes = [int(code) for code in fields[4].split(",")]
            if len(codes) == count and all(code in ACKNOWLEDGED_CODES for code in codes):
                parsed.acknowledged.append((first, count, at, self.sent_ns.pop(first)))
            else:
                parsed.bad_codes.append((first, fields[4]))
        elif fields[0] == "error" and len(fields) == 5:
            parsed.errors.append((int(fields[1]), int(fields[2]), int(fields[3]), fields[4]))
            self.sent_ns.pop(int(fields[1]))
        else:
            raise AssertionError(f"{self.path}: a line the client never writes: {' '.join(fields)!r}")


def spawn(arguments: list[str], stderr_path: str) -> subprocess.Popen:
    """A child running `python ARGUMENTS...`, its stderr appended to `stderr_path`."""
    with open(stderr_path, "a") as stderr:
        return subprocess.Popen([sys.executable, *arguments], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def wait_for(condition: Callable[[], object], timeout_s: float, pause_s: float = POLL_S) -> object:
    """condition()'s first true value within `timeout_s`, else None."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(pause_s)


def stop(child: subprocess.Popen, timeout_s: float = STOP_WAIT_S, signalled: bool = False) -> str | None:
    """SIGTERM `child` (unless `signalled` already: a second one could find the default handler back, as the
    process exits) and reap it; SIGKILL after `timeout_s`. None if it exited on its own with status 0, else what
    went wrong."""
    if child.poll() is None and not signalled:
        child.send_signal(signal.SIGTERM)
    try:
        status = child.wait(timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        return f"still running {timeout_s:g} s after SIGTERM (killed)"
    return None if status == 0 else f"exit status {status}"


class Campaign:
    """The processes of one campaign in `scratch`: call start(), then faults, then finish() (which checks).
    `violations` collects every broken promise, each one a sentence; `failovers_s` the time from each fault to
    the first acknowledgement after it."""

    def __init__(self, cluster: LocalCluster, scratch: str, nodes: int = 3, clients: int = 2,
                 say: Callable[[str], None] = print) -> None:
        assert 2 <= nodes <= 5 and 1 <= clients <= 4, (nodes, clients)
        self.cluster = cluster
        self.scratch = scratch
        self.node_names = [f"node{index}" for index in range(nodes)]
        self.client_count = clients
        self.say = say
        self.nodes: dict[str, subprocess.Popen] = {}
        self.clients: list[subprocess.Popen] = []
        self.violations: list[str] = []
        self.failovers_s: list[float] = []
        self.faults = 0
        self.readers: list[AckReader] = []

    def path(self, name: str) -> str:
        return os.path.join(self.scratch, name)

    def ack_log(self, index: int) -> str:
        return self.path(f"client{index}.acks")

    def start_node(self, name: str) -> None:
        """Node `name` as a user runs one: `ledger serve DIR --cluster URL --shard NAME --node NAME`."""
        command = ["-m", "ledger", "serve", self.path(name), "--create", "--cluster", self.cluster.url, "--shard",
                   SHARD, "--node", name]
        self.nodes[name] = spawn(command, self.path(f"{name}.stderr"))

    def shard_status(self):
        try:
            shards = read_status(self.cluster.url, shard=SHARD).shards
        except ledger.LedgerError:
            return None     # a server just killed: asked again by the caller's poll
        return shards[0] if shards else None

    def primary(self) -> str | None:
        """The node holding the lease, if it is one of ours that runs."""
        status = self.shard_status()
        name = status.primary if status is not None else None
        child = self.nodes.get(name) if name is not None else None
        return name if child is not None and child.poll() is None else None

    def start(self) -> None:
        """Nodes, the first one the primary; the accounts; the clients, once each has an acknowledgement."""
        self.start_node(self.node_names[0])
        if wait_for(self.primary, START_WAIT_S) is None:
            raise RuntimeError(f"no primary within {START_WAIT_S} s: {self.tail(self.node_names[0])}")
        for name in self.node_names[1:]:
            self.start_node(name)
        if not wait_for(lambda: len(self.standbys()) == len(self.node_names) - 1, START_WAIT_S):
            raise RuntimeError(f"the standbys did not start within {START_WAIT_S} s: " +
                               "; ".join(f"{name}: {self.tail(name)}" for name in self.node_names[1:]))
        with ledger.connect(self.cluster.url, shard=SHARD, timeout_ms=CLIENT_TIMEOUT_MS) as connection:
            accounts = ledger.accounts_batch(len(ACCOUNTS))
            accounts["id"], accounts["ledger"] = ACCOUNTS, 1
            accounts["min_balance"], accounts["max_balance"] = ledger.BALANCE_MIN, ledger.BALANCE_MAX
            codes = connection.create_accounts(accounts)
            assert all(int(code) == int(ledger.AccountResult.OK) for code in codes), codes
        for index in range(self.client_count):
            self.readers.append(AckReader(self.ack_log(index)))
            self.clients.append(spawn([SUPPORT, "client", self.cluster.url, SHARD, str((index + 1) * CLIENT_ID_STRIDE),
                                       self.ack_log(index), str(index)], self.path(f"client{index}.stderr")))
        if not wait_for(lambda: all(reader.update().acknowledged for reader in self.readers), START_WAIT_S):
            raise RuntimeError(f"the clients acknowledged nothing within {START_WAIT_S} s")

    def tail(self, name: str) -> str:
        with open(self.path(f"{name}.stderr")) as file:
            return file.read()[-2000:]

    def wait_acknowledgement_after(self, fault_ns: int, what: str) -> None:
        """Record the failover time of the fault at `fault_ns`: to the first acknowledgement of a request sent
        after it (an answer already on its way at the fault says nothing of the failover; the requests in
        progress then are answered first, so this counts one request's latency more than the failover)."""
        def first_after() -> int | None:
            found = []
            for reader in self.readers:
                acknowledged = reader.update().acknowledged
                index = len(acknowledged)
                while index > 0 and acknowledged[index - 1][3] > fault_ns:   # the newest are at the end
                    index -= 1
                found += [at for _, _, at, _ in acknowledged[index:]]
            return min(found) if found else None
        first = wait_for(first_after, FAILOVER_WAIT_S, pause_s=0.02)
        if first is None:
            self.violations.append(f"{what}: no transfer acknowledged within {FAILOVER_WAIT_S} s")
            return
        self.failovers_s.append((first - fault_ns) / 1e9)

    # -- faults --

    def standbys(self) -> set[str]:
        status = self.shard_status()
        return {node.node for node in status.nodes if node.role == "standby" and node.age_s is not None and
                node.age_s < REPORT_FRESH_S} if status is not None else set()

    def kill_primary_once(self, rng: random.Random, pause_s: tuple[float, float], standbys_min: int) -> None:
        """After a random pause, once `standbys_min` nodes are standbys (the node restarted after the last kill
        among them, or not yet), SIGKILL the primary node, wait for the next acknowledgement, restart it."""
        time.sleep(rng.uniform(*pause_s))
        name = wait_for(self.primary, FAILOVER_WAIT_S)
        if name is None:
            self.violations.append(f"kill {self.faults + 1}: no primary within {FAILOVER_WAIT_S} s")
            return
        if not wait_for(lambda: len(self.standbys() - {name}) >= standbys_min, START_WAIT_S):
            self.violations.append(f"kill {self.faults + 1}: fewer than {standbys_min} standbys within "
                                   f"{START_WAIT_S} s: {sorted(self.standbys())}")
        child = self.nodes[name]
        child.kill()
        fault_ns = time.monotonic_ns()
        child.wait()
        self.faults += 1
        self.wait_acknowledgement_after(fault_ns, f"kill {self.faults} (primary {name})")
        self.start_node(name)    # rejoins as a standby

    def kill_stream_leader_once(self) -> str:
        """SIGKILL the nats-server leading the stream's Raft group, wait for the next acknowledgement, restart
        the server and wait until it is ready. Returns the killed server's name."""
        status = wait_for(lambda: (s := self.shard_status()) is not None and s.stream is not None and
                          s.stream.leader is not None and s, START_WAIT_S)
        assert status, "the stream has no leader"
        leader = status.stream.leader
        index = [spec.name for spec in self.cluster.servers].index(leader)
        self.cluster.kill(index)
        fault_ns = time.monotonic_ns()
        self.faults += 1
        self.wait_acknowledgement_after(fault_ns, f"kill of nats-server {leader} (the stream's leader)")
        self.cluster.start(index)
        return leader

    def stream_current(self) -> bool:
        """Whether every replica of the stream is online and current (the restarted server caught up)."""
        status = self.shard_status()
        stream = status.stream if status is not None else None
        return (stream is not None and len(stream.replicas) == len(self.cluster.servers)
                and all(replica.current and not replica.offline for replica in stream.replicas))

    # -- the end --

    def kill_all(self) -> None:
        """SIGKILL every child still running (a campaign that failed half way), by its own Popen."""
        for child in [*self.clients, *self.nodes.values()]:
            if child.poll() is None:
                child.kill()
                child.wait()

    def converged(self) -> bool:
        """Whether every node reports the stream's end position (and one of them is the primary)."""
        status = self.shard_status()
        if status is None or status.stream is None or status.primary is None:
            return False
        reports = {node.node: node for node in status.nodes if node.age_s is not None and node.age_s < REPORT_FRESH_S}
        return all(name in reports and reports[name].position == status.stream.end_position and
                   reports[name].role in ("primary", "standby") for name in self.node_names)

    def finish(self) -> dict:
        """Stop the clients, wait for the nodes to converge, stop them, check every node; the summary."""
        for child in self.clients:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)   # all at once: each ends after its call in progress
        for index, child in enumerate(self.clients):
            if (trouble := stop(child, signalled=True)) is not None:
                self.violations.append(f"client {index} did not stop cleanly ({trouble}): "
                                       f"{self.tail(f'client{index}')}")
        for reader in self.readers:
            reader.update()
        if not wait_for(self.converged, CONVERGE_WAIT_S, pause_s=0.2):
            status = self.shard_status()
            seen = "no status" if status is None else (
                f"stream ends at {status.stream.end_position if status.stream else None}, primary "
                f"{status.primary}; " + ", ".join(f"{node.node} {node.role} at {node.position} ({node.error})"
                                                   for node in status.nodes))
            self.violations.append(f"the nodes did not converge within {CONVERGE_WAIT_S} s: {seen}; " +
                                   "; ".join(f"{name}: {self.tail(name)[-600:]}" for name in self.node_names))
        for child in self.nodes.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for name, child in self.nodes.items():
            if (trouble := stop(child, signalled=True)) is not None:
                self.violations.append(f"node {name} did not stop cleanly ({trouble}): {self.tail(name)}")
        self.check()
        return self.summary()

    def requests(self) -> tuple[list[tuple[int, int]], list[tuple[int, int, int, int]]]:
        """Every request the clients sent (first, count), and the acknowledged ones (see AckLog)."""
        sent = [request for reader in self.readers for request in reader.log.requests]
        acknowledged = [request for reader in self.readers for request in reader.log.acknowledged]
        for reader in self.readers:
            for first, codes in reader.log.bad_codes:
                self.violations.append(f"request {first} answered codes {codes} (neither OK nor EXISTS)")
        return sent, acknowledged

    def check(self) -> None:
        """Every node's directory: verify passes, the same journal bytes, and (check_node) the transfers."""
        sent, acknowledged = self.requests()
        reference = None
        for name in self.node_names:
            with ledger.open(self.path(name), readonly=True) as handle:
                report = handle.verify()
                if not report.ok:
                    self.violations.append(f"node {name}: verify failed: {report}")
                position = handle.stats()["journal_position"]
                data = handle.store.batch_bytes(1, position)
                if reference is None:
                    reference = (name, data)
                    self.check_node(name, handle, sent, acknowledged)
                elif data != reference[1]:
                    shorter = min(len(data), len(reference[1]))
                    relation = "is a prefix of" if data[:shorter] == reference[1][:shorter] else "differs from"
                    self.violations.append(f"node {name}: its journal ({position - 1} events) {relation} node "
                                           f"{reference[0]}'s ({len(reference[1]) // 64} events)")

    def check_node(self, name: str, handle: ledger.Ledger, sent: list[tuple[int, int]],
                   acknowledged: list[tuple[int, int, int, int]]) -> None:
        """On node `name`: every acknowledged request whole, every request all or nothing, each transfer as the
        client made it, and each balance that of exactly the transfers held (money conserved)."""
        firsts = np.array([first for first, _ in sent], np.uint64)
        counts = np.array([count for _, count in sent], np.int64)
        ids = np.concatenate([np.arange(first, first + count, dtype=np.uint64) for first, count in sent])
        records = handle.lookup_transfers(ids)
        found = records["state"] != ledger.TransferState.NOT_FOUND
        held = np.add.reduceat(found.astype(np.int64), np.concatenate([[0], np.cumsum(counts)[:-1]]))
        half = np.flatnonzero((held != 0) & (held != counts))
        for index in half[:5]:
            self.violations.append(f"node {name}: request {firsts[index]} is half there: {held[index]} of "
                                   f"{counts[index]} transfers")
        whole = dict(zip(firsts.tolist(), (held == counts).tolist()))
        lost = [first for first, _, _, _ in acknowledged if not whole.get(first, False)]
        if lost:
            self.violations.append(f"node {name}: {len(lost)} acknowledged requests lost, the first {lost[:5]}")
        mine = ids[found].astype(np.int64)
        debit, amount = mine % len(ACCOUNTS), 1 + mine % 97
        credit = (debit + 1 + (mine // len(ACCOUNTS)) % (len(ACCOUNTS) - 1)) % len(ACCOUNTS)
        kept = records[found]
        if not (np.array_equal(kept["debit_account"].astype(np.int64), debit + 1) and
                np.array_equal(kept["credit_account"].astype(np.int64), credit + 1) and
                np.array_equal(kept["amount"], amount)):
            self.violations.append(f"node {name}: a transfer's accounts or amount differ from the client's")
        expected = np.zeros(len(ACCOUNTS), np.int64)
        np.add.at(expected, credit, amount)
        np.subtract.at(expected, debit, amount)
        accounts = handle.accounts()
        accounts = accounts[np.argsort(accounts["id"])]
        balances = accounts["credits_posted"].astype(np.int64) - accounts["debits_posted"].astype(np.int64)
        if int(balances.sum()) != 0 or not np.array_equal(balances, expected):
            self.violations.append(f"node {name}: balances {balances.tolist()} are not those of the "
                                   f"{len(mine)} transfers held ({expected.tolist()}): money not conserved")
        self.transfers_held = int(found.sum())

    def summary(self) -> dict:
        """Faults, acknowledged transfers, failover times (min/median/max), the longest gap between
        acknowledgements, violations."""
        _, acknowledged = self.requests()
        times = sorted(at for _, _, at, _ in acknowledged)
        gaps = np.diff(np.array(times, np.int64)) / 1e9 if len(times) > 1 else np.zeros(1)
        failovers = self.failovers_s or [float("nan")]
        return {"faults": self.faults, "failovers_s": list(self.failovers_s),
                "acknowledged_requests": len(acknowledged),
                "acknowledged_transfers": sum(count for _, count, _, _ in acknowledged),
                "transfers_held": getattr(self, "transfers_held", 0),
                "failover_s_min": min(failovers), "failover_s_median": statistics.median(failovers),
                "failover_s_max": max(failovers), "longest_gap_s": float(gaps.max()),
                "run_s": (times[-1] - times[0]) / 1e9 if times else 0.0,
                "violations": list(dict.fromkeys(self.violations))}


def summary_text(summary: dict) -> str:
    """The campaign's figures in a few lines."""
    return (f"{summary['faults']} faults, {summary['acknowledged_transfers']} transfers acknowledged in "
            f"{summary['acknowledged_requests']} requests ({summary['transfers_held']} held), over "
            f"{summary['run_s']:.0f} s\n"
            f"failover (fault -> first acknowledgement after it): min {summary['failover_s_min']:.2f} s, median "
            f"{summary['failover_s_median']:.2f} s, max {summary['failover_s_max']:.2f} s\n"
            f"longest gap between acknowledgements: {summary['longest_gap_s']:.2f} s\n"
            f"violations: {len(summary['violations'])}" +
            "".join(f"\n  {violation}" for violation in summary["violations"]))


def run(kills: int, seed: int, scratch: str, nodes: int = 3, clients: int = 2,
        pause_s: tuple[float, float] = (0.5, 2.0), standbys_min: int | None = None,
        say: Callable[[str], None] = print) -> dict:
    """The primary-kill campaign: `kills` SIGKILLs of the primary at random moments, each once `standbys_min`
    (default: every other node, the one restarted last included) are standbys; the summary."""
    standbys_min = nodes - 1 if standbys_min is None else standbys_min
    assert 1 <= standbys_min <= nodes - 1, (standbys_min, nodes)
    rng = random.Random(seed)
    with LocalCluster(os.path.join(scratch, "nats"), nodes=3, port=0) as cluster:
        campaign = Campaign(cluster, scratch, nodes, clients, say)
        try:
            began = time.monotonic()
            campaign.start()
            started = time.monotonic()
            say(f"cluster, {nodes} nodes and {clients} clients started in {started - began:.1f} s")
            for kill in range(1, kills + 1):
                campaign.kill_primary_once(rng, pause_s, standbys_min)
                if kill % 10 == 0 or kill == kills:
                    last = campaign.failovers_s[-1] if campaign.failovers_s else float("nan")
                    say(f"{kill}/{kills} kills, last failover {last:.2f} s, {len(campaign.violations)} violations, "
                        f"{time.monotonic() - started:.0f} s")
            finishing = time.monotonic()
            summary = campaign.finish()
            say(f"clients stopped, nodes converged, stopped and checked in {time.monotonic() - finishing:.1f} s")
            return summary
        finally:
            campaign.kill_all()
