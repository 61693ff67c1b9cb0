from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import model` from the tests


class Clock:
    """An injected clock: a zero-argument callable returning int nanoseconds, moved by the test."""

    def __init__(self, t: int = 1_700_000_000 * 10**9):
        self.t = t

    def __call__(self) -> int:
        return self.t

    def advance(self, ns: int) -> None:
        self.t += ns

    def set(self, t: int) -> None:
        self.t = t


@pytest.fixture
def clock():
    return Clock()


def _engine_or_skip():
    try:
        import ledger  # noqa: F401
        from ledger import open as _open  # noqa: F401
    except Exception as e:  # pragma: no cover - only while the core is not built
        pytest.skip(f"ledger engine not importable: {e!r}")
    return ledger


@pytest.fixture
def tiny_filesystem(tmp_path):
    """mount(size) -> the path of a fresh tmpfs of that size (as `mount -o size=` takes it: "768k"), for tests
    that need a real full disk; unmounted afterwards. Skips the test where tmpfs cannot be mounted (not root)."""
    mounted = []

    def mount(size: str):
        path = tmp_path / f"tmpfs-{len(mounted)}"
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def engine(clock):
    """An in-memory engine ledger driven by the injected clock."""
    ledger = _engine_or_skip()
    lg = ledger.open(None, clock=clock)
    yield lg
    try:
        lg.close()
    except Exception:
        pass


@pytest.fixture(params=["engine", "model"])
def lg(request, clock):
    """The same rule tests run against the engine and against the reference model."""
    if request.param == "engine":
        ledger = _engine_or_skip()
        handle = ledger.open(None, clock=clock)
    else:
        from model import ModelLedger

        handle = ModelLedger(clock)
    yield handle
    try:
        handle.close()
    except Exception:
        pass


def pytest_terminal_summary(terminalreporter):
    mod = sys.modules.get("test_stateful")
    stats = getattr(mod, "STATS", None)
    if stats and stats.get("examples"):
        terminalreporter.write_line(
            "stateful ({}): {examples} examples, {steps} steps, {rows} rows ({ok_rows} OK)".format(
                getattr(mod, "PROFILE", "?"), **stats))
