from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import support.model` from the tests

from support.clock import Clock  # noqa: E402


@pytest.fixture(autouse=True)
def _kill_what_the_test_started():
    """Every subprocess a test starts is killed at its end if it is still running: a test that fails (or times out
    waiting) must not leave a writer, a client or a projector running into the next tests."""
    started = []
    real_init = subprocess.Popen.__init__

    def tracking_init(self, *arguments, **options):
        real_init(self, *arguments, **options)
        started.append(self)

    subprocess.Popen.__init__ = tracking_init
    try:
        yield
    finally:
        subprocess.Popen.__init__ = real_init
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def clock():
    return Clock()


def pytest_configure(config):
    """An unbuilt (or broken) core fails the run at once, with what to do: never tests quietly skipped."""
    try:
        import ledger
        from ledger import _core, _ring
    except ImportError as error:
        raise pytest.UsageError(f"the ledger package does not import ({error!r}): build the core first, "
                                f"`python setup.py build_ext --inplace`, and put the checkout on PYTHONPATH")
    # An editable install of another checkout (pip install -e) answers for a compiled module missing here: the
    # tests would run this checkout's Python against another checkout's core.
    package = os.path.dirname(os.path.abspath(ledger.__file__))
    for module in (_core, _ring):
        if os.path.dirname(os.path.abspath(module.__file__)) != package:
            raise pytest.UsageError(f"{module.__name__} comes from {module.__file__}, not from {package}: build "
                                    f"this checkout's core (`python setup.py build_ext --inplace`)")


def _engine():
    import ledger
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
    ledger = _engine()
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
        ledger = _engine()
        handle = ledger.open(None, clock=clock)
    else:
        from support.model import ModelLedger

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
