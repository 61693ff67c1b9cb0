"""The layering, checked statically over the sources (tests/support/source_scan.py): no import cycle between
ledger modules, no private name imported from another module, functions of at most 70 lines, and a core that
never reaches the CLI, the ring, the read side or the cluster. Each failure lists every offender."""
from __future__ import annotations

import textwrap

import pytest

from support import source_scan

FUNCTION_LINES_MAX = 70
CORE_MODULES = ["ledger._core"]
# What the core must never reach, directly or through other modules: nothing flows back up (docs: DESIGN).
ABOVE_THE_CORE = ["ledger.cli", "ledger.__main__", "ledger.bench_command", "ledger.ring", "ledger._ring",
                  "ledger.tail", "ledger.project", "ledger.history", "ledger.cluster"]


def import_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for found in source_scan.all_imports():
        edges.setdefault(found.importer, set()).add(found.target)
    return edges


def test_the_import_graph_has_no_cycle():
    imports = source_scan.all_imports()
    components = source_scan.strongly_connected(import_edges())
    report = []
    for component in components:
        members = set(component)
        inside = sorted({f"{i.importer} -> {i.target} ({i.where()})" for i in imports
                         if i.importer in members and i.target in members})
        report.append(f"cycle among {', '.join(component)}:\n    " + "\n    ".join(inside))
    if components:
        pytest.fail("import cycles between ledger modules (every import inside each cycle):\n" + "\n".join(report))


def test_no_module_imports_a_private_name_of_another():
    offenders = [f"{i.where()}: {i.importer} uses {i.target}.{i.name}" for i in source_scan.private_imports()]
    if offenders:
        pytest.fail("private names imported from another ledger module:\n" + "\n".join(offenders))


def test_functions_are_at_most_70_lines():
    offenders = [f"{f.path}:{f.line} {f.qualified_name}: {f.lines} lines" for f in source_scan.all_functions()
                 if f.lines > FUNCTION_LINES_MAX and not f.exempt]
    if offenders:
        pytest.fail(f"functions longer than {FUNCTION_LINES_MAX} lines (split them, or say why on the def line or the "
                    f"line above with `# long: <why>`):\n" + "\n".join(offenders))


def test_the_core_never_imports_what_sits_above_it():
    edges = import_edges()
    assert edges.get("ledger._core"), "the scanner found no import of the core at all: it is broken"
    offenders = []
    for core in CORE_MODULES:
        for above in ABOVE_THE_CORE:
            for target in sorted({t for targets in edges.values() for t in targets} | set(edges)):
                if target == above or target.startswith(above + "."):
                    path = source_scan.shortest_path(edges, core, target)
                    if path:
                        offenders.append(" -> ".join(path))
    if offenders:
        pytest.fail("the core reaches modules above it:\n" + "\n".join(sorted(set(offenders))))


# ---- the scanner itself, on small inputs, so the checks above cannot pass vacuously ----------------------------

def test_the_scanner_sees_function_level_from_and_relative_imports():
    imports = source_scan.all_imports()
    assert any(i.importer == "ledger.api" and i.target == "ledger._core" for i in imports)
    assert any(i.importer == "ledger._core" and i.target == "ledger.enums" for i in imports)   # Cython
    modules = {"ledger", "ledger.a", "ledger.b", "ledger.c"}
    assert source_scan._resolve("ledger.a", False, "b", 1) == "ledger.b"
    assert source_scan._resolve("ledger", True, None, 1) == "ledger"
    assert list(source_scan._references("ledger", ["c", "_x"], modules)) == [("ledger.c", None), ("ledger", "_x")]


def test_the_scanner_finds_cycles_and_paths():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert source_scan.strongly_connected(edges) == [["a", "b", "c"]]
    assert source_scan.shortest_path(edges, "d", "c") == ["d", "a", "b", "c"]
    assert source_scan.shortest_path(edges, "a", "d") is None


def test_the_cython_scanner_measures_def_cdef_and_cpdef(tmp_path):
    body = "\n".join(f"    x += {n}" for n in range(3))
    source = tmp_path / "sample.pyx"
    source.write_text(textwrap.dedent("""\
        cdef extern from "x.h" nogil:
            int helper(int value)

        cdef int counter = helper(1)

        cdef inline int first(int a,
                              int b) except -1 nogil:
            # a comment
            return a

        # long: a state machine read top to bottom
        cpdef second():
        {body}

        cdef class Thing:
            cdef object field

            def method(self, value):
                if value:

                    return 1
                return 2
        def last(): pass
        """).replace("{body}", body))
    found = {f.qualified_name: f for f in source_scan.cython_functions(str(source))}
    assert sorted(found) == ["sample.Thing.method", "sample.first", "sample.second"]
    assert (found["sample.first"].lines, found["sample.first"].exempt) == (4, False)
    assert (found["sample.second"].lines, found["sample.second"].exempt) == (4, True)
    assert found["sample.Thing.method"].lines == 5
