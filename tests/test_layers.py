"""The package keeps its layers and has no import cycle.

The layers, and the other contracts, are written once in pyproject.toml ([tool.importlinter]) and
checked by import-linter's `lint-imports`, exactly as a developer runs it. Its acyclic_siblings
contract sees cycles between sibling packages and modules; a cycle that runs through a package's own
`__init__` (a module importing the package above it, which imports the module back) is not between
siblings, so the module graph is searched for cycles here as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports} is missing: pip install -e '.[test]' installs import-linter"
    # This checkout's sources, whatever copy of the package the virtualenv points at.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    # --no-cache: no cache folder is left in the working tree.
    result = subprocess.run([str(lint_imports), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"lint-imports found broken contracts:\n{result.stdout}{result.stderr}"


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """One shortest cycle through every import that closes one, each import shown in one cycle only.

    A cycle is written as its imports, `importer -> imported (l.N)`, the last one closing it.
    """
    shown: set[tuple[str, str]] = set()
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if (importer, imported) in shown:
                continue
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is None:
                continue
            loop = [importer, *back]
            steps = list(zip(loop, loop[1:]))
            shown.update(steps)
            cycles.append([f"{a} -> {b} (l.{_lines(graph, a, b)})" for a, b in steps])
    return cycles


def _lines(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    return ",".join(str(d["line_number"]) for d in graph.get_import_details(importer=importer, imported=imported))


def test_no_import_cycle() -> None:
    # cache_dir=None: grimp would otherwise write .grimp_cache into the working directory.
    cycles = import_cycles(grimp.build_graph("retinalens", cache_dir=None))
    assert not cycles, "import cycles:\n" + "\n\n".join("\n".join(cycle) for cycle in cycles)
