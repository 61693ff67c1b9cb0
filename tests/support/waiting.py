"""Bounded waits and node opening shared by the cluster tests (tests/test_cluster_*.py)."""
from __future__ import annotations

import time
from typing import Any, Callable

import pytest

import ledger


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float, pause_s: float = 0.02) -> Any:
    """condition()'s first true value, looked at every pause_s; the test fails naming `what` past timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(pause_s)
    pytest.fail(f"not within {timeout_s} s: {what}")


def open_node(url: str, path: Any, shard: str, node: str, wait_s: float, primary: bool = False,
              **options: Any) -> ledger.Ledger:
    """Node `node` of `shard` (created if new) on the cluster at `url`; primary: wait until it is the primary
    (the first node opened takes the lease in open, but a takeover that fails, a new R3 stream still electing
    its leader, is retried by the next poll)."""
    handle = ledger.open(str(path), create=True, cluster=url, shard=shard, node=node, **options)
    if primary:
        assert handle.cluster_node.wait_role("primary", wait_s), handle.cluster_node.error
    return handle
