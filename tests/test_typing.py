"""The hand-written stubs (ledger/__init__.pyi) against the code: mypy --strict over the stubs and a usage example
(tests/support/typing_example.py, which is also run), mypy rejecting misuse (so the check cannot pass vacuously), the
stub's names, signatures and enum members against the package's (by hand, and by mypy.stubtest over the stub
alone), and an editable install that mypy can see."""
from __future__ import annotations

import ast
import enum
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ledger

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "ledger" / "__init__.pyi"
EXAMPLE = ROOT / "tests" / "support" / "typing_example.py"
MYPY_TIMEOUT_S = 300   # a guard against a hang only: a cold run takes seconds
STUB_ONLY_NAMES = {"Batch", "Moment", "Durability", "Consistency", "NetworkClient", "Read"}   # only for the type
# checker: aliases, and the classes of the NATS client, which ledger does not import (it needs the cluster extra)
STUB_ONLY_CLASSES = {"NetworkClient": "Client", "Read": "Read"}   # of ledger.cluster.client: checked against it
STUBTEST_ALLOWLIST = ROOT / "tests" / "support" / "stubtest_allowlist.txt"

# Misuse that the stubs must reject: (line of code, the mypy error code expected on it).
MISUSE = [
    ('ledger.open(None, durability="sometimes")', "arg-type"),
    ('ledger.open(None, fault_injector=print)', "call-arg"),
    ("report: int = ledger.open(None).verify()", "assignment"),
    ("info: ledger.SnapshotInfo = ledger.open('d').snapshot(wait=False)", "assignment"),
    ("ledger.open(None).transfer(1, 2, 3, 4, 5)", "call-arg"),
    ('ledger.open(None).create_account("1")', "arg-type"),
]


def mypy(*arguments: str, cwd: Path, cache: Path, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    command = [python, "-m", "mypy", "--strict", "--no-error-summary", "--show-error-codes",
               "--cache-dir", str(cache), *arguments]
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "MYPYPATH")}
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=MYPY_TIMEOUT_S)


@pytest.fixture(scope="module")
def mypy_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One mypy run (mypy is slow to start) over the stubs, the example and a file of misuse."""
    try:
        import mypy as _  # noqa: F401
    except ImportError:
        pytest.fail("mypy is not installed: pip install -e '.[test]'")
    directory = tmp_path_factory.mktemp("typing")
    misuse = directory / "misuse.py"
    misuse.write_text("import ledger\n" + "".join(f"{line}\n" for line, _ in MISUSE))
    return mypy(str(STUB), str(EXAMPLE), str(misuse), cwd=ROOT, cache=directory / "cache"), misuse


def test_the_stubs_and_the_usage_example_pass_mypy_strict(mypy_run):
    outcome, misuse = mypy_run
    lines = [line for line in outcome.stdout.splitlines() if not line.startswith(str(misuse))]
    assert outcome.returncode in (0, 1), outcome.stderr
    assert lines == [], "\n".join(lines)


def test_mypy_rejects_misuse_of_the_api(mypy_run):
    outcome, misuse = mypy_run
    for number, (code, error_code) in enumerate(MISUSE, 2):
        found = [line for line in outcome.stdout.splitlines()
                 if line.startswith(f"{misuse}:{number}:") and ": error:" in line]
        assert found, f"mypy accepted {code!r}:\n{outcome.stdout}"
        assert any(f"[{error_code}]" in line for line in found), found


def test_the_usage_example_runs():
    outcome = subprocess.run([sys.executable, str(EXAMPLE)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=MYPY_TIMEOUT_S)
    assert outcome.returncode == 0, outcome.stderr


# -- the stub against the package, name by name --

def stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text())


def stub_names(body: list[ast.stmt]) -> set[str]:
    names = set()
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def test_the_stub_declares_every_public_name_and_no_other():
    declared = stub_names(stub_tree().body) - STUB_ONLY_NAMES - {"__version__"}
    assert set(ledger.__all__) == declared, (f"missing from the stub: {set(ledger.__all__) - declared}; "
                                             f"not in ledger.__all__: {declared - set(ledger.__all__)}")
    assert not STUB_ONLY_NAMES & set(dir(ledger))


def stub_functions() -> list[tuple[str, str | None, ast.FunctionDef]]:
    """(owner name or "", method or function name, its definition) of every stubbed function, overloads left out
    (their runtime is one function with the union of their parameters)."""
    found = []
    for node in stub_tree().body:
        children = [(node.name, child) for child in node.body] if isinstance(node, ast.ClassDef) else [("", node)]
        for owner, child in children:
            if isinstance(child, ast.FunctionDef) and not any(
                    isinstance(decorator, ast.Name) and decorator.id in ("overload", "property")
                    for decorator in child.decorator_list):
                found.append((owner, child.name, child))
    return found


def stub_parameters(definition: ast.FunctionDef) -> list[tuple[str, str, object]]:
    """(name, kind, default) per parameter; default is a literal value, or ... when the stub leaves it out."""
    arguments = definition.args
    positional = arguments.posonlyargs + arguments.args
    defaults: list[object] = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
    out = [(argument.arg, "positional", default) for argument, default in zip(positional, defaults)]
    if arguments.vararg:
        out.append((arguments.vararg.arg, "var_positional", None))
    out += [(argument.arg, "keyword", default)
            for argument, default in zip(arguments.kwonlyargs, arguments.kw_defaults)]
    if arguments.kwarg:
        out.append((arguments.kwarg.arg, "var_keyword", None))
    decorators = definition.decorator_list
    if any(isinstance(decorator, ast.Name) and decorator.id == "classmethod" for decorator in decorators):
        out = out[1:]   # cls: bound already on the runtime side
    return [(name, kind, None if default is None else _literal(default)) for name, kind, default in out]


def _literal(node: object) -> object:
    try:
        return ast.literal_eval(node)  # type: ignore[arg-type]
    except ValueError:
        return ...


KINDS = {inspect.Parameter.POSITIONAL_ONLY: "positional", inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
         inspect.Parameter.VAR_POSITIONAL: "var_positional", inspect.Parameter.KEYWORD_ONLY: "keyword",
         inspect.Parameter.VAR_KEYWORD: "var_keyword"}


def runtime_parameters(function: object) -> list[tuple[str, str, object]]:
    out = []
    for parameter in inspect.signature(function).parameters.values():  # type: ignore[arg-type]
        default = None if parameter.default is inspect.Parameter.empty else parameter.default
        out.append((parameter.name, KINDS[parameter.kind], default))
    return out


def test_stub_signatures_match_the_code():
    checked = 0
    problems = []
    for owner, name, definition in stub_functions():
        if owner in STUB_ONLY_CLASSES:
            from ledger.cluster import client
            runtime_owner = getattr(client, STUB_ONLY_CLASSES[owner])
        else:
            runtime_owner = getattr(ledger, owner) if owner else None
        runtime = getattr(runtime_owner, name) if owner else getattr(ledger, name)
        if name == "__init__" and owner and runtime_owner.__init__ is object.__init__:
            continue
        try:
            actual = runtime_parameters(runtime)
        except ValueError:
            continue   # a builtin without a signature
        if name == "connect" and not owner:
            actual = [entry for entry in actual if entry[1] != "var_keyword"]   # **options, checked by Client
            expected = [entry for entry in stub_parameters(definition) if entry[1] != "keyword"]
        else:
            expected = stub_parameters(definition)
        # Names and kinds must agree; a default must agree where the stub spells it out.
        if [(n, k) for n, k, _ in expected] != [(n, k) for n, k, _ in actual]:
            problems.append(f"{owner}.{name}: stub {[entry[:2] for entry in expected]}, "
                            f"code {[entry[:2] for entry in actual]}")
            continue
        for (parameter, _, stub_default), (_, _, code_default) in zip(expected, actual):
            if stub_default is not ... and stub_default != code_default:
                problems.append(f"{owner}.{name}({parameter}): default {stub_default!r} in the stub, "
                                f"{code_default!r} in the code")
        checked += 1
    assert not problems, "\n".join(problems)
    assert checked > 40


def stub_enums() -> dict[str, tuple[str, dict[str, object]]]:
    """name -> (enum base, {member: value}) of every enum class in the stub."""
    found = {}
    for node in stub_tree().body:
        bases = [base.attr for base in node.bases if isinstance(base, ast.Attribute)] \
            if isinstance(node, ast.ClassDef) else []
        if bases and bases[0] in ("Enum", "IntEnum", "Flag", "IntFlag"):
            members = {target.id: ast.literal_eval(child.value) for child in node.body
                       if isinstance(child, ast.Assign) for target in child.targets if isinstance(target, ast.Name)}
            found[node.name] = (bases[0], members)
    return found


def test_stub_enums_have_the_code_members_and_values():
    """stubtest does not compare enum values: a stub saying PENDING_EXPIRED = 6 would pass it."""
    declared = stub_enums()
    runtime = {name: getattr(ledger, name) for name in ledger.__all__
               if isinstance(getattr(ledger, name), type) and issubclass(getattr(ledger, name), enum.Enum)}
    assert sorted(declared) == sorted(runtime), "enums in the stub and in ledger.__all__ differ"
    for name, cls in runtime.items():
        base, members = declared[name]
        assert issubclass(cls, getattr(enum, base)), f"{name}: the stub says {base}, the code {cls.__mro__[1:]}"
        assert members == {member: item.value for member, item in cls.__members__.items()}, name


def test_mypy_stubtest_agrees_with_the_package(tmp_path):
    """mypy.stubtest over the stub alone (copied into its own folder: next to the package's modules mypy would
    type-check all of them first, and stop at their errors). Submodules have no stubs by design: the stub is the
    public face, `ledger.*`. What cannot match is listed, with why, in tests/support/stubtest_allowlist.txt."""
    stubs = tmp_path / "stubs" / "ledger"
    stubs.mkdir(parents=True)
    shutil.copy2(STUB, stubs / "__init__.pyi")
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\ncache_dir = {tmp_path / 'cache'}\n")
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "MYPYPATH": str(tmp_path / "stubs")}
    outcome = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "ledger", "--mypy-config-file", str(config), "--ignore-missing-stub",
         "--allowlist", str(STUBTEST_ALLOWLIST)],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=MYPY_TIMEOUT_S)
    assert outcome.returncode == 0, outcome.stdout + outcome.stderr


# -- an editable install, as the README makes it, is visible to mypy --

def copy_project(destination: Path) -> None:
    destination.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    shutil.copytree(ROOT / "ledger", destination / "ledger",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c", ".mypy_cache"))


@pytest.mark.slow
def test_an_editable_install_is_visible_to_mypy(tmp_path):
    """`pip install -e .` of a copy of the project into a fresh venv, then mypy from elsewhere: setuptools' default
    editable mode for this layout is an import hook that mypy cannot follow ("Cannot find implementation or
    library stub for module named 'ledger'"); pyproject.toml makes it a static .pth."""
    project, venv, elsewhere = tmp_path / "project", tmp_path / "venv", tmp_path / "elsewhere"
    copy_project(project)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=MYPY_TIMEOUT_S)
    python = str(venv / "bin" / "python")
    clean = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "MYPYPATH")}
    # The build backend from this environment (no index needed); LEDGER_DEBUG=1 compiles the core at -O0 (fast).
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-build-isolation", "--no-deps",
         "--no-index", "-e", str(project)], env={**clean, "LEDGER_DEBUG": "1"}, capture_output=True, text=True,
        timeout=MYPY_TIMEOUT_S)
    assert installed.returncode == 0, installed.stderr
    located = subprocess.run([python, "-c", "import ledger; print(ledger.__file__)"], cwd=tmp_path, env=clean,
                             capture_output=True, text=True, timeout=MYPY_TIMEOUT_S)
    assert located.stdout.strip() == str(project / "ledger" / "__init__.py"), located.stderr
    elsewhere.mkdir()
    (elsewhere / "use.py").write_text("import ledger\n\nreport: ledger.VerifyReport = ledger.open(None).verify()\n"
                                      "ledger.open(None, durability='sometimes')\n")
    outcome = mypy("use.py", cwd=elsewhere, cache=tmp_path / "cache", python=python)
    assert "Cannot find implementation" not in outcome.stdout, outcome.stdout
    errors = [line for line in outcome.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith("use.py:4:") and "durability" in errors[0], outcome.stdout
