"""Clients of a shard over NATS (docs/CLUSTER.md, "Clients"): `AsyncClient` (asyncio, what `ledger.aio.connect`
returns) and `Client` (threads, what `ledger.connect("nats://...", shard=...)` returns), with the calls, arguments,
results and errors of the ring client (ledger/ring.py) plus `lookup_transfers` and `history`.

Every call has one budget, `timeout_ms`, retries included. A request that finds no primary (no responders, no
reply within REQUEST_ATTEMPT_TIMEOUT_S, a reply saying the node is not or no longer primary) is sent again, the
same bytes with the same transfer ids, after a short back-off, until the budget is spent; then the call raises
LedgerUnavailableError. Resending is safe: a transfer or account already applied answers EXISTS.

Concurrent calls share requests: each write method has at most CLIENT_REQUESTS_IN_FLIGHT_MAX requests out at
once, and the calls that arrive meanwhile are joined into the next request (up to COALESCED_ROWS_MAX rows), whose
result codes are split back to each caller. A batch whose last row is LINKED (an open chain) only ever ends a
joined request, so no one else's rows join its chain."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import operator
import threading
from typing import Any, Coroutine, NamedTuple

import nats
import nats.errors
import numpy as np

from ledger.batches import Account, accounts_batch, as_batch, transfer_ids, transfers_batch
from ledger.cluster.connection import ConnectionOptions, connect_arguments, redacted
from ledger.cluster.names import (
    CLIENT_REQUESTS_IN_FLIGHT_MAX,
    CLIENT_TIMEOUT_MS_DEFAULT,
    CLIENT_TIMEOUT_MS_MAX,
    CLIENT_WAITING_CALLS_MAX,
    COALESCED_ROWS_MAX,
    CONNECT_TIMEOUT_S,
    REQUEST_ATTEMPT_TIMEOUT_S,
    REQUEST_ROWS_MAX,
    RETRY_BACKOFF_S_MAX,
    RETRY_BACKOFF_S_MIN,
    check_shard,
    read_subject,
    request_subject,
)
from ledger.cluster.protocol import (
    Reply,
    decode_reply,
    encode_moment,
    encode_request,
    error_from_reply,
    is_linked_open,
)
from ledger.enums import (ACCOUNT_DTYPE, BALANCE_MAX, TRANSFER_DTYPE, TRANSFER_RECORD_DTYPE, AccountResult,
                          TransferResult)
from ledger.errors import LedgerBusyError, LedgerClosedError, LedgerError, LedgerUnavailableError
from ledger.history import HISTORY_DTYPE
from ledger.ring import account_id, account_row, transfer_row

__all__ = ["AsyncClient", "Client", "Read", "connect", "connect_async", "CONSISTENCIES"]

CONSISTENCIES = ("primary", "standby")
# Replies naming these mean "not here, not now": nothing was applied, or the batch is in doubt and resending it
# is safe (EXISTS). Sent again within the budget.
RETRYABLE_ERRORS = frozenset({"LedgerNotPrimaryError", "LedgerPoisonedError", "LedgerClosedError",
                              "LedgerUnavailableError", "LedgerBusyError", "LedgerTimeoutError"})
SYNC_GUARD_S = 5.0   # a thread waits for the loop this much past its call's budget (the loop bounds the call)


class Read(NamedTuple):
    """What a read with consistency="standby" returns: the value, and the journal write position of the node
    that answered (the value reflects every batch before it). A primary read returns the value alone."""
    value: Any
    position: int


def _check_timeout_ms(timeout_ms: Any) -> int:
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int):
        raise TypeError(f"timeout_ms must be an integer, not {type(timeout_ms).__name__}")
    if not 1 <= timeout_ms <= CLIENT_TIMEOUT_MS_MAX:
        raise ValueError(f"timeout_ms must be in [1, {CLIENT_TIMEOUT_MS_MAX}], got {timeout_ms}")
    return timeout_ms


def _check_consistency(consistency: str) -> str:
    if consistency not in CONSISTENCIES:
        raise ValueError(f"consistency must be 'primary' or 'standby', got {consistency!r}")
    return consistency


def _fresh(error: BaseException) -> BaseException:
    """A copy of `error` for another caller of a coalesced request (one instance shared by several tasks would
    get every caller's traceback chained onto it)."""
    try:
        return type(error)(*error.args)
    except Exception:
        return error


def _json_scalar(value: Any, name: str) -> Any:
    """An argument for the JSON of a request: numpy integers as int; JSON's own scalars as they are (the service
    checks them as the Ledger does, so errors match); TypeError for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None


def _lookup_keys(ids: Any) -> np.ndarray:
    """lookup_transfers' ids checked as Ledger.lookup_transfers checks them, as a uint64 array."""
    keys = transfer_ids(ids)
    if keys.shape[0] > REQUEST_ROWS_MAX:
        raise ValueError(f"lookup_transfers over NATS takes at most {REQUEST_ROWS_MAX} ids a call, got "
                         f"{keys.shape[0]}: split them")
    return keys


@dataclasses.dataclass
class _Waiting:
    """One call's rows waiting in a coalescer, and where its result codes go."""
    rows: np.ndarray
    future: asyncio.Future
    deadline: float


class _Coalescer:
    """One write method's requests: at most CLIENT_REQUESTS_IN_FLIGHT_MAX out at once; calls that arrive
    meanwhile wait and are joined into the next request."""

    def __init__(self, client: AsyncClient, method: str) -> None:
        self.client = client
        self.method = method
        self.waiting: collections.deque[_Waiting] = collections.deque()
        self.in_flight = 0
        self.requests_sent = 0   # requests (not attempts): fewer than calls when calls were joined

    def submit(self, rows: np.ndarray, deadline: float) -> asyncio.Future:
        """Queue one call's rows; the future gets its codes (or its exception). LedgerBusyError when
        CLIENT_WAITING_CALLS_MAX calls wait already (nothing sent)."""
        if len(self.waiting) >= CLIENT_WAITING_CALLS_MAX:
            raise LedgerBusyError(f"{len(self.waiting)} {self.method} calls wait on this client already; nothing "
                                  f"of this one was sent")
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(rows, future, deadline))
        self._pump()
        return future

    def _next_group(self) -> list[_Waiting]:
        group = [self.waiting.popleft()]
        rows = group[0].rows.shape[0]
        while self.waiting and not is_linked_open(group[-1].rows):
            following = self.waiting[0].rows.shape[0]
            if rows + following > COALESCED_ROWS_MAX:
                break
            group.append(self.waiting.popleft())
            rows += following
        return group

    def _pump(self) -> None:
        while self.waiting and self.in_flight < CLIENT_REQUESTS_IN_FLIGHT_MAX:
            group = [waiting for waiting in self._next_group() if not waiting.future.done()]  # done: cancelled
            if not group:
                continue
            self.in_flight += 1
            self.requests_sent += 1
            asyncio.get_running_loop().create_task(self._send(group))

    async def _send(self, group: list[_Waiting]) -> None:
        try:
            rows = group[0].rows if len(group) == 1 else np.concatenate([waiting.rows for waiting in group])
            deadline = min(waiting.deadline for waiting in group)
            reply = await self.client.request(request_subject(self.client.shard), self.method, None, rows,
                                              deadline)
            if reply.error is not None:
                raise error_from_reply(reply)
            codes = np.frombuffer(reply.body, np.uint8)
            if codes.shape[0] != rows.shape[0]:
                raise LedgerError(f"the service answered {codes.shape[0]} result codes for {rows.shape[0]} rows")
            begin = 0
            for waiting in group:
                end = begin + waiting.rows.shape[0]
                if not waiting.future.done():
                    waiting.future.set_result(codes[begin:end].copy())
                begin = end
        except BaseException as error:   # every caller hears of it, also of a cancellation
            for waiting in group:
                if not waiting.future.done():
                    waiting.future.set_exception(_fresh(error))
            if not isinstance(error, Exception):
                raise
        finally:
            self.in_flight -= 1
            self._pump()


class AsyncClient:
    """A client of one shard over one nats-py connection (asyncio). Coroutines with the ring client's calls;
    see the module docstring for retries and coalescing. Make one with `await ledger.aio.connect(...)`."""

    def __init__(self, connection: Any, shard: str, timeout_ms: int, owns_connection: bool) -> None:
        """Use `connect_async` (or ledger.aio.connect): this takes an open nats-py connection."""
        self.shard = check_shard(shard)
        self.timeout_ms = _check_timeout_ms(timeout_ms)
        self.batch_rows_max = REQUEST_ROWS_MAX
        self._connection = connection
        self._owns_connection = owns_connection
        self._closed = False
        self._coalescers = {method: _Coalescer(self, method) for method in ("transfers", "create_accounts")}
        self.attempts = 0   # requests sent, every retry counted

    @property
    def requests_sent(self) -> int:
        """Write requests sent (each counted once, however often retried): fewer than the calls when concurrent
        calls were joined."""
        return sum(coalescer.requests_sent for coalescer in self._coalescers.values())

    def _deadline(self) -> float:
        if self._closed:
            raise LedgerClosedError("the client is closed")
        return asyncio.get_running_loop().time() + self.timeout_ms / 1000

    async def request(self, subject: str, method: str, arguments: dict[str, Any] | None, rows: np.ndarray | None,
                      deadline: float) -> Reply:
        """Send one request until a node answers it with anything but "not here, not now", or `deadline` (the
        loop's clock) passes: LedgerUnavailableError."""
        headers, body = encode_request(method, arguments, rows)
        loop = asyncio.get_running_loop()
        attempt = 0
        cause = "no attempt was made"
        while True:
            left_s = deadline - loop.time()
            if left_s <= 0:
                raise LedgerUnavailableError(
                    f"no primary of shard {self.shard} answered {method} within {self.timeout_ms} ms ({attempt} "
                    f"attempts; last: {cause}); it may or may not have been applied: retry with the same ids")
            self.attempts += 1
            attempt += 1
            try:
                message = await self._connection.request(subject, body, timeout=min(left_s, REQUEST_ATTEMPT_TIMEOUT_S),
                                                         headers=headers)
            except nats.errors.NoRespondersError:
                cause = f"nobody serves {subject} (a failover in progress, or no service running)"
            except nats.errors.TimeoutError:
                cause = f"no reply within {min(left_s, REQUEST_ATTEMPT_TIMEOUT_S):.3g} s"
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                raise LedgerClosedError("the client's NATS connection is closed") from None
            except (nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError,
                    nats.errors.StaleConnectionError) as error:
                cause = f"the NATS connection is reconnecting ({type(error).__name__})"
            else:
                reply = decode_reply(message.headers, message.data)
                if reply.error not in RETRYABLE_ERRORS:
                    return reply
                cause = f"{reply.error}: {reply.body.decode('utf-8', 'replace')}"
            pause_s = min(RETRY_BACKOFF_S_MIN * 2 ** (attempt - 1), RETRY_BACKOFF_S_MAX)
            await asyncio.sleep(max(0.0, min(pause_s, deadline - loop.time())))

    async def _write(self, method: str, rows: np.ndarray) -> np.ndarray:
        if rows.shape[0] > REQUEST_ROWS_MAX:
            raise ValueError(f"a client batch holds at most {REQUEST_ROWS_MAX} rows (one request), got "
                             f"{rows.shape[0]}: split it (a LINKED chain must stay within one call)")
        deadline = self._deadline()
        if rows.shape[0] == 0:
            return np.zeros(0, np.uint8)
        return await self._coalescers[method].submit(rows, deadline)

    async def transfers(self, batch: Any) -> np.ndarray:
        """Ledger.transfers on the shard's primary: one TransferResult code per row, replicated when it returns."""
        return await self._write("transfers", as_batch(batch, TRANSFER_DTYPE, transfers_batch, "transfers"))

    async def create_accounts(self, batch: Any) -> np.ndarray:
        """Ledger.create_accounts on the shard's primary: one AccountResult code per row."""
        return await self._write("create_accounts", as_batch(batch, ACCOUNT_DTYPE, accounts_batch, "accounts"))

    async def transfer(self, id: int, debit_account: int, credit_account: int, amount: int, *, ledger: int = 1,
                       code: int = 0, flags: int = 0, pending_id: int = 0, timeout: int = 0,
                       user_data: int = 0) -> TransferResult:
        """One transfer, with the arguments and result of Ledger.transfer (joined with concurrent calls)."""
        rows = transfer_row(id, debit_account, credit_account, amount, ledger, code, flags, pending_id, timeout,
                            user_data)
        return TransferResult(int((await self._write("transfers", rows))[0]))

    async def create_account(self, id: int, ledger: int = 1, *, min_balance: int = 0,
                             max_balance: int = BALANCE_MAX, flags: int = 0, user_data: int = 0) -> AccountResult:
        """One account, with the arguments and result of Ledger.create_account."""
        rows = account_row(id, ledger, min_balance, max_balance, flags, user_data)
        return AccountResult(int((await self._write("create_accounts", rows))[0]))

    async def _read(self, method: str, arguments: dict[str, Any] | None, rows: np.ndarray | None,
                    consistency: str) -> Reply:
        subject = (request_subject if _check_consistency(consistency) == "primary" else read_subject)(self.shard)
        reply = await self.request(subject, method, arguments, rows, self._deadline())
        if reply.error is not None:
            raise error_from_reply(reply)
        return reply

    @staticmethod
    def _answer(value: Any, reply: Reply, consistency: str) -> Any:
        if consistency == "primary":
            return value
        if reply.position is None:
            raise LedgerError("a standby read's reply carries no Ledger-Position")
        return Read(value, reply.position)

    async def account(self, id: int, consistency: str = "primary") -> Any:
        """The account `id` (an Account), or None. consistency="standby": any node answers, and the result is
        Read(account or None, position)."""
        reply = await self._read("account", {"id": account_id(id)}, None, consistency)
        account = None if reply.result is None else Account(*reply.result)
        return self._answer(account, reply, consistency)

    async def _existing(self, id: int, consistency: str) -> tuple[Account, Any]:
        found = await self.account(id, consistency)
        account = found if consistency == "primary" else found.value
        if account is None:
            raise KeyError(f"account {id} not found")
        return account, found

    async def balance(self, id: int, consistency: str = "primary") -> Any:
        """credits_posted - debits_posted of account `id`; KeyError if there is none. "standby": Read(balance,
        position)."""
        account, found = await self._existing(id, consistency)
        return account.balance if consistency == "primary" else Read(account.balance, found.position)

    async def available(self, id: int, consistency: str = "primary") -> Any:
        """balance - debits_pending of account `id`; KeyError if there is none. "standby": Read(available,
        position)."""
        account, found = await self._existing(id, consistency)
        return account.available if consistency == "primary" else Read(account.available, found.position)

    async def lookup_transfers(self, ids: Any) -> np.ndarray:
        """One TRANSFER_RECORD_DTYPE row per id, from the primary (Ledger.lookup_transfers)."""
        keys = _lookup_keys(ids)
        reply = await self._read("lookup_transfers", None, keys, "primary")
        return np.frombuffer(reply.body, TRANSFER_RECORD_DTYPE).copy()

    async def history(self, id: int, since: Any = None, until: Any = None, limit: int | None = None,
                      consistency: str = "primary") -> Any:
        """Ledger.history of account `id` (HISTORY_DTYPE rows). "standby": Read(rows, position)."""
        arguments = {"id": _json_scalar(id, "id"), "since": encode_moment(since), "until": encode_moment(until),
                     "limit": None if limit is None else _json_scalar(limit, "limit")}
        reply = await self._read("history", arguments, None, consistency)
        return self._answer(np.frombuffer(reply.body, HISTORY_DTYPE).copy(), reply, consistency)

    async def close(self) -> None:
        """Close the connection (if this client opened it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_connection:
            try:
                await asyncio.wait_for(self._connection.close(), CONNECT_TIMEOUT_S)
            except Exception:
                pass   # a server gone: nothing left to flush

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _quiet(error: Exception) -> None:
    """nats-py logs each failed reconnect with a traceback; a call's outcome says what matters."""


async def connect_async(url: str, *, shard: str, timeout_ms: int = CLIENT_TIMEOUT_MS_DEFAULT,
                        options: ConnectionOptions | None = None, connection: Any = None,
                        **connection_options: Any) -> AsyncClient:
    """An AsyncClient of shard `shard` at `url` (nats://host:port, several comma-separated). options (or the
    same fields as keywords: user, password, token, creds_file, tls_*) authenticate and secure the connection;
    `connection`: an open nats-py connection to use instead (the caller keeps closing it). LedgerUnavailableError
    when no server answers within CONNECT_TIMEOUT_S."""
    check_shard(shard)
    _check_timeout_ms(timeout_ms)
    if connection is not None:
        return AsyncClient(connection, shard, timeout_ms, owns_connection=False)
    if connection_options:
        if options is not None:
            raise ValueError("give the connection options as options= or as keywords, not both")
        options = ConnectionOptions(**connection_options)
    arguments = connect_arguments(url, options)
    # Once connected it reconnects for ever (each call stays bounded by timeout_ms); the first connection gets
    # the call budget, at most CONNECT_TIMEOUT_S.
    wait_s = min(CONNECT_TIMEOUT_S, timeout_ms / 1000)
    try:
        opened = await asyncio.wait_for(nats.connect(**arguments, connect_timeout=wait_s, error_cb=_quiet,
                                                     max_reconnect_attempts=-1, reconnect_time_wait=0.1),
                                        wait_s)
    except Exception as error:   # nats-py raises several kinds (NoServersError, OSError, TimeoutError)
        raise LedgerUnavailableError(f"no NATS server at {redacted(url)} answered within {wait_s:g} s: "
                                     f"{error or type(error).__name__}") from None
    return AsyncClient(opened, shard, timeout_ms, owns_connection=True)


class _LoopThread:
    """The sync client's asyncio loop, on a daemon thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ledger-client", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
        assert threading.current_thread() is not self.thread, "a call from the client's own loop would deadlock"
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise LedgerUnavailableError(f"the client's loop gave no answer within {timeout_s:g} s") from None
        except concurrent.futures.CancelledError:
            raise LedgerClosedError("the client was closed during this call; it may or may not have been "
                                    "applied: retry with the same ids") from None

    def stop(self) -> None:
        """End every task (the calls in progress raise LedgerClosedError in their threads), then the loop."""
        try:
            asyncio.run_coroutine_threadsafe(self._cancel_all(), self.loop).result(CONNECT_TIMEOUT_S)
        except Exception:
            pass   # the loop stops anyway
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


    @staticmethod
    async def _cancel_all() -> None:
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Client:
    """A client of one shard over NATS for threads: the calls of the ring client (ledger.ring.Client) and
    lookup_transfers and history, each bounded by timeout_ms, retries included. Share one between threads:
    their concurrent calls are joined into fewer requests."""

    def __init__(self, url: str, shard: str, timeout_ms: int = CLIENT_TIMEOUT_MS_DEFAULT,
                 options: ConnectionOptions | None = None, **connection_options: Any) -> None:
        """See `connect`."""
        self.url = redacted(url)
        self.shard = check_shard(shard)
        self.timeout_ms = _check_timeout_ms(timeout_ms)
        self.batch_rows_max = REQUEST_ROWS_MAX
        self._lock = threading.Lock()
        self._thread: _LoopThread | None = _LoopThread()
        try:
            self._client: AsyncClient = self._thread.run(
                connect_async(url, shard=shard, timeout_ms=timeout_ms, options=options, **connection_options),
                CONNECT_TIMEOUT_S + SYNC_GUARD_S)
        except BaseException:
            self._thread.stop()
            raise

    @property
    def requests_sent(self) -> int:
        """Write requests sent (see AsyncClient.requests_sent)."""
        return self._client.requests_sent

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        thread = self._thread
        if thread is None:
            coroutine.close()
            raise LedgerClosedError("the client is closed")
        return thread.run(coroutine, self.timeout_ms / 1000 + SYNC_GUARD_S)

    def transfers(self, batch: Any) -> np.ndarray:
        """Ledger.transfers on the shard's primary: one TransferResult code per row."""
        return self._run(self._client.transfers(batch))

    def create_accounts(self, batch: Any) -> np.ndarray:
        """Ledger.create_accounts on the shard's primary: one AccountResult code per row."""
        return self._run(self._client.create_accounts(batch))

    def transfer(self, id: int, debit_account: int, credit_account: int, amount: int, *, ledger: int = 1,
                 code: int = 0, flags: int = 0, pending_id: int = 0, timeout: int = 0,
                 user_data: int = 0) -> TransferResult:
        """One transfer, with the arguments and result of Ledger.transfer."""
        rows = transfer_row(id, debit_account, credit_account, amount, ledger, code, flags, pending_id, timeout,
                            user_data)   # checked here: a bad argument never reaches the loop
        return TransferResult(int(self._run(self._client.transfers(rows))[0]))

    def create_account(self, id: int, ledger: int = 1, *, min_balance: int = 0, max_balance: int = BALANCE_MAX,
                       flags: int = 0, user_data: int = 0) -> AccountResult:
        """One account, with the arguments and result of Ledger.create_account."""
        rows = account_row(id, ledger, min_balance, max_balance, flags, user_data)
        return AccountResult(int(self._run(self._client.create_accounts(rows))[0]))

    def account(self, id: int, consistency: str = "primary") -> Any:
        """The account `id`, or None; consistency="standby": Read(account or None, position) from any node."""
        return self._run(self._client.account(id, consistency))

    def balance(self, id: int, consistency: str = "primary") -> Any:
        """credits_posted - debits_posted of account `id`; KeyError if none. "standby": Read(balance, position)."""
        return self._run(self._client.balance(id, consistency))

    def available(self, id: int, consistency: str = "primary") -> Any:
        """balance - debits_pending of account `id`; KeyError if none. "standby": Read(available, position)."""
        return self._run(self._client.available(id, consistency))

    def lookup_transfers(self, ids: Any) -> np.ndarray:
        """One TRANSFER_RECORD_DTYPE row per id (Ledger.lookup_transfers), from the primary."""
        return self._run(self._client.lookup_transfers(ids))

    def history(self, id: int, since: Any = None, until: Any = None, limit: int | None = None,
                consistency: str = "primary") -> Any:
        """Ledger.history of account `id`; "standby": Read(rows, position)."""
        return self._run(self._client.history(id, since, until, limit, consistency))

    def close(self) -> None:
        """Close the connection and the client's thread. Idempotent; calls after it raise LedgerClosedError."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            try:
                thread.run(self._client.close(), CONNECT_TIMEOUT_S + SYNC_GUARD_S)
            finally:
                thread.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(url: str, *, shard: str, timeout_ms: int = CLIENT_TIMEOUT_MS_DEFAULT,
            options: ConnectionOptions | None = None, **connection_options: Any) -> Client:
    """A Client of shard `shard` at `url` (nats://host:port or tls://..., several comma-separated), what
    `ledger.connect(url, shard=...)` returns. timeout_ms bounds every call, retries included. options (or its
    fields as keywords: user, password, token, creds_file, tls_ca_file, tls_cert_file, tls_key_file,
    tls_hostname) authenticate and secure the connection."""
    return Client(url, shard, timeout_ms, options, **connection_options)
