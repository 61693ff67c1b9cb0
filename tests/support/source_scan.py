"""Static views of the ledger package's sources for tests/test_architecture.py: the imports between its modules
(Python by ast, Cython by a line scanner) and the length of every function.

Nothing here imports the package: it reads files, so a broken module still gets its layout checked."""
from __future__ import annotations

import ast
import dataclasses
import os
import re
from collections.abc import Iterator

PACKAGE = "ledger"
PACKAGE_DIRECTORY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                 PACKAGE)
PYTHON_SUFFIXES = (".py",)
CYTHON_SUFFIXES = (".pyx", ".pxd", ".pxi")
LONG_MARK = re.compile(r"#\s*long:\s*\S")   # `# long: <why>` exempts a function from the length limit


@dataclasses.dataclass(frozen=True)
class Import:
    """One import statement's reference to a ledger module: `name` is the imported attribute (None when the
    module itself is imported)."""
    importer: str       # dotted module name, "ledger.api"
    target: str         # dotted module name, "ledger.audit"
    name: str | None
    path: str           # file, relative to the checkout
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Function:
    """A def/cdef/cpdef and its length in lines, from its def line to its last line."""
    qualified_name: str  # "journal.FileJournal.__init__"
    path: str
    line: int
    lines: int
    exempt: bool         # a `# long: <why>` comment on the def line or the line above


def relative(path: str) -> str:
    return os.path.relpath(path, os.path.dirname(PACKAGE_DIRECTORY))


def source_files(suffixes: tuple[str, ...]) -> list[str]:
    """Every file of the package (subpackages too) ending with one of `suffixes`, sorted."""
    found = []
    for directory, subdirectories, files in os.walk(PACKAGE_DIRECTORY):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith(("__pycache__", ".")))
        found += [os.path.join(directory, name) for name in files if name.endswith(suffixes)]
    return sorted(found)


def module_name(path: str) -> str:
    """ledger/api.py -> ledger.api; ledger/__init__.py -> ledger; ledger/_core.pxi -> ledger._core."""
    parts = os.path.relpath(path, os.path.dirname(PACKAGE_DIRECTORY)).split(os.sep)
    stem = parts[-1].split(".")[0]
    parts = parts[:-1] if stem == "__init__" else parts[:-1] + [stem]
    return ".".join(parts)


def included_by() -> dict[str, str]:
    """Each .pxi file's module: the .pyx that `include`s it (else the .pxi's own name)."""
    owners = {}
    for path in source_files((".pyx",)):
        with open(path) as file:
            for match in re.finditer(r'^\s*include\s+["\']([^"\']+)["\']', file.read(), re.MULTILINE):
                owners[os.path.normpath(os.path.join(os.path.dirname(path), match.group(1)))] = module_name(path)
    return owners


def known_modules() -> set[str]:
    """Every module of the package, Python and Cython, and every package."""
    return {module_name(path) for path in source_files(PYTHON_SUFFIXES + (".pyx", ".pxd"))}


def _resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    """The absolute dotted name of `from <level dots><module> import ...` written in `importer`."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _owning_module(dotted: str, modules: set[str]) -> str | None:
    """The longest prefix of `dotted` that is a ledger module ("ledger.api" for "ledger.api.Ledger")."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _references(base: str, names: list[str], modules: set[str]) -> Iterator[tuple[str, str | None]]:
    """(target module, imported name or None) for `from base import names` (names None: `import base`)."""
    if base != PACKAGE and not base.startswith(PACKAGE + "."):
        return
    for name in names:
        if name == "*":
            yield base, None
        elif f"{base}.{name}" in modules:
            yield f"{base}.{name}", None       # a submodule: the module itself is imported
        else:
            yield base, name


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, function bodies and `if TYPE_CHECKING:` blocks included: a function-level import is an import,
    and a type-only import is a dependency of the layering too (it only hides a cycle from the interpreter)."""
    return ast.walk(tree)


def python_imports(path: str, modules: set[str]) -> list[Import]:
    importer = module_name(path)
    is_package = os.path.basename(path) == "__init__.py"
    with open(path) as file:
        tree = ast.parse(file.read(), path)
    found = []
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                owner = _owning_module(alias.name, modules)
                if owner is not None:
                    found.append(Import(importer, owner, None, relative(path), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, is_package, node.module, node.level)
            for target, name in _references(base, [a.name for a in node.names], modules):
                found.append(Import(importer, target, name, relative(path), node.lineno))
    return found


def private_attribute_uses(path: str, modules: set[str]) -> list[Import]:
    """`module._name` where `module` is bound by an import of a ledger module in this file (the same as
    importing the private name)."""
    importer = module_name(path)
    with open(path) as file:
        tree = ast.parse(file.read(), path)
    bound = {}
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _owning_module(alias.name, modules) is not None:
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, os.path.basename(path) == "__init__.py", node.module, node.level)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    found = []
    for node in _runtime_nodes(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = []
        inner: ast.expr = node
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if not isinstance(inner, ast.Name) or inner.id not in bound or len(chain) != 1 + _module_depth(
                bound[inner.id], chain[::-1][:-1], modules):
            continue
        dotted = ".".join([bound[inner.id]] + chain[::-1][:-1])
        if dotted in modules and dotted != importer and _is_private(node.attr) and f"{dotted}.{node.attr}" \
                not in modules:
            found.append(Import(importer, dotted, node.attr, relative(path), node.lineno))
    return found


def _module_depth(root: str, attributes: list[str], modules: set[str]) -> int:
    """How many of `attributes` after `root` still name modules (ledger.api: 1 for ["api"])."""
    depth = 0
    for attribute in attributes:
        root = f"{root}.{attribute}"
        if root not in modules:
            break
        depth += 1
    return depth


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, statement) for a Cython file, joining lines inside brackets and after `\\`."""
    pending, start, depth = "", 0, 0
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        if not pending:
            start = number
        pending += code + " "
        depth += code.count("(") + code.count("[") - code.count(")") - code.count("]")
        if depth <= 0 and not code.rstrip().endswith("\\"):
            yield start, pending.strip()
            pending, depth = "", 0


CYTHON_FROM = re.compile(r"^from\s+(\.*)([\w.]*)\s+c?import\s+(.+)$")
CYTHON_IMPORT = re.compile(r"^c?import\s+(.+)$")


def cython_imports(path: str, modules: set[str], owners: dict[str, str]) -> list[Import]:
    importer = owners.get(os.path.normpath(path), module_name(path))
    with open(path) as file:
        text = file.read()
    found = []
    for line, statement in _logical_lines(text):
        if match := CYTHON_FROM.match(statement):
            base = _resolve(importer, False, match.group(2) or None, len(match.group(1)))
            names = [part.split()[0] for part in match.group(3).strip("() ").split(",") if part.strip()]
            for target, name in _references(base, names, modules):
                found.append(Import(importer, target, name, relative(path), line))
        elif match := CYTHON_IMPORT.match(statement):
            for part in match.group(1).split(","):
                owner = _owning_module(part.split()[0], modules) if part.strip() else None
                if owner is not None:
                    found.append(Import(importer, owner, None, relative(path), line))
    return found


def all_imports() -> list[Import]:
    """Every runtime import of a ledger module by a ledger module (itself excluded)."""
    modules = known_modules()
    owners = included_by()
    found = [i for path in source_files(PYTHON_SUFFIXES) for i in python_imports(path, modules)]
    found += [i for path in source_files(CYTHON_SUFFIXES) for i in cython_imports(path, modules, owners)]
    return [i for i in found if i.target != i.importer]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports() -> list[Import]:
    """Imports (and module attribute uses) of a leading-underscore name that is not itself a module."""
    modules = known_modules()
    found = [i for i in all_imports() if i.name is not None and _is_private(i.name)]
    found += [i for path in source_files(PYTHON_SUFFIXES) for i in private_attribute_uses(path, modules)]
    return sorted(set(found), key=lambda i: (i.path, i.line, i.name or ""))


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module, each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(components)


def shortest_path(edges: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """Breadth first: the modules from `start` to `goal` (both included), or None."""
    previous: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(edges.get(node, ())):
                if successor in previous:
                    continue
                previous[successor] = node
                if successor == goal:
                    path = [goal]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])  # type: ignore[arg-type]
                    return path[::-1]
                following.append(successor)
        frontier = following
    return None


def python_functions(path: str) -> list[Function]:
    with open(path) as file:
        text = file.read()
    lines = text.splitlines()
    tree = ast.parse(text, path)
    stem = module_name(path).split(".")[-1]
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                assert child.end_lineno is not None
                found.append(Function(name, relative(path), child.lineno, child.end_lineno - child.lineno + 1,
                                      _exempt(lines, child.lineno)))
                visit(child, name)
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}.{child.name}")
            else:
                visit(child, prefix)

    visit(tree, stem)
    return found


def _exempt(lines: list[str], def_line: int) -> bool:
    nearby = lines[max(0, def_line - 2):def_line]
    return any(LONG_MARK.search(line) for line in nearby)


CYTHON_DEF = re.compile(r"^(\s*)(?:async\s+)?(?:c?p?def)\s+(.*)$")
CYTHON_NOT_FUNCTION = re.compile(r"^(?:class|struct|union|enum|extern|packed|readonly|public)\b")


def _indentation(line: str) -> int:
    return len(line) - len(line.lstrip())


def cython_functions(path: str) -> list[Function]:
    """def/cdef/cpdef functions of a Cython file, found by their header (a statement with a parameter list ending
    in `:`) and ended by the first code line indented no deeper than the header; classes give the prefix."""
    with open(path) as file:
        lines = file.read().splitlines()
    stem = os.path.basename(path).split(".")[0]
    headers = {line: statement for line, statement in _logical_lines("\n".join(lines))}
    classes: list[tuple[int, str]] = []    # (indentation, name) of the enclosing classes
    found = []
    for number, line in enumerate(lines, 1):
        code = line.split("#", 1)[0]
        if not code.strip():
            continue
        depth = _indentation(line)
        classes = [(indent, name) for indent, name in classes if indent < depth]
        if class_match := re.match(r"^\s*(?:cdef\s+|cpdef\s+)?class\s+(\w+)", code):
            classes.append((depth, class_match.group(1)))
            continue
        statement = headers.get(number, "")
        match = CYTHON_DEF.match(line) if statement else None
        if not match or CYTHON_NOT_FUNCTION.match(match.group(2)) or "(" not in statement or \
                not statement.rstrip().endswith(":"):
            continue
        name_match = re.search(r"(\w+)\s*$", statement.split("(")[0])
        assert name_match is not None, statement
        name = name_match.group(1)
        header_end = number
        while header_end < len(lines) and lines[header_end - 1].split("#", 1)[0].rstrip()[-1:] != ":":
            header_end += 1
        last = header_end
        for following in range(header_end + 1, len(lines) + 1):
            text = lines[following - 1]
            if not text.split("#", 1)[0].strip():
                continue
            if _indentation(text) <= depth:
                break
            last = following
        qualified = ".".join([stem] + [class_name for _, class_name in classes] + [name])
        found.append(Function(qualified, relative(path), number, last - number + 1, _exempt(lines, number)))
    return found


def all_functions() -> list[Function]:
    found = [f for path in source_files(PYTHON_SUFFIXES) for f in python_functions(path)]
    found += [f for path in source_files((".pyx", ".pxi")) for f in cython_functions(path)]
    return found
