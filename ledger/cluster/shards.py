"""The shard map (docs/CLUSTER.md, "Shard map"): which shard owns which account ids, kept in the JetStream KV
bucket LEDGER_SHARDS under the key `map`, versioned by its KV revision; `ledger cluster shards URL [--set MAP]`.

The text form, what `--set` takes and `text()` prints: entries `NAME=FIRST-LAST` separated by commas, each giving
the account ids FIRST to LAST (both included, decimal) to shard NAME; a shard owning several ranges is named in
several entries (`s0=1-999,s1=1000-1999,s0=2000-2999`). Spaces around entries are ignored. Ranges may leave gaps
(an id in none is unmapped) but never overlap; ids run from 1 to 2**63 - 1 (from 2**63 up they are the cluster's
own: bridge accounts, derived leg ids). The canonical form is sorted by first id, adjacent ranges of one shard
joined: `parse(map.text())` gives the same ranges back.

Each shard has a number, fixed the first time a map names it (the next free one, in the order shards first own
ids) and kept in the stored JSON from then on, even by a shard that no longer owns a range: a number is never
given to another shard, because the cluster's own account ids (bridge accounts) will carry it.

A change goes through `change_map` (`set_shard_map` from threads, the CLI): every id sub-range whose owner would
change, or that would become unmapped, is asked of the shard owning it now (`accounts_in_range` on its primary's
request subject); the change is refused (ShardMapRefusedError, nothing written) if that shard holds any account
there, or does not answer within SHARD_MAP_ANSWER_TIMEOUT_S (nobody can prove it holds none). Ids that were
unmapped may be given to any shard. The write is a compare-and-set on the revision the change was checked
against: a concurrent change makes it fail (ShardMapConflictError, nothing written)."""
from __future__ import annotations

import asyncio
import bisect
import dataclasses
import json
import re
from typing import Any, Awaitable, Callable, Iterable

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType

from ledger.cluster.client import RETRYABLE_ERRORS
from ledger.cluster.connection import ConnectionOptions, redacted
from ledger.cluster.names import (
    ACCOUNT_ID_MIN,
    CLUSTER_ID_MIN,
    CONNECT_TIMEOUT_S,
    REPLICAS_DEFAULT,
    REQUEST_ATTEMPT_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    RETRY_BACKOFF_S_MAX,
    RETRY_BACKOFF_S_MIN,
    SHARD_MAP_ANSWER_TIMEOUT_S,
    SHARD_MAP_BUCKET,
    SHARD_MAP_FORMAT,
    SHARD_MAP_HISTORY,
    SHARD_MAP_KEY,
    SHARD_MAP_RANGES_MAX,
    SHARD_NUMBERS_MAX,
    WRONG_LAST_SEQUENCE_ERROR_CODE,
    check_shard,
    request_subject,
)
from ledger.cluster.node import cluster_size
from ledger.cluster.protocol import decode_reply, encode_request, error_from_reply
from ledger.cluster.status import ClusterUnreachableError, connect_once
from ledger.errors import LedgerError

__all__ = ["Move", "ShardMap", "ShardMapConflictError", "ShardMapError", "ShardMapRefusedError", "change_map",
           "check_moves", "ensure_map_bucket", "map_lines", "parse", "read_map", "read_shard_map",
           "set_shard_map", "write_map"]

ID_DIGITS_MAX = 19                       # 2**63 - 1 has 19 digits: a longer number is refused before int()
NUMBER = re.compile(r"[0-9]+")
# The whole command (connect, read, the owners' answers in parallel, the write): bounded, never a hang.
SHARDS_TIMEOUT_S = CONNECT_TIMEOUT_S + 4 * REQUEST_TIMEOUT_S + SHARD_MAP_ANSWER_TIMEOUT_S

Range = tuple[int, int, str]             # (first id, last id, shard), both ids included


class ShardMapError(LedgerError):
    """A shard map change that was not made (nothing written)."""


class ShardMapConflictError(ShardMapError):
    """The map changed since the version the change was made against: read it again and retry."""


class ShardMapRefusedError(ShardMapError):
    """The change would move existing accounts, or a shard that owns a range it changes did not answer."""


@dataclasses.dataclass(frozen=True)
class Move:
    """Ids `first`..`last` (both included) that the shard `owner` has now and a new map gives to `to` (None:
    to no shard)."""
    first: int
    last: int
    owner: str
    to: str | None


def _entry(first: int, last: int, shard: str) -> str:
    return f"{shard}={first}-{last}"


def _check_range(first: int, last: int, shard: str) -> None:
    """ValueError naming the entry when (first, last, shard) is not a range a map may hold."""
    entry = _entry(first, last, shard)
    try:
        check_shard(shard)
    except ValueError as error:
        raise ValueError(f"shard map entry {entry!r}: {error}") from None
    if first < ACCOUNT_ID_MIN:
        raise ValueError(f"shard map entry {entry!r}: account id 0 is no account (ids start at {ACCOUNT_ID_MIN})")
    if first > last:
        raise ValueError(f"shard map entry {entry!r}: an empty range (the first id is above the last)")
    if last >= CLUSTER_ID_MIN:
        raise ValueError(f"shard map entry {entry!r}: ids from 2**63 ({CLUSTER_ID_MIN}) up are the cluster's own "
                         f"(bridge accounts, derived leg ids); the last id a shard may own is {CLUSTER_ID_MIN - 1}")


def _canonical(ranges: Iterable[Range]) -> tuple[Range, ...]:
    """`ranges` checked, sorted by first id, adjacent ranges of one shard joined; ValueError naming the offending
    entry (or pair of entries)."""
    checked = []
    for first, last, shard in ranges:
        if isinstance(first, bool) or isinstance(last, bool) or not isinstance(first, int) \
                or not isinstance(last, int):
            raise TypeError(f"shard map entry {(first, last, shard)!r}: the ids must be integers")
        _check_range(first, last, shard)
        checked.append((first, last, shard))
    checked.sort()
    joined: list[Range] = []
    for first, last, shard in checked:
        if joined and first <= joined[-1][1]:
            before = joined[-1]
            raise ValueError(f"shard map entries {_entry(*before)!r} and {_entry(first, last, shard)!r} overlap "
                             f"(ids {first}-{min(last, before[1])})")
        if joined and first == joined[-1][1] + 1 and shard == joined[-1][2]:
            joined[-1] = (joined[-1][0], last, shard)
        else:
            joined.append((first, last, shard))
    if len(joined) > SHARD_MAP_RANGES_MAX:
        raise ValueError(f"a shard map of {len(joined)} ranges; at most {SHARD_MAP_RANGES_MAX}")
    return tuple(joined)


def _numbered(ranges: tuple[Range, ...], numbers: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """`numbers` kept, every shard of `ranges` without one given the next free number in order of its first
    range; sorted by number."""
    kept = dict(numbers)
    following = max(kept.values(), default=-1) + 1
    for _, _, shard in ranges:
        if shard not in kept:
            kept[shard], following = following, following + 1
    return tuple(sorted(kept.items(), key=lambda item: item[1]))


@dataclasses.dataclass(frozen=True)
class ShardMap:
    """Which shard owns which account ids: `ranges` (first id, last id, shard), both ids included, sorted, never
    overlapping, adjacent ranges of one shard joined (what `from_ranges` and `parse` make); `numbers` (shard,
    number) sorted by number, every shard the map ever named (a number is never reused); `version`: the KV
    revision the map was read at (0: no map stored)."""
    ranges: tuple[Range, ...] = ()
    numbers: tuple[tuple[str, int], ...] = ()
    version: int = 0
    _firsts: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ranges: tuple[Range, ...] = tuple((first, last, shard) for first, last, shard in self.ranges)
        if _canonical(ranges) != ranges:
            raise ValueError("shard map ranges must be sorted, apart and joined: make the map with "
                             "ShardMap.from_ranges or parse")
        assert isinstance(self.version, int) and self.version >= 0, self.version
        numbers = dict(self.numbers)
        if len(numbers) != len(self.numbers) or len(set(numbers.values())) != len(numbers):
            raise ValueError(f"shard map numbers {self.numbers!r}: a shard or a number twice")
        if any(not 0 <= number < SHARD_NUMBERS_MAX for number in numbers.values()) or \
                list(self.numbers) != sorted(self.numbers, key=lambda item: item[1]):
            raise ValueError(f"shard map numbers {self.numbers!r}: each in [0, {SHARD_NUMBERS_MAX}), sorted")
        unnumbered = sorted({str(shard) for _, _, shard in ranges} - set(numbers))
        if unnumbered:
            raise ValueError(f"shard map: shard {unnumbered[0]} has no number")
        object.__setattr__(self, "ranges", ranges)
        object.__setattr__(self, "_firsts", tuple(first for first, _, _ in ranges))

    @classmethod
    def from_ranges(cls, ranges: Iterable[Range], numbers: Iterable[tuple[str, int]] = (),
                    version: int = 0) -> ShardMap:
        """A map of `ranges` in any order (checked, sorted, adjacent ranges of one shard joined; ValueError naming
        the offending entry), `numbers` kept and new shards numbered after them."""
        canonical = _canonical(ranges)
        return cls(canonical, _numbered(canonical, numbers), version)

    def shard_of(self, account_id: int) -> str | None:
        """The shard owning `account_id`, or None when no range holds it."""
        index = bisect.bisect_right(self._firsts, account_id) - 1
        if index < 0 or account_id > self.ranges[index][1]:
            return None
        return self.ranges[index][2]

    @property
    def shards(self) -> list[str]:
        """The shards owning at least one range, by number."""
        owning = {shard for _, _, shard in self.ranges}
        return [shard for shard, _ in self.numbers if shard in owning]

    def number_of(self, shard: str) -> int:
        """The number of `shard`; KeyError if this map never named it."""
        for name, number in self.numbers:
            if name == shard:
                return number
        raise KeyError(f"shard {shard} is not in the shard map")

    def text(self) -> str:
        """The canonical text form (`parse` reads it back to the same ranges); empty for no ranges."""
        return ",".join(_entry(*entry) for entry in self.ranges)

    def as_json(self) -> dict[str, Any]:
        """The map as a JSON document (what is stored, and `ledger cluster shards --json` prints): format,
        version, ranges ({first, last, shard}), numbers ({shard: number}) and the text form."""
        return {"format": SHARD_MAP_FORMAT, "version": self.version,
                "ranges": [{"first": first, "last": last, "shard": shard} for first, last, shard in self.ranges],
                "numbers": dict(self.numbers), "text": self.text()}

    @classmethod
    def from_json(cls, document: Any, version: int) -> ShardMap:
        """The map an `as_json` document holds, at `version`; ValueError naming what is wrong with it."""
        if not isinstance(document, dict) or document.get("format") != SHARD_MAP_FORMAT:
            raise ValueError(f"not a shard map document of format {SHARD_MAP_FORMAT}")
        try:
            ranges = [(entry["first"], entry["last"], entry["shard"]) for entry in document["ranges"]]
            numbers = [(check_shard(shard), number) for shard, number in document["numbers"].items()]
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"a shard map document without its ranges or numbers ({error!r})") from None
        if any(isinstance(number, bool) or not isinstance(number, int) for _, number in numbers):
            raise ValueError("a shard map document whose numbers are not integers")
        return cls(_canonical(ranges), tuple(sorted(numbers, key=lambda item: item[1])), version)

    def renumbered(self, previous: ShardMap) -> ShardMap:
        """These ranges with `previous`'s numbers kept (those of shards gone too) and new shards numbered after
        them: the map `write_map` stores over `previous`."""
        return ShardMap(self.ranges, _numbered(self.ranges, previous.numbers), self.version)

    def moves(self, new: ShardMap) -> list[Move]:
        """The id sub-ranges this map gives to a shard and `new` gives to another one or to none, in id order."""
        moves = []
        index = 0
        for first, last, owner in self.ranges:
            cursor = first
            while index < len(new.ranges) and new.ranges[index][1] < first:
                index += 1
            scan = index
            while cursor <= last and scan < len(new.ranges) and new.ranges[scan][0] <= last:
                new_first, new_last, to = new.ranges[scan]
                if new_first > cursor:
                    moves.append(Move(cursor, new_first - 1, owner, None))
                    cursor = new_first
                end = min(new_last, last)
                if to != owner:
                    moves.append(Move(cursor, end, owner, to))
                cursor = end + 1
                if new_last <= last:
                    scan += 1
                else:
                    break
            if cursor <= last:
                moves.append(Move(cursor, last, owner, None))
        return moves


def parse(text: str) -> ShardMap:
    """The map of a text form, `NAME=FIRST-LAST[,NAME=FIRST-LAST...]` (see the module docstring), version 0,
    shards numbered in the order they first own ids. ValueError naming the offending entry."""
    if not isinstance(text, str):
        raise TypeError(f"a shard map's text must be a str, not {type(text).__name__}")
    if not text.strip():
        raise ValueError("an empty shard map: give NAME=FIRST-LAST entries separated by commas, e.g. "
                         "s0=1-4999999,s1=5000000-9999999")
    ranges = []
    for part in text.split(","):
        entry = part.strip()
        if not entry:
            raise ValueError(f"shard map {text.strip()!r}: an empty entry (two commas in a row, or one at an end)")
        shard, equals, span = entry.partition("=")
        first_text, dash, last_text = span.strip().partition("-")
        if not equals or not dash:
            raise ValueError(f"shard map entry {entry!r}: expected NAME=FIRST-LAST, e.g. s0=1-4999999")
        for number in (first_text.strip(), last_text.strip()):
            if NUMBER.fullmatch(number) is None or len(number) > ID_DIGITS_MAX:
                raise ValueError(f"shard map entry {entry!r}: {number!r} is not an account id (decimal digits, "
                                 f"1 to {CLUSTER_ID_MIN - 1})")
        ranges.append((int(first_text), int(last_text), shard.strip()))
    return ShardMap.from_ranges(ranges)


def map_lines(shard_map: ShardMap) -> list[str]:
    """The map as text for people: its version, then one line per range with its shard and the shard's number."""
    if not shard_map.ranges:
        return [f"no shard map (KV bucket {SHARD_MAP_BUCKET} has no key {SHARD_MAP_KEY}, version "
                f"{shard_map.version}): every account id is unmapped; set one with --set"]
    lines = [f"shard map version {shard_map.version}: {len(shard_map.ranges)} range(s), "
             f"{len(shard_map.shards)} shard(s)"]
    rows = [(f"{first:,}", f"{last:,}", shard, str(shard_map.number_of(shard)))
            for first, last, shard in shard_map.ranges]
    header = ("first id", "last id", "shard", "number")
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(f"{cell:<{widths[column]}}" for column, cell in enumerate(row)).rstrip())
    lines.append(f"  text: {shard_map.text()}")
    return lines


# -- stored in KV --

async def _map_bucket(js: Any) -> Any | None:
    """The bucket LEDGER_SHARDS, or None when nobody made it yet."""
    try:
        return await js.key_value(SHARD_MAP_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return None


async def ensure_map_bucket(js: Any, servers: int) -> Any:
    """The KV bucket LEDGER_SHARDS, created if missing: file storage, no TTL, SHARD_MAP_HISTORY revisions kept,
    min(REPLICAS_DEFAULT, servers) replicas (the map must outlive any one server)."""
    assert servers >= 1, servers
    bucket = await _map_bucket(js)
    if bucket is not None:
        return bucket
    config = KeyValueConfig(bucket=SHARD_MAP_BUCKET, history=SHARD_MAP_HISTORY, storage=StorageType.FILE,
                            replicas=min(REPLICAS_DEFAULT, servers))
    return await js.create_key_value(config)


async def _read_from(bucket: Any | None) -> ShardMap:
    if bucket is None:
        return ShardMap()
    try:
        entry = await bucket.get(SHARD_MAP_KEY)
    except nats.js.errors.KeyNotFoundError:   # never set, or deleted
        return ShardMap()
    try:
        return ShardMap.from_json(json.loads(bytes(entry.value or b"")), entry.revision)
    except (ValueError, TypeError) as error:
        raise LedgerError(f"KV bucket {SHARD_MAP_BUCKET} key {SHARD_MAP_KEY} (revision {entry.revision}) is not a "
                          f"shard map: {error}") from None


async def read_map(js: Any) -> ShardMap:
    """The stored shard map at its revision (an empty map of version 0 when none is stored); LedgerError when the
    key holds something that is not a shard map."""
    return await _read_from(await _map_bucket(js))


def _conflict(expected_version: int, found: int | str) -> ShardMapConflictError:
    return ShardMapConflictError(f"the shard map changed meanwhile: the change was made against version "
                                 f"{expected_version}, the map is now at {found}; nothing was written (read it "
                                 f"again and decide again)")


async def write_map(js: Any, new: ShardMap, expected_version: int, servers: int = 1) -> ShardMap:
    """Store `new` (its numbers: those stored kept, new shards numbered after them) if the stored map is still
    at `expected_version` (0: none stored), a compare-and-set on the KV revision: ShardMapConflictError, nothing
    written, otherwise. Returns the map stored, at its new version. It checks no accounts: `change_map` does."""
    assert isinstance(expected_version, int) and expected_version >= 0, expected_version
    bucket = await ensure_map_bucket(js, servers)
    current = await _read_from(bucket)
    if current.version != expected_version:
        raise _conflict(expected_version, current.version)
    stored = new.renumbered(current)
    document = stored.as_json()
    del document["version"], document["text"]   # the revision is the version; the text is derived
    value = json.dumps(document, separators=(",", ":")).encode()
    try:
        if expected_version == 0:
            revision = await bucket.create(SHARD_MAP_KEY, value)
        else:
            revision = await bucket.update(SHARD_MAP_KEY, value, last=expected_version)
    except nats.js.errors.KeyWrongLastSequenceError:
        raise _conflict(expected_version, "a later one") from None
    except nats.js.errors.APIError as error:
        if error.err_code == WRONG_LAST_SEQUENCE_ERROR_CODE:
            raise _conflict(expected_version, "a later one") from None
        raise
    return dataclasses.replace(stored, version=revision)


# -- the check: no existing account moves --

async def _count(connection: Any, shard: str, move: Move, deadline: float) -> int:
    """How many accounts shard `shard`'s primary holds in the move's ids, asked on its request subject and asked
    again through a failover until `deadline` (the loop's clock); TimeoutError (its cause) past it; the error a
    reply names, raised again."""
    headers, body = encode_request("accounts_in_range", {"first": move.first, "last": move.last})
    loop = asyncio.get_running_loop()
    attempt, cause = 0, "no attempt was made"
    while True:
        left_s = deadline - loop.time()
        if left_s <= 0:
            raise TimeoutError(cause)
        attempt += 1
        try:
            message = await connection.request(request_subject(shard), body, headers=headers,
                                               timeout=min(left_s, REQUEST_ATTEMPT_TIMEOUT_S))
        except nats.errors.NoRespondersError:
            cause = f"no primary serves {request_subject(shard)}"
        except nats.errors.TimeoutError:
            cause = f"no reply on {request_subject(shard)} within {min(left_s, REQUEST_ATTEMPT_TIMEOUT_S):.3g} s"
        else:
            reply = decode_reply(message.headers, message.data)
            if reply.error is None:
                return int(reply.result)
            if reply.error not in RETRYABLE_ERRORS:
                raise error_from_reply(reply)
            cause = f"{reply.error}: {reply.body.decode('utf-8', 'replace')}"
        pause_s = min(RETRY_BACKOFF_S_MIN * 2 ** (attempt - 1), RETRY_BACKOFF_S_MAX)
        await asyncio.sleep(max(0.0, min(pause_s, deadline - loop.time())))


def _where(move: Move) -> str:
    return f"ids {move.first}-{move.last}, which the new map gives to " + \
        (f"shard {move.to}" if move.to is not None else "no shard")


async def _check_owner(connection: Any, owner: str, moves: list[Move], timeout_s: float) -> list[str]:
    """The reasons (none: fine) to refuse taking `moves` from shard `owner`, all asked within timeout_s."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    reasons: list[str] = []
    for move in moves:
        try:
            count = await _count(connection, owner, move, deadline)
        except TimeoutError as error:
            return reasons + [f"shard {owner} did not answer within {timeout_s:g} s whether it holds accounts in "
                              f"{_where(move)} ({error}): nobody can prove it holds none"]
        except Exception as error:   # an error reply (an older node without the method, a closed ledger)
            return reasons + [f"shard {owner} could not say whether it holds accounts in {_where(move)}: "
                              f"{type(error).__name__}: {error}"]
        if count:
            reasons.append(f"shard {owner} holds {count} account(s) in {_where(move)}")
    return reasons


async def check_moves(connection: Any, current: ShardMap, new: ShardMap,
                      timeout_s: float = SHARD_MAP_ANSWER_TIMEOUT_S) -> None:
    """ShardMapRefusedError, naming every shard and range at fault, unless each shard `current` takes ids from
    in `new` answers within timeout_s (all shards asked in parallel) that it holds no account there."""
    assert timeout_s > 0, timeout_s
    by_owner: dict[str, list[Move]] = {}
    for move in current.moves(new):
        by_owner.setdefault(move.owner, []).append(move)
    owners = sorted(by_owner)
    answers = await asyncio.gather(*(_check_owner(connection, owner, by_owner[owner], timeout_s)
                                     for owner in owners))
    reasons = [reason for answer in answers for reason in answer]
    if reasons:
        raise ShardMapRefusedError(f"shard map not changed (still version {current.version}): "
                                   f"{'; '.join(reasons)}. Moving existing accounts between shards is not "
                                   f"supported (docs/CLUSTER.md, \"Shard map\")")


async def change_map(connection: Any, new: ShardMap, expected_version: int | None = None,
                     timeout_s: float = SHARD_MAP_ANSWER_TIMEOUT_S) -> tuple[ShardMap, bool]:
    """Replace the stored map by `new` if no existing account would move (check_moves), compare-and-set on the
    version the check was made against (or on `expected_version`, when given: ShardMapConflictError if the map
    is elsewhere already). Returns the map stored and whether it changed: the same ranges again write nothing."""
    js = connection.jetstream(timeout=REQUEST_TIMEOUT_S)
    current = await read_map(js)
    if expected_version is not None and current.version != expected_version:
        raise _conflict(expected_version, current.version)
    if new.ranges == current.ranges and current.version:
        return current, False
    await check_moves(connection, current, new, timeout_s)
    return await write_map(js, new, current.version, cluster_size(connection)), True


# -- from threads (the CLI) --

def _run(url: str, options: ConnectionOptions | None, work: Callable[[Any], Awaitable[Any]]) -> Any:
    """`work(connection)` on a connection of its own (each server tried once) in a loop of its own, the whole
    bounded by SHARDS_TIMEOUT_S; ClusterUnreachableError when NATS does not answer."""
    async def run() -> Any:
        connection = await connect_once(url, options)
        try:
            return await work(connection)
        finally:
            await connection.close()
    try:
        return asyncio.run(asyncio.wait_for(run(), SHARDS_TIMEOUT_S))
    except (asyncio.TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
        raise ClusterUnreachableError(f"NATS at {redacted(url)} did not answer within {SHARDS_TIMEOUT_S:g} s "
                                      f"({type(error).__name__}): is JetStream enabled?") from None


def read_shard_map(url: str, options: ConnectionOptions | None = None) -> ShardMap:
    """The shard map stored in the cluster at `url` (an empty map of version 0 when none is)."""
    return _run(url, options, lambda connection: read_map(connection.jetstream(timeout=REQUEST_TIMEOUT_S)))


def set_shard_map(url: str, new: ShardMap | str, options: ConnectionOptions | None = None,
                  expected_version: int | None = None,
                  timeout_s: float = SHARD_MAP_ANSWER_TIMEOUT_S) -> tuple[ShardMap, bool]:
    """change_map on the cluster at `url`, `new` a ShardMap or its text form (parse: ValueError naming the bad
    entry, before any connection). Returns the map stored and whether it changed."""
    shard_map = parse(new) if isinstance(new, str) else new
    return _run(url, options, lambda connection: change_map(connection, shard_map, expected_version, timeout_s))
