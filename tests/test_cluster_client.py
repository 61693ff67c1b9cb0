"""Clients over NATS (ledger.cluster.client, ledger.aio) against a Service (ledger.cluster.service) on a real
Ledger, on a real single-node LocalCluster: every call answers as the in-process Ledger does for the same calls;
bad input fails as in the ring client; concurrent calls are coalesced; a call outlives a service restart within
its timeout with exactly-once effects; no service means LedgerUnavailableError, bounded by timeout_ms; the
asyncio client; standby reads with their position; the wire format's refusals."""
from __future__ import annotations

import asyncio
import datetime
import itertools
import threading
import time

import nats
import numpy as np
import pytest

import ledger
import ledger.aio
from ledger.cluster import names
from ledger.cluster.client import Read
from ledger.cluster.servers import LocalCluster
from ledger.cluster.service import Service
from ledger.ring import Server
from support.clock import Clock

TIMEOUT_MS = 5_000
HANG_GUARD_S = 20.0
SHARDS = (f"test{number}" for number in itertools.count())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("nats"), nodes=1, port=0) as running:
        yield running


class Served:
    """A Ledger on disk behind a Service on its own shard, a client of it, and an in-memory reference Ledger
    fed the same calls (the same injected clock: the same timestamps)."""

    def __init__(self, cluster: LocalCluster, path: str, durability: str = "fsync") -> None:
        self.cluster = cluster
        self.shard = next(SHARDS)
        self.ledger = ledger.open(path, create=True, clock=Clock(), durability=durability)
        self.reference = ledger.open(None, clock=Clock())
        self.service = Service(self.ledger, cluster.url, self.shard)
        self.service.start()
        self.client = ledger.connect(cluster.url, shard=self.shard, timeout_ms=TIMEOUT_MS)

    def close(self) -> None:
        self.client.close()
        self.service.stop()
        self.ledger.close()
        self.reference.close()


@pytest.fixture
def served(cluster, tmp_path):
    setup = Served(cluster, str(tmp_path / "ledger"))
    yield setup
    setup.close()


def both(served: Served, method: str, *arguments, **keywords):
    """The call on the client and on the reference Ledger: (client's answer, reference's answer)."""
    return (getattr(served.client, method)(*arguments, **keywords),
            getattr(served.reference, method)(*arguments, **keywords))


def fund(served: Served) -> None:
    for call in ((1,), (2,), (3,)):
        minimum = ledger.BALANCE_MIN if call == (1,) else 0
        remote, local = both(served, "create_account", *call, min_balance=minimum)
        assert remote == local == ledger.AccountResult.OK


def test_every_call_answers_as_the_in_process_ledger(served):
    fund(served)
    assert both(served, "create_account", 2) == (ledger.AccountResult.EXISTS,) * 2
    assert both(served, "transfer", 10, 1, 2, 500) == (ledger.TransferResult.OK,) * 2
    assert both(served, "transfer", 10, 1, 2, 500) == (ledger.TransferResult.EXISTS,) * 2
    assert both(served, "transfer", 11, 2, 3, 900) == (ledger.TransferResult.INSUFFICIENT_FUNDS,) * 2
    assert both(served, "transfer", 12, 2, 3, 100, flags=ledger.TransferFlags.PENDING, timeout=60)[0] == 0
    batch = ledger.transfers_batch(4)
    batch["id"] = [20, 21, 22, 23]
    batch["debit_account"] = [1, 1, 3, 1]
    batch["credit_account"] = [2, 3, 2, 9]
    batch["amount"] = [5, 6, 7, 8]
    batch["flags"] = [ledger.TransferFlags.LINKED, 0, 0, 0]
    remote, local = both(served, "transfers", batch)
    assert remote.dtype == np.uint8 and remote.tolist() == local.tolist()
    accounts = ledger.accounts_batch(2)
    accounts["id"] = [4, 0]
    remote, local = both(served, "create_accounts", accounts)
    assert remote.tolist() == local.tolist() == [ledger.AccountResult.OK, ledger.AccountResult.ID_INVALID]
    for id_ in (1, 2, 3, 4, 99):
        assert both(served, "account", id_)[0] == both(served, "account", id_)[1]
    for id_ in (1, 2, 3):
        assert both(served, "balance", id_)[0] == served.reference.balance(id_)
        assert both(served, "available", id_)[0] == served.reference.available(id_)
    remote, local = both(served, "lookup_transfers", [10, 12, 20, 21, 77])
    assert remote.dtype == local.dtype and remote.tobytes() == local.tobytes()
    for id_ in (1, 2):
        for keywords in ({}, {"limit": 1}, {"since": 3}, {"until": ledger.At(position=5)},
                         {"since": ledger.At(ns=Clock().t + 1)}, {"until": datetime.datetime(2030, 1, 1)}):
            remote, local = both(served, "history", id_, **keywords)
            assert remote.dtype == local.dtype and remote.tobytes() == local.tobytes(), keywords
    assert both(served, "transfers", ledger.transfers_batch(0))[0].shape == (0,)


def test_errors_of_the_service_are_raised_as_their_own_class(served):
    fund(served)
    for method, arguments in (("balance", (77,)), ("available", (77,)), ("history", (77,)), ("history", (True,)),
                              ("history", (0,)), ("history", (1, None, None, -1))):
        errors = []
        for handle in (served.client, served.reference):
            with pytest.raises(Exception) as caught:
                getattr(handle, method)(*arguments)
            errors.append((type(caught.value), str(caught.value)))
        assert errors[0] == errors[1], (method, arguments)


@pytest.fixture(scope="module")
def ring_client(tmp_path_factory):
    server = Server(str(tmp_path_factory.mktemp("ring") / "data"), durability="os", slot_count=64)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = ledger.connect(server.directory, timeout_ms=TIMEOUT_MS)
    yield client
    client.close()
    server.stop()
    thread.join(HANG_GUARD_S)


BAD_CALLS = [
    ("transfer", (1.5, 1, 2, 3), {}), ("transfer", (-1, 1, 2, 3), {}), ("transfer", (1, 1, 2, 2**63), {}),
    ("transfer", (1, 1, 2, 3), {"code": 2**16}), ("transfer", (1, "1", 2, 3), {}),
    ("create_account", ("x",), {}), ("create_account", (1,), {"max_balance": 2**63}),
    ("transfers", (np.zeros(3),), {}), ("transfers", ([1, 2],), {}), ("transfers", ({"bogus": [1]},), {}),
    ("transfers", (ledger.transfers_batch(4)[::2],), {}), ("transfers", ({"amount": [1.5]},), {}),
    ("create_accounts", (ledger.transfers_batch(1),), {}), ("account", (-1,), {}), ("account", (2**64,), {}),
    ("balance", (999,), {}), ("available", (None,), {}),
]


@pytest.mark.parametrize("method, arguments, keywords", BAD_CALLS)
def test_bad_input_fails_as_in_the_ring_client(served, ring_client, method, arguments, keywords):
    errors = []
    for handle in (served.client, ring_client):
        with pytest.raises(Exception) as caught:
            getattr(handle, method)(*arguments, **keywords)
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]


def test_a_batch_past_the_request_limit_is_refused_before_it_is_sent(served):
    with pytest.raises(ValueError, match=f"at most {names.REQUEST_ROWS_MAX} rows"):
        served.client.transfers(ledger.transfers_batch(names.REQUEST_ROWS_MAX + 1))
    assert served.service.requests == 0


def test_threads_sharing_a_client_share_requests_and_batches(cluster, tmp_path):
    served = Served(cluster, str(tmp_path / "ledger"))
    try:
        fund(served)
        threads_count, calls = 8, 500
        results: list[int] = []

        def work(number: int) -> None:
            first = 1000 + number * calls
            results.extend(int(served.client.transfer(id_, 1, 2, 1)) for id_ in range(first, first + calls))

        threads = [threading.Thread(target=work, args=(number,)) for number in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG_GUARD_S)
        assert results == [ledger.TransferResult.OK] * (threads_count * calls)
        assert served.client.balance(2) == threads_count * calls
        total = threads_count * calls + 3   # three account calls
        assert served.client.requests_sent < total
        assert served.service.core_calls < total
        batches = journal_batches(served.ledger.path)
        print(f"{total} calls: {served.client.requests_sent} requests, {served.service.core_calls} core calls, "
              f"{batches} journal batches")
        assert batches == served.service.core_calls
    finally:
        served.close()


def test_the_service_joins_the_requests_of_several_clients(cluster, tmp_path):
    served = Served(cluster, str(tmp_path / "ledger"))
    clients = [ledger.connect(cluster.url, shard=served.shard, timeout_ms=TIMEOUT_MS) for _ in range(4)]
    try:
        fund(served)
        requests_before = served.service.requests

        def work(client, first: int) -> None:
            for id_ in range(first, first + 100):
                assert client.transfer(id_, 1, 2, 1) == ledger.TransferResult.OK

        threads = [threading.Thread(target=work, args=(client, 10_000 + 1000 * number + 100 * index))
                   for number, client in enumerate(clients) for index in range(3)]
        core_calls_before = served.service.core_calls
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG_GUARD_S)
        requests = served.service.requests - requests_before
        core_calls = served.service.core_calls - core_calls_before
        print(f"{len(threads) * 100} calls from 4 clients: {requests} requests, {core_calls} core calls")
        assert core_calls < requests <= len(threads) * 100
        assert served.client.balance(2) == len(threads) * 100
    finally:
        for client in clients:
            client.close()
        served.close()


def test_a_full_service_queue_answers_busy_and_clients_retry(cluster, tmp_path):
    served = Served(cluster, str(tmp_path / "ledger"))
    served.service.stop()
    served.service = Service(served.ledger, cluster.url, served.shard, queue_requests_max=1)
    served.service.start()
    clients = [ledger.connect(cluster.url, shard=served.shard, timeout_ms=TIMEOUT_MS) for _ in range(4)]
    try:
        fund(served)
        results: list[int] = []

        def work(client, first: int) -> None:
            results.extend(int(client.transfer(id_, 1, 2, 1)) for id_ in range(first, first + 30))

        threads = [threading.Thread(target=work, args=(client, 20_000 + 1000 * number + 100 * index))
                   for number, client in enumerate(clients) for index in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HANG_GUARD_S)
        assert results == [ledger.TransferResult.OK] * 360
        assert served.service.refused > 0   # busy answers were sent, and retried
        assert served.client.balance(2) == 360
    finally:
        for client in clients:
            client.close()
        served.close()


def test_a_restart_under_load_loses_nothing_and_applies_nothing_twice(served):
    fund(served)
    results: list[int] = []

    def work(first: int) -> None:
        results.extend(int(served.client.transfer(id_, 1, 2, 1)) for id_ in range(first, first + 150))

    threads = [threading.Thread(target=work, args=(5000 + 1000 * number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    served.service.stop()   # answers what it accepted; the rest meet no responders and retry
    time.sleep(0.3)
    served.service = Service(served.ledger, served.cluster.url, served.shard)
    served.service.start()
    for thread in threads:
        thread.join(HANG_GUARD_S)
    assert len(results) == 600
    assert set(results) <= {ledger.TransferResult.OK, ledger.TransferResult.EXISTS}
    assert served.client.balance(2) == 600   # each transfer applied exactly once
    ids = [5000 + 1000 * number + index for number in range(4) for index in range(150)]
    assert (served.client.lookup_transfers(ids)["state"] == ledger.TransferState.POSTED).all()


def journal_batches(path: str) -> int:
    with ledger.Tailer(path, follow=False) as tailer:
        for _ in tailer:
            pass
        return tailer.batches_read


def test_calls_retry_through_a_service_restart_with_exactly_once_effects(served):
    fund(served)
    batch = ledger.transfers_batch(3)
    batch["id"] = [30, 31, 32]
    batch["debit_account"] = 1
    batch["credit_account"] = 2
    batch["amount"] = 10
    assert not served.client.transfers(batch).any()
    served.service.stop()
    outcomes: dict[str, object] = {}

    def resend() -> None:   # the caller never heard the answer: the same ids again
        started = time.monotonic()
        outcomes["resent"] = served.client.transfers(batch).tolist()
        outcomes["new"] = served.client.transfer(33, 1, 2, 10)
        outcomes["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=resend)
    thread.start()
    time.sleep(0.5)   # the calls find no responders meanwhile and retry
    assert thread.is_alive()
    served.service.start()   # the same Service again, as a node that becomes primary once more
    thread.join(HANG_GUARD_S)
    assert outcomes["resent"] == [ledger.TransferResult.EXISTS] * 3
    assert outcomes["new"] == ledger.TransferResult.OK
    # Found within a back-off (at most RETRY_BACKOFF_S_MAX) of the restart, not at the end of the budget.
    assert 0.5 <= outcomes["seconds"] < 0.5 + names.RETRY_BACKOFF_S_MAX + 0.5, outcomes["seconds"]
    assert served.client.balance(2) == 40


GIVE_UP_SLACK_S = 3.0


def test_no_service_means_unavailable_within_the_timeout(cluster):
    """No service: the call gives up with LedgerUnavailableError instead of retrying forever. A liveness check,
    not a speed: the call runs on a thread that must have ended once its budget and GIVE_UP_SLACK_S passed
    (that it retries through its budget is shown by the restart tests)."""
    for timeout_ms in (300, 1000):
        with ledger.connect(cluster.url, shard=next(SHARDS), timeout_ms=timeout_ms) as client:
            for call in (lambda: client.transfer(1, 1, 2, 1), lambda: client.balance(1)):
                raised: list[BaseException] = []

                def run(call=call) -> None:
                    try:
                        call()
                    except BaseException as error:
                        raised.append(error)
                caller = threading.Thread(target=run)
                caller.start()
                caller.join(timeout_ms / 1000 + GIVE_UP_SLACK_S)
                assert not caller.is_alive(), f"a call with timeout_ms={timeout_ms} still retrying"
                assert len(raised) == 1 and isinstance(raised[0], ledger.LedgerUnavailableError), raised
                assert "retry with the same ids" in str(raised[0])


def test_closing_a_client_ends_its_calls_in_progress(cluster):
    client = ledger.connect(cluster.url, shard=next(SHARDS), timeout_ms=TIMEOUT_MS)
    outcome: dict[str, object] = {}

    def call() -> None:   # no service: it retries until the client is closed
        started = time.monotonic()
        try:
            client.transfer(1, 1, 2, 1)
        except ledger.LedgerError as error:
            outcome["error"], outcome["seconds"] = type(error), time.monotonic() - started

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.3)
    client.close()
    thread.join(HANG_GUARD_S)
    assert outcome["error"] is ledger.LedgerClosedError and outcome["seconds"] < 1.5, outcome
    with pytest.raises(ledger.LedgerClosedError):
        client.balance(1)
    client.close()   # idempotent


def test_no_nats_server_is_unavailable_at_connect():
    with pytest.raises(ledger.LedgerUnavailableError, match="no NATS server"):
        ledger.connect("nats://127.0.0.1:1", shard="x", timeout_ms=100)


def test_the_asyncio_client(served):
    fund(served)

    async def main() -> None:
        async with await ledger.aio.connect(served.cluster.url, shard=served.shard) as client:
            results = await asyncio.gather(*(client.transfer(100 + n, 1, 2, 3) for n in range(50)))
            assert results == [ledger.TransferResult.OK] * 50
            assert client.requests_sent < 50
            open_chain = ledger.transfers_batch(2)
            open_chain["id"] = [200, 201]
            open_chain["debit_account"] = 1
            open_chain["credit_account"] = 2
            open_chain["amount"] = 1
            open_chain["flags"] = ledger.TransferFlags.LINKED
            chained, single = await asyncio.gather(client.transfers(open_chain), client.transfer(202, 1, 2, 1))
            # As alone: the open chain fails by itself, the other caller's transfer does not join it.
            assert chained.tolist() == [ledger.TransferResult.LINKED_EVENT_FAILED,
                                        ledger.TransferResult.LINKED_CHAIN_OPEN]
            assert single == ledger.TransferResult.OK
            assert await client.balance(2) == 151
            assert await client.account(77) is None
            rows = await client.history(2, limit=2)
            assert rows.tobytes() == served.ledger.history(2, limit=2).tobytes()
            with pytest.raises(KeyError):
                await client.available(77)
            with pytest.raises(TypeError):
                await client.transfer(1.5, 1, 2, 3)
    asyncio.run(main())


def test_standby_reads_answer_with_their_position(served):
    fund(served)
    assert served.client.transfer(10, 1, 2, 7) == ledger.TransferResult.OK
    position = served.ledger.stats()["journal_position"]
    served.service.stop()
    standby = Service(served.ledger, served.cluster.url, served.shard, primary=False)
    standby.start()
    try:
        assert served.client.balance(2, consistency="standby") == Read(7, position)
        account = served.client.account(2, consistency="standby")
        assert account.value == served.ledger.account(2) and account.position == position
        assert served.client.account(77, consistency="standby") == Read(None, position)
        rows = served.client.history(2, consistency="standby")
        assert rows.position == position and rows.value.tobytes() == served.ledger.history(2).tobytes()
        with pytest.raises(ValueError, match="consistency"):
            served.client.balance(2, consistency="eventual")
        with ledger.connect(served.cluster.url, shard=served.shard, timeout_ms=300) as quick:
            with pytest.raises(ledger.LedgerUnavailableError):
                quick.balance(2)   # a primary read: a standby does not answer it
    finally:
        standby.stop()
    served.service = Service(served.ledger, served.cluster.url, served.shard)
    served.service.start()
    assert served.client.balance(2, consistency="standby") == Read(7, position)


def raw_request(cluster: LocalCluster, subject: str, headers: dict[str, str], body: bytes = b""):
    async def main():
        connection = await nats.connect(cluster.url)
        try:
            return await connection.request(subject, body, timeout=HANG_GUARD_S, headers=headers)
        finally:
            await connection.close()
    return asyncio.run(main())


def test_the_service_refuses_what_it_does_not_speak(served):
    subject = names.request_subject(served.shard)
    version = {names.HEADER_VERSION: str(names.PROTOCOL_VERSION)}
    refusals = [
        ({names.HEADER_VERSION: "99", names.HEADER_METHOD: "account"}, b"", "LedgerError", "unsupported"),
        ({names.HEADER_METHOD: "account"}, b"", "LedgerError", "unsupported"),
        ({**version, names.HEADER_METHOD: "drop_table"}, b"", "ValueError", "unknown"),
        ({**version, names.HEADER_METHOD: "transfers"}, b"x" * 65, "ValueError", "not whole rows"),
        ({**version, names.HEADER_METHOD: "transfers"}, bytes(64 * (names.REQUEST_ROWS_MAX + 1)), "ValueError",
         "at most"),
        ({**version, names.HEADER_METHOD: "account", names.HEADER_ARGUMENTS: "{"}, b"", "ValueError", "JSON"),
    ]
    for headers, body, error, words in refusals:
        reply = raw_request(served.cluster, subject, headers, body)
        assert reply.headers[names.HEADER_ERROR] == error and words in reply.data.decode(), reply.data
    reply = raw_request(served.cluster, names.read_subject(served.shard),
                        {**version, names.HEADER_METHOD: "transfers"}, bytes(64))
    assert reply.headers[names.HEADER_ERROR] == "LedgerNotPrimaryError"
    assert served.ledger.stats()["transfers"] == 0
