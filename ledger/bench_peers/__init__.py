"""Peer comparison for `ledger bench`: one deterministic workload run against SQLite, PostgreSQL, Redis, a plain
Python engine and `ledger` itself, each result cross-checked against `ledger`'s (same accepted transfers, same
final balances), so every row did the same work.

Modules: `workload` (the transfers and the reference state), `runner` (the peer interface and the timed loop),
`servers` (PostgreSQL and Redis started on 127.0.0.1 in a temporary directory), one module per peer, and `suite`
(which peers exist on this machine and how to run them). The command line is `ledger/bench_command.py`."""
