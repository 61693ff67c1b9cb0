"""A shard's primary lease (docs/CLUSTER.md, "The lease and the epoch"): the key `lease.<shard>` of the KV bucket
LEDGER_CLUSTER, whose value names the primary and its epoch. Every operation is one JetStream request on the
caller's asyncio loop (the node's LoopThread).

- `take`: `kv.create`, which the server stores only if the key has no value (none, expired or deleted): of two
  nodes taking at once exactly one succeeds. The epoch is the KV revision of that create: the bucket's revisions
  are its stream's sequences, which only grow, so every new primary has a larger epoch than any before it, with
  no counter of our own to keep. The revision is known only once the create is stored, so `take` puts the value
  again at once (a compare-and-set on the create's revision) with the epoch in it; a reader that meets the
  first value (epoch 0) takes the entry's revision as the epoch.
- `renew`: `kv.update(last=revision)`, a compare-and-set on the revision this holder put last. It fails if the
  key expired (no value: its last revision is 0) or someone else took it since: the lease is lost, and
  LedgerNotPrimaryError says so. A holder never takes its lease back by a blind put.
- `read`: who holds the lease, and its epoch; None when nobody does.
- `release`: a delete, conditional on this holder's revision, so a standby can take over at once.

Why a server-side TTL and not clocks: the bucket's max age (LEASE_TTL_S) is measured by the servers, which
remove a value not put again within it; nobody compares wall-clock times between machines (which drift, jump
under NTP, and are read at different moments), and a lease expiring is a fact the servers agree on through Raft.
The holder's own side of the bound is measured with the monotonic clock from BEFORE it sent its last successful
renewal (the server's TTL starts later, when it stores it), less a margin (`fresh`): a process paused by SIGSTOP
or a long GC wakes, sees its renewal too old, and acknowledges nothing more even before it learns it lost."""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType

from ledger.cluster.names import (
    BUCKET,
    LEASE_SAFETY_MARGIN_S,
    LEASE_TTL_S,
    REPLICAS_DEFAULT,
    WRONG_LAST_SEQUENCE_ERROR_CODE,
    check_name,
    check_shard,
    lease_key,
    request_subject,
)
from ledger.errors import LedgerError, LedgerNotPrimaryError

__all__ = ["Lease", "LeaseHolder", "ensure_bucket"]

TTL_TOLERANCE_S = 0.001   # the bucket's max age as the server reports it (nanoseconds, converted) against ours


@dataclasses.dataclass(frozen=True)
class LeaseHolder:
    """Who holds a shard's lease: `node`, its `epoch`, the subject it answers requests on, when it renewed by its
    own wall clock (`renewed_ns`, for people reading status: never compared with another clock) and the KV
    revision of that value."""
    node: str
    epoch: int
    request_subject: str
    renewed_ns: int
    revision: int


async def ensure_bucket(js: Any, servers: int) -> Any:
    """The KV bucket LEDGER_CLUSTER, created if missing (file storage, one value per key, the lease's TTL as its
    max age, min(REPLICAS_DEFAULT, servers) replicas). LedgerError if it exists with another TTL: its leases
    would not lapse when the nodes expect."""
    assert servers >= 1, servers
    try:
        kv = await js.key_value(BUCKET)
    except nats.js.errors.BucketNotFoundError:
        config = KeyValueConfig(bucket=BUCKET, history=1, ttl=LEASE_TTL_S, storage=StorageType.FILE,
                                replicas=min(REPLICAS_DEFAULT, servers))
        return await js.create_key_value(config)
    info = await js.stream_info(f"KV_{BUCKET}")
    if abs((info.config.max_age or 0) - LEASE_TTL_S) > TTL_TOLERANCE_S:
        raise LedgerError(f"KV bucket {BUCKET} has a TTL of {info.config.max_age} s, the ledger's lease needs "
                          f"{LEASE_TTL_S} s: delete the bucket (no node running) to let it be made again")
    return kv


def _holder(entry: Any) -> LeaseHolder:
    """The LeaseHolder of a KV entry of a lease key; LedgerError if its value is not a lease's JSON."""
    try:
        value = json.loads(bytes(entry.value or b""))
        return LeaseHolder(node=str(value["node"]), epoch=int(value["epoch"]) or entry.revision,
                           request_subject=str(value["request_subject"]), renewed_ns=int(value["renewed_ns"]),
                           revision=entry.revision)
    except (ValueError, KeyError, TypeError) as error:
        raise LedgerError(f"KV bucket {BUCKET} key {entry.key}: not a lease ({error!r})") from None


class Lease:
    """Node `node`'s view of shard `shard`'s lease in `kv` (ensure_bucket). While it holds the lease, `epoch` and
    `revision` are set and `renewed_monotonic` is the monotonic time just before its last successful put."""

    def __init__(self, kv: Any, shard: str, node: str) -> None:
        self.kv = kv
        self.shard = check_shard(shard)
        self.node = check_name("node", node)
        self.key = lease_key(shard)
        self.epoch = 0
        self.revision: int | None = None
        self.renewed_monotonic = 0.0

    @property
    def held(self) -> bool:
        """Whether this node holds the lease as far as it knows (it may have lapsed: see `fresh`)."""
        return self.revision is not None

    def age_s(self) -> float:
        """Seconds since this holder sent its last successful renewal (monotonic: a paused process counts it)."""
        return time.monotonic() - self.renewed_monotonic

    def fresh(self) -> bool:
        """Whether the lease is held and certainly not lapsed: renewed within LEASE_TTL_S less the safety margin."""
        return self.held and self.age_s() < LEASE_TTL_S - LEASE_SAFETY_MARGIN_S

    def _value(self, epoch: int) -> bytes:
        return json.dumps({"node": self.node, "epoch": epoch, "request_subject": request_subject(self.shard),
                           "renewed_ns": time.time_ns()}).encode()

    async def read(self) -> LeaseHolder | None:
        """Who holds the lease now, or None (never taken, lapsed or released)."""
        try:
            return _holder(await self.kv.get(self.key))
        except nats.js.errors.KeyNotFoundError:
            return None

    async def take(self) -> LeaseHolder | None:
        """Take the lease if nobody holds it: this node's LeaseHolder (its new epoch), or None if another node
        holds it (or took it first)."""
        assert not self.held, "take() while holding the lease"
        sent = time.monotonic()
        try:
            created = await self.kv.create(self.key, self._value(0))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        except nats.js.errors.APIError as error:
            if error.err_code == WRONG_LAST_SEQUENCE_ERROR_CODE:
                return None
            raise
        self.epoch, self.revision, self.renewed_monotonic = created, created, sent
        await self.renew()   # the value now carries its epoch
        return LeaseHolder(self.node, self.epoch, request_subject(self.shard), time.time_ns(), self.revision or 0)

    async def renew(self) -> None:
        """Put the lease again, compare-and-set on this holder's last revision. LedgerNotPrimaryError if that
        fails (lapsed or taken by another node): the lease is lost, and forgotten here. Other errors (a timeout,
        no servers) leave it held as far as this node knows; `fresh` bounds how long that may last."""
        assert self.revision is not None, "renew() without the lease"
        sent = time.monotonic()
        try:
            self.revision = await self.kv.update(self.key, self._value(self.epoch), last=self.revision)
        except nats.js.errors.KeyWrongLastSequenceError as error:
            lost_revision, self.revision = self.revision, None
            raise LedgerNotPrimaryError(
                f"node {self.node} lost the lease of shard {self.shard} (epoch {self.epoch}): it lapsed or another "
                f"node took it (the lease's revision is no longer {lost_revision}: {error.description})") from None
        self.renewed_monotonic = sent

    async def release(self) -> None:
        """Give the lease up now (a delete, only if this holder's value is still the last), so that a standby
        takes over without waiting for the TTL. Forgotten here whatever the outcome: an error leaves the key to
        expire."""
        revision, self.revision = self.revision, None
        if revision is not None:
            try:
                await self.kv.delete(self.key, last=revision)
            except nats.js.errors.APIError:
                pass   # taken already by another node, or not stored: it lapses by itself
