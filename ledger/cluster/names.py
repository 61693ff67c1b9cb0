"""The one statement of the cluster's names, headers and limits (docs/CLUSTER.md): what every node and client of
a cluster must agree on, so that no two modules spell a subject, a key or a bound differently.

Per shard NAME (1 to 64 of A-Z a-z 0-9 _ -: valid in a stream name and as one subject token):

- stream `LEDGER_<NAME>`, subject `ledger.journal.<NAME>`: the replicated journal, one message per committed batch
  range (byte for byte), or an epoch marker (an empty message a new primary publishes before it serves);
- KV bucket `LEDGER_CLUSTER` (one per cluster, its TTL the lease's): key `lease.<NAME>` (the primary's lease) and
  `node.<NAME>.<NODE>` (each node's role and position, put while it runs, for `ledger cluster status`);
- KV bucket `LEDGER_SHARDS` (one per cluster, no TTL, a few revisions kept): key `map`, the shard map (ranges of
  account ids -> shard; its KV revision is its version);
- object store bucket `LEDGER_SNAPSHOTS_<NAME>`: the primary's snapshots, for a node that rejoins;
- request subjects `ledger.request.<NAME>` (the primary answers commands and reads) and `ledger.read.<NAME>` (every
  node answers reads, for consistency="standby")."""
from __future__ import annotations

import re

from ledger.cluster.servers import MAX_PAYLOAD_BYTES

SHARD_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")   # a stream name and a subject token: no '.', '*', '>', space
NODE_PATTERN = SHARD_PATTERN                           # a node name is one KV key token too
STREAM_PREFIX = "LEDGER_"
SUBJECT_PREFIX = "ledger.journal."
BUCKET = "LEDGER_CLUSTER"
SNAPSHOT_BUCKET_PREFIX = "LEDGER_SNAPSHOTS_"
REQUEST_SUBJECT_PREFIX = "ledger.request."
READ_SUBJECT_PREFIX = "ledger.read."

# -- message headers --
HEADER_MESSAGE_ID = "Nats-Msg-Id"                  # a batch: its start journal position; a marker: epoch-<N>
MARKER_ID_PREFIX = "epoch-"                         # a marker's Nats-Msg-Id: epoch-<N>
HEADER_EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"   # the single-writer fence
HEADER_END_POSITION = "Ledger-End-Position"        # a batch: its end; a marker: the stream's end position then
HEADER_EPOCH = "Ledger-Epoch"                      # on a marker (and on every batch: the epoch that published it)
HEADER_NODE = "Ledger-Node"                        # the node that published the message
# A batch larger than one message goes as parts "k/n" (1-based), in order, each with its Ledger-End-Position:
# part k has Nats-Msg-Id <start>.<k>.<publisher> (another publisher's parts at the same start are not duplicates);
# the follower joins them before it applies the batch, and drops an incomplete run at an epoch marker.
HEADER_PART = "Ledger-Part"
WRONG_LAST_SEQUENCE_ERROR_CODE = 10071             # JetStream's "wrong last sequence"
NO_RESPONDERS_STATUS = "503"                       # NATS's reply status to a publish no subscriber received

# -- limits and timings, every one of the cluster in this one place --
REPLICAS_DEFAULT = 3
ACK_TIMEOUT_S = 10.0          # the one bound on a publish's ack: past it the batch is in doubt, the handle poisoned
CONNECT_TIMEOUT_S = 5.0
STATUS_CONNECT_RETRY_WAIT_S = 0.1   # `cluster status` tries each server once (nats-py's default: 60 x 2 s)
REQUEST_TIMEOUT_S = 10.0      # stream info, message reads, KV operations
LEASE_TTL_S = 2.0             # a lease not renewed for this long lapses (the KV bucket's max age)
LEASE_RENEW_INTERVAL_S = 0.5  # the primary renews this often: three renewals may fail before it lapses
LEASE_POLL_INTERVAL_S = 0.25  # a standby looks this often whether the lease lapsed
NODE_REPORT_INTERVAL_S = 1.0  # each node puts its role and position this often (status)
LEASE_SAFETY_MARGIN_S = 0.5   # a primary acknowledges nothing once its last renewal is older than TTL less this
# A standby's look at the lease and a would-be primary's at the stream's end: a stream with no Raft leader (its
# server just killed, an election under way) answers nothing, and a takeover waiting REQUEST_TIMEOUT_S for it
# holds the lease all along (a poll: waits), long after the new leader is there. Past this bound the takeover
# lets the lease go and the next poll tries again.
TAKEOVER_REQUEST_TIMEOUT_S = 1.0
TAKEOVER_CATCH_UP_TIMEOUT_S = 60.0   # a new primary's wait to apply the stream to its end (it renews meanwhile)
FENCE_ATTEMPTS_MAX = 5        # a new primary's epoch marker refused this often (the old one still appending): give up
STEP_DOWN_RETRY_S = 1.0       # a failed role change (NATS unreachable) is tried again after this pause
PUBLISH_EXISTING_BATCHES_MAX = 4096   # batch headers read at once while publishing a pre-cluster journal
PUBLISH_IN_FLIGHT_MAX = 16    # messages published and not yet acknowledged, at most (a publisher's send waits)
SERVE_POLL_INTERVAL_S = 0.2  # `serve --cluster` looks this often for a stop signal, a new primary, a snapshot due
SERVE_RETRY_INTERVAL_S = 1.0  # `serve --cluster`: a request Service that did not start is tried again after this
JOURNAL_START_POSITION = 1    # an empty journal's write position
SNAPSHOTS_KEPT = 3            # snapshots kept in a shard's bucket: the stream is trimmed below the oldest of them
SNAPSHOT_INTERVAL_S = 300.0   # `ledger serve --cluster`: its primary snapshots this often (uploaded, then pruned)
HEADER_SNAPSHOT_POSITION = "Ledger-Snapshot-Position"   # an uploaded snapshot's journal position (object header)
# An uploaded snapshot's oldest still-pending transfer: the journal position of its event (object header; absent
# when none is pending). The stream is kept from the batch holding it, and a rejoin writes those batches back.
HEADER_PENDING_POSITION = "Ledger-Pending-Position"
STREAM_READY_TIMEOUT_S = 10.0   # a new stream's wait for a Raft leader and for its subject to reach the servers
START_REQUEST_TIMEOUT_S = 2.0   # a node's start-time requests (bucket, stream), tried again within STREAM_READY_TIMEOUT_S
STREAM_READY_RETRY_S = 0.05     # between looks at a stream not ready yet (no leader, no responders)
NO_RESPONDERS_RETRY_S = 0.05    # a publish nobody received (no stream took the subject yet) is sent again after
TAKEOVER_DEFER_MIN_S = 0.4      # a standby behind a live one waits this long before taking a lapsed lease ...
TAKEOVER_DEFER_PER_POSITION_S = 0.0001   # ... plus this per journal position it is behind ...
TAKEOVER_DEFER_MAX_S = 0.75     # ... at most: well under a second, and only ever a preference
# The largest message: the servers' max_payload less room for the headers.
MESSAGE_BYTES_MAX = MAX_PAYLOAD_BYTES - 4096

assert LEASE_RENEW_INTERVAL_S * 3 < LEASE_TTL_S and LEASE_POLL_INTERVAL_S < LEASE_TTL_S
assert LEASE_RENEW_INTERVAL_S < LEASE_TTL_S - LEASE_SAFETY_MARGIN_S


def check_name(kind: str, name: str) -> str:
    """`name` if it is a valid shard or node name (`kind` says which, for the error): 1 to 64 of A-Z, a-z, 0-9,
    '_' and '-'; ValueError otherwise."""
    if not isinstance(name, str) or SHARD_PATTERN.fullmatch(name) is None:
        raise ValueError(f"{kind} name {name!r}: use 1 to 64 of A-Z, a-z, 0-9, '_' and '-'")
    return name


def check_shard(shard: str) -> str:
    """`shard` if it is a valid shard name; ValueError otherwise."""
    return check_name("shard", shard)


def stream_name(shard: str) -> str:
    """The JetStream stream holding shard `shard`'s journal."""
    return STREAM_PREFIX + check_shard(shard)


def subject(shard: str) -> str:
    """The subject shard `shard`'s batches are published on (the stream's only subject)."""
    return SUBJECT_PREFIX + check_shard(shard)


def lease_key(shard: str) -> str:
    """The KV key of shard `shard`'s primary lease."""
    return "lease." + check_shard(shard)


def node_key(shard: str, node: str) -> str:
    """The KV key where node `node` of shard `shard` reports its role and position."""
    return f"node.{check_shard(shard)}.{check_name('node', node)}"


def snapshot_bucket(shard: str) -> str:
    """The object store bucket holding shard `shard`'s snapshots."""
    return SNAPSHOT_BUCKET_PREFIX + check_shard(shard)


def request_subject(shard: str) -> str:
    """The subject shard `shard`'s primary answers requests on."""
    return REQUEST_SUBJECT_PREFIX + check_shard(shard)


def read_subject(shard: str) -> str:
    """The subject every node of shard `shard` answers reads on (consistency="standby")."""
    return READ_SUBJECT_PREFIX + check_shard(shard)


# -- requests over NATS (ledger/cluster/protocol.py, client.py, service.py; docs/CLUSTER.md "Requests over NATS") --
PROTOCOL_VERSION = 1                  # Ledger-Version of every request and reply; an unknown one is refused
HEADER_VERSION = "Ledger-Version"
HEADER_METHOD = "Ledger-Method"       # a request: which call (transfers, create_accounts, account, ...)
HEADER_ARGUMENTS = "Ledger-Arguments"  # a request: its scalar arguments, as small JSON
HEADER_ERROR = "Ledger-Error"         # a reply: the exception's class name (the body is its message)
HEADER_POSITION = "Ledger-Position"   # a reply: the journal write position the answer reflects
HEADER_RESULT = "Ledger-Result"       # a reply: a scalar result, as small JSON
ARGUMENTS_BYTES_MAX = 4096            # the JSON of a request's scalar arguments, or of a reply's result
ERROR_MESSAGE_BYTES_MAX = 4096        # an error reply's message (longer ones are cut)
REQUEST_ROWS_MAX = 32_768             # rows of one request (the ring client's per-call limit too): 2 MiB of
                                      # transfers, well inside MESSAGE_BYTES_MAX once journaled with its expiries
COALESCED_ROWS_MAX = 16_384           # rows the client joins into one request and the service into one core call
SERVICE_QUEUE_REQUESTS_MAX = 4096     # requests a service holds unanswered; past it a request answers busy
CLIENT_WAITING_CALLS_MAX = 65_536     # calls waiting in one client for a request; past it a call is busy
CLIENT_REQUESTS_IN_FLIGHT_MAX = 2     # requests of one write method a client has out at once: the rest wait
                                      # and are coalesced into the next one
REQUEST_ATTEMPT_TIMEOUT_S = 3.0       # one attempt's wait for a reply; past it the request is sent again
                                      # (a primary killed mid-call): an applied transfer then answers EXISTS
RETRY_BACKOFF_S_MIN = 0.01            # the pause before a retry starts here and doubles per attempt
RETRY_BACKOFF_S_MAX = 0.2
READ_QUEUE_GROUP = "ledger-read"      # the read subject's queue group: one node answers each read
CLIENT_TIMEOUT_MS_DEFAULT = 30_000    # a call's whole budget, retries included (as the ring client's)
CLIENT_TIMEOUT_MS_MAX = 3_600_000
SERVICE_STOP_TIMEOUT_S = 15.0         # stop() waits this long at most for the requests in progress

# -- the shard map (ledger/cluster/shards.py; docs/CLUSTER.md "Shard map") --
SHARD_MAP_BUCKET = "LEDGER_SHARDS"     # one per cluster, no TTL: the map lives until it is set again
SHARD_MAP_KEY = "map"
SHARD_MAP_HISTORY = 5                 # revisions of the map the bucket keeps (people looking back; KV allows 64)
SHARD_MAP_FORMAT = 1                  # the stored JSON's (and `ledger cluster shards --json`'s) version
SHARD_MAP_RANGES_MAX = 1024           # ranges of one map: its JSON stays far below a message (about 64 KiB)
SHARD_NUMBERS_MAX = 1024              # shards a cluster ever numbers (a number is never reused: bridge accounts)
ACCOUNT_ID_MIN = 1                    # id 0 is no account
# Ids from 2**63 up are the cluster's own: the bridge accounts between shards and the leg ids derived from a
# caller's transfer id (issue 15). A shard map never gives them to a shard, so no caller's account collides.
CLUSTER_ID_MIN = 2**63
# How long a shard's primary has to answer whether it holds accounts in a range a new map takes from it (its
# requests retried within it through a failover); past it the change is refused: nobody proved the range empty.
SHARD_MAP_ANSWER_TIMEOUT_S = 3.0

assert SHARD_MAP_HISTORY <= 64 and ACCOUNT_ID_MIN < CLUSTER_ID_MIN
