"""The asyncio client of a shard over NATS (docs/CLUSTER.md, "Clients"), as nats-py users expect:

    import ledger.aio
    async with await ledger.aio.connect("nats://127.0.0.1:4222", shard="eu") as client:
        result = await client.transfer(id, debit, credit, 100)

`connect` returns a `ledger.cluster.client.AsyncClient`: the calls of the ring client (transfer, transfers,
create_account, create_accounts, account, balance, available) plus lookup_transfers and history, as coroutines,
with the same arguments, results and errors. Pass `connection=` an open nats-py connection to share it."""
from __future__ import annotations

from ledger.cluster.client import AsyncClient, Read
from ledger.cluster.client import connect_async as connect

__all__ = ["AsyncClient", "Read", "connect"]
