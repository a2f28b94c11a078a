"""The package's layers hold (.importlinter: no import from a lower layer to a higher one, TYPE_CHECKING imports
included) and no module imports itself back through others."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_layers_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_contract_counts_type_checking_imports():
    """An import made for type checking only still ties the layers together: the contract must not skip it."""
    contract = configparser.ConfigParser()
    contract.read(ROOT / ".importlinter")
    for section in contract.sections():
        assert "exclude_type_checking_imports" not in contract[section], section


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    out.append(sorted(group))
    return out


def _ignored_imports() -> list[tuple[str, str]]:
    """The imports .importlinter declares as allowed exceptions (importer -> imported), each with its reason there."""
    contract = configparser.ConfigParser()
    contract.read(ROOT / ".importlinter")
    lines = [line.strip() for section in contract.sections()
             for line in contract[section].get("ignore_imports", "").splitlines() if line.strip()]
    return [(a.strip(), b.strip()) for a, b in (line.split("->") for line in lines)]


def test_no_module_imports_itself_back():
    graph = grimp.build_graph("sims_platform")
    for importer, imported in _ignored_imports():
        graph.remove_import(importer=importer, imported=imported)
    cycles = _cycles(graph)
    assert not cycles, "import cycles between modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.a")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert _cycles(graph) == [["pkg.a", "pkg.b"]]
