"""A producer of a test's ring server inside the test process: its own mapping of the ring file, as a client
process has (tests/test_ring.py and tests/test_commit.py drive the server's ring through it)."""
from __future__ import annotations

import mmap
import os

from ledger import _ring


def producer(server) -> _ring.Ring:
    """Another producer with its own mapping of the writer's ring file (as a client process has)."""
    fd = os.open(os.path.join(server.directory, "commands.ring"), os.O_RDWR)
    try:
        memory = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    ring = _ring.Ring(memory, os.getpid())
    ring.attach()
    return ring
