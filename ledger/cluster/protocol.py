"""The wire format of requests over NATS (docs/CLUSTER.md, "Requests over NATS"), shared by the client
(ledger/cluster/client.py) and the service (ledger/cluster/service.py).

A request is one NATS message on `ledger.request.<shard>` (or `ledger.read.<shard>` for a read any node may
answer). Headers: `Ledger-Version: 1`, `Ledger-Method: <method>` and, when the method has scalar arguments,
`Ledger-Arguments: <small JSON object>`. The body is the rows of a batch as numpy bytes (little-endian, the
dtype's own layout): TRANSFER_DTYPE for `transfers`, ACCOUNT_DTYPE for `create_accounts`, uint64 ids for
`lookup_transfers`; empty otherwise.

A reply: `Ledger-Version: 1`, `Ledger-Position: <the journal write position the answer reflects>`; on success a
body (uint8 result codes, TRANSFER_RECORD_DTYPE or HISTORY_DTYPE rows) or `Ledger-Result: <JSON>` (an account, a
count);
on failure `Ledger-Error: <exception class name>` and the message as UTF-8 in the body."""
from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

import numpy as np

from ledger import errors
from ledger.enums import ACCOUNT_DTYPE, TRANSFER_DTYPE
from ledger.cluster.names import (
    ARGUMENTS_BYTES_MAX,
    ERROR_MESSAGE_BYTES_MAX,
    HEADER_ARGUMENTS,
    HEADER_ERROR,
    HEADER_METHOD,
    HEADER_POSITION,
    HEADER_RESULT,
    HEADER_VERSION,
    PROTOCOL_VERSION,
    REQUEST_ROWS_MAX,
)
from ledger.moments import At, as_at

__all__ = ["BATCH_METHODS", "READ_METHODS", "WRITE_METHODS", "ERROR_CLASSES", "Reply", "Request", "RequestRefused",
           "decode_reply", "decode_request", "encode_error", "encode_moment", "encode_reply", "encode_request",
           "decode_moment", "error_from_reply", "is_linked_open"]

IDS_DTYPE = np.dtype("<u8")
# The methods that carry rows, with their rows' dtype. Writes are coalesced; lookup_transfers is a read.
BATCH_METHODS = {"transfers": TRANSFER_DTYPE, "create_accounts": ACCOUNT_DTYPE, "lookup_transfers": IDS_DTYPE}
WRITE_METHODS = ("transfers", "create_accounts")
# accounts_in_range ({"first", "last"}: how many accounts have an id in [first, last]) is the shard map's check
# (ledger/cluster/shards.py) before it takes a range from a shard.
READ_METHODS = ("account", "lookup_transfers", "history", "accounts_in_range")
# The exceptions a reply may name and the client raises again as themselves; any other is a LedgerError.
ERROR_CLASSES: dict[str, type[Exception]] = {
    **{name: getattr(errors, name) for name in errors.__all__},
    "ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError, "OverflowError": OverflowError,
}
LINKED_FLAG = 1   # AccountFlags.LINKED and TransferFlags.LINKED


class RequestRefused(Exception):
    """A request the service refuses before running it: `name` is the exception class the reply names."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclasses.dataclass
class Request:
    """A decoded request: the method, its scalar arguments and its rows (an array of the method's dtype)."""
    method: str
    arguments: dict[str, Any]
    rows: np.ndarray | None


@dataclasses.dataclass
class Reply:
    """A decoded reply: the error class name (None: success), the body, the result JSON and the position."""
    error: str | None
    body: bytes
    result: Any
    position: int | None


def encode_request(method: str, arguments: dict[str, Any] | None = None,
                   rows: np.ndarray | None = None) -> tuple[dict[str, str], bytes]:
    """The headers and body of a request for `method`."""
    assert method in WRITE_METHODS or method in READ_METHODS, method
    headers = {HEADER_VERSION: str(PROTOCOL_VERSION), HEADER_METHOD: method}
    if arguments:
        text = json.dumps(arguments, separators=(",", ":"))
        if len(text) > ARGUMENTS_BYTES_MAX:
            raise ValueError(f"the arguments of {method} take {len(text)} bytes of JSON; at most "
                             f"{ARGUMENTS_BYTES_MAX}")
        headers[HEADER_ARGUMENTS] = text
    body = b"" if rows is None else rows.tobytes()
    return headers, body


def _version(headers: dict[str, str] | None) -> None:
    version = (headers or {}).get(HEADER_VERSION)
    if version != str(PROTOCOL_VERSION):
        raise RequestRefused("LedgerError", f"unsupported {HEADER_VERSION} {version!r}: this node speaks version "
                                            f"{PROTOCOL_VERSION} (upgrade the older side)")


def decode_request(headers: dict[str, str] | None, body: bytes) -> Request:
    """A request from a message's headers and body; RequestRefused naming what is wrong."""
    _version(headers)
    assert headers is not None
    method = headers.get(HEADER_METHOD)
    if method not in WRITE_METHODS and method not in READ_METHODS:
        raise RequestRefused("ValueError", f"unknown {HEADER_METHOD} {method!r}; known: "
                                           f"{', '.join(WRITE_METHODS + READ_METHODS)}")
    text = headers.get(HEADER_ARGUMENTS) or "{}"
    if len(text) > ARGUMENTS_BYTES_MAX:
        raise RequestRefused("ValueError", f"{HEADER_ARGUMENTS} of {len(text)} bytes; at most {ARGUMENTS_BYTES_MAX}")
    try:
        arguments = json.loads(text)
    except ValueError as error:
        raise RequestRefused("ValueError", f"{HEADER_ARGUMENTS} is not JSON: {error}") from None
    if not isinstance(arguments, dict):
        raise RequestRefused("ValueError", f"{HEADER_ARGUMENTS} must be a JSON object")
    rows = None
    if method in BATCH_METHODS:
        dtype = BATCH_METHODS[method]
        if len(body) % dtype.itemsize:
            raise RequestRefused("ValueError", f"a {method} body of {len(body)} bytes is not whole rows of "
                                               f"{dtype.itemsize} bytes")
        count = len(body) // dtype.itemsize
        if count > REQUEST_ROWS_MAX:
            raise RequestRefused("ValueError", f"a {method} request of {count} rows; at most {REQUEST_ROWS_MAX}")
        rows = np.frombuffer(body, dtype).copy()   # writable and aligned, as the core wants it
    elif body:
        raise RequestRefused("ValueError", f"a {method} request carries no body, got {len(body)} bytes")
    return Request(method, arguments, rows)


def encode_reply(position: int | None, body: bytes = b"", result: Any = None,
                 with_result: bool = False) -> tuple[dict[str, str], bytes]:
    """The headers and body of a successful reply."""
    headers = {HEADER_VERSION: str(PROTOCOL_VERSION)}
    if position is not None:
        headers[HEADER_POSITION] = str(position)
    if with_result:
        headers[HEADER_RESULT] = json.dumps(result, separators=(",", ":"))
    return headers, body


def encode_error(error: BaseException, position: int | None = None) -> tuple[dict[str, str], bytes]:
    """The headers and body of a reply that raises `error` at the caller (as its class, when it is one of
    ERROR_CLASSES; as a LedgerError naming it otherwise)."""
    name = type(error).__name__ if not isinstance(error, RequestRefused) else error.name
    if isinstance(error, KeyError) and len(error.args) == 1:
        message = str(error.args[0])   # str(KeyError(x)) would quote it
    else:
        message = str(error)
    if name not in ERROR_CLASSES:
        message, name = f"{name}: {message}", "LedgerError"
    headers = {HEADER_VERSION: str(PROTOCOL_VERSION), HEADER_ERROR: name}
    if position is not None:
        headers[HEADER_POSITION] = str(position)
    return headers, message.encode("utf-8", "replace")[:ERROR_MESSAGE_BYTES_MAX]


def decode_reply(headers: dict[str, str] | None, body: bytes) -> Reply:
    """A reply from a message's headers and body; LedgerError when its version is not this one's."""
    try:
        _version(headers)
    except RequestRefused as refused:
        raise errors.LedgerError(f"a reply from the ledger service: {refused}") from None
    assert headers is not None
    position = headers.get(HEADER_POSITION)
    result = headers.get(HEADER_RESULT)
    return Reply(headers.get(HEADER_ERROR), body, None if result is None else json.loads(result),
                 int(position) if position is not None and position.isdigit() else None)


def error_from_reply(reply: Reply) -> Exception:
    """The exception an error reply names, with its message."""
    assert reply.error is not None
    message = reply.body.decode("utf-8", "replace")
    return ERROR_CLASSES.get(reply.error, errors.LedgerError)(message)


def is_linked_open(rows: np.ndarray) -> bool:
    """Whether a batch's last row has LINKED: its chain is open, so no other caller's rows may follow it in a
    coalesced batch (they would join its chain); it may only end one."""
    return rows.shape[0] > 0 and bool(int(rows["flags"][-1]) & LINKED_FLAG)


def encode_moment(moment: Any) -> Any:
    """A history bound (None, a journal position, a datetime or an At) as JSON: null, {"position": n} or
    {"ns": n}; TypeError (as the Ledger says it) for anything else."""
    if moment is None:
        return None
    if isinstance(moment, datetime.datetime):
        moment = At.from_datetime(moment)
    at = as_at(moment)
    return {"position": at.position} if at.position is not None else {"ns": at.ns}


def decode_moment(value: Any) -> At | None:
    """The At a JSON history bound names (encode_moment's inverse); ValueError if it is not one."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) != 1 or not set(value) <= {"position", "ns"}:
        raise ValueError(f"a history bound must be null, {{\"position\": n}} or {{\"ns\": n}}, got {value!r}")
    (name, number), = value.items()
    if isinstance(number, bool) or not isinstance(number, int):
        raise TypeError(f"a history bound's {name} must be an integer, got {number!r}")
    return At(**{name: number})
