"""Redis with a Lua transfer script and the append-only file on, through redis-py over TCP on 127.0.0.1.

appendfsync always: Redis fsyncs the append-only file before it answers the commands of an event-loop round, so
when a pipeline returns, its transfers are on disk. appendfsync everysec: at most about one second of acknowledged
transfers is lost on a machine crash. Two shapes: one EVALSHA per transfer, pipelined per batch (what the brief
describes), and one EVALSHA per batch whose script loops over the batch, handed over as a single binary argument
of packed little-endian int64s (the fastest shape a client can give Redis: redis-py's argument encoding would
otherwise cost more than the script). Balances live in one hash, the record of applied transfers (the
idempotency index) in another. Install hiredis (`pip install hiredis`) for redis-py's fast reply parser."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ledger.bench_peers.servers import LOOPBACK
from ledger.bench_peers.workload import PeerState, Workload

BALANCES_KEY = "balances"
TRANSFERS_KEY = "transfers"
OK, INSUFFICIENT_FUNDS, EXISTS = 0, 1, 2

# The same body serves both scripts: apply one transfer, return OK, INSUFFICIENT_FUNDS or EXISTS.
_APPLY_ONE = """
local function apply(id, debit, credit, amount)
    if redis.call('HEXISTS', KEYS[2], id) == 1 then return 2 end
    local balance = tonumber(redis.call('HGET', KEYS[1], debit))
    if balance == nil then return redis.error_reply('debit account ' .. debit .. ' not found') end
    if balance < amount then return 1 end
    redis.call('HINCRBY', KEYS[1], debit, -amount)
    redis.call('HINCRBY', KEYS[1], credit, amount)
    redis.call('HSET', KEYS[2], id, debit .. ':' .. credit .. ':' .. amount)
    return 0
end
"""
TRANSFER_SCRIPT = _APPLY_ONE + "return apply(ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]))\n"
# ARGV[1]: the batch as rows of four little-endian int64 (id, debit, credit, amount). Lua numbers are doubles:
# exact for every value of this workload (below 2**53, asserted in workload.make_workload); tostring() of an
# integral double prints it as an integer, the same key text redis-py writes for a Python int.
BATCH_SCRIPT = _APPLY_ONE + """
local packed = ARGV[1]
local results = {}
local unpack = struct.unpack
for offset = 1, #packed, 32 do
    local id, debit, credit, amount = unpack('<i8i8i8i8', packed, offset)
    results[#results + 1] = apply(string.format('%d', id), string.format('%d', debit),
                                  string.format('%d', credit), amount)
end
return results
"""
SETUP_CHUNK = 10_000


class RedisPeer:
    group = "redis"
    per_commit = False

    def __init__(self, port: int, version: str, batch_size: int, appendfsync: str, script_per_batch: bool) -> None:
        assert batch_size >= 1 and appendfsync in ("always", "everysec")
        self.port = port
        self.step_size = batch_size
        self.appendfsync = appendfsync
        # A batch's calls reach the server together and are synced together (appendfsync always), or not
        # before the answer at all (everysec: up to a second of acknowledged writes can be lost).
        self.commit_unit = "batch"
        self.durable = appendfsync == "always"
        self.script_per_batch = script_per_batch
        shape = (f"one Lua call per batch of {batch_size:,}" if script_per_batch
                 else f"Lua call per transfer, pipelined {batch_size:,}")
        self.label = f"Redis {version}, {shape}, appendfsync {appendfsync}"
        self.client = None

    def open(self, workload: Workload, directory: Path) -> None:
        import redis  # imported here: the suite checks it is installed before building this peer
        self.workload = workload
        self.client = redis.Redis(host=LOOPBACK, port=self.port)
        self.client.flushall()
        self.client.config_set("appendfsync", self.appendfsync)
        ids = workload.all_account_ids().tolist()
        balances = workload.opening_balances().tolist()
        for start in range(0, len(ids), SETUP_CHUNK):
            chunk = dict(zip(ids[start:start + SETUP_CHUNK], balances[start:start + SETUP_CHUNK]))
            self.client.hset(BALANCES_KEY, mapping=chunk)
        self.script = self.client.script_load(BATCH_SCRIPT if self.script_per_batch else TRANSFER_SCRIPT)

    def apply(self, start: int, stop: int) -> None:
        if self.script_per_batch:
            rows = np.empty((stop - start, 4), "<i8")
            for column, values in enumerate((self.workload.transfer_ids, self.workload.debit_accounts,
                                             self.workload.credit_accounts, self.workload.amounts)):
                rows[:, column] = values[start:stop]
            results = self.client.evalsha(self.script, 2, BALANCES_KEY, TRANSFERS_KEY, rows.tobytes())
        else:
            pipeline = self.client.pipeline(transaction=False)
            for row in zip(*self.workload.columns(start, stop)):
                pipeline.evalsha(self.script, 2, BALANCES_KEY, TRANSFERS_KEY, *row)
            results = pipeline.execute()
        assert len(results) == stop - start and all(result in (OK, INSUFFICIENT_FUNDS) for result in results)

    def state(self) -> PeerState:
        balance_by_id = {int(key): int(value) for key, value in self.client.hgetall(BALANCES_KEY).items()}
        ids = self.workload.all_account_ids().tolist()
        assert len(balance_by_id) == len(ids)
        balances = np.array([balance_by_id[id] for id in ids], np.int64)
        accepted = np.sort(np.array([int(key) for key in self.client.hkeys(TRANSFERS_KEY)], np.uint64))
        return PeerState(balances=balances, accepted_ids=accepted)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
