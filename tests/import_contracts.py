"""An import-linter contract type of our own (registered in pyproject.toml's [tool.importlinter]):
our modules import each other at the top of a module, never inside a function.

An import inside a function hides a dependency from the reader and from the layer contract's
intent, and is mostly there to dodge an import cycle, which is a layering bug: fix the direction
of the dependency instead. What may defer is named: whole packages (`allowed_in`: the CLI, whose
commands import what they run so that `--help` is fast) and single imports (`allowed`, as
"importer -> imported", each with its reason next to it in the configuration). Imports under
`if TYPE_CHECKING:` never run, so they never count. Third-party imports are not checked.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output


@dataclass(frozen=True)
class Deferred:
    importer: str
    imported: str
    line: int


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _source(module: str) -> Path | None:
    """The file of `module`, found without importing it (or anything)."""
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations)))
    parts = rest.split(".") if rest else []
    package = base.joinpath(*parts) / "__init__.py"
    if package.is_file():
        return package
    plain = base.joinpath(*parts[:-1], parts[-1] + ".py") if parts else None
    return plain if plain is not None and plain.is_file() else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Finder(ast.NodeVisitor):
    """Imports inside functions (at any depth), outside `if TYPE_CHECKING:` blocks."""

    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.module, self.is_package, self.known = module, is_package, known
        self.depth = 0
        self.found: list[tuple[str, int]] = []

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        if self.depth:
            self.found += [(alias.name, node.lineno) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if not self.depth:
            return
        base = node.module or ""
        if node.level:  # relative: from the importer's package
            package = self.module if self.is_package else self.module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            self.found.append((candidate if candidate in self.known else base, node.lineno))


class DeferredImportsContract(Contract):
    """Options: `containers` (the packages checked), `allowed_in` (packages whose modules may
    defer imports), `allowed` ("importer -> imported": one deferred import allowed; the imported
    side also covers the modules inside it)."""

    type_name = "deferred imports"

    containers = fields.ListField(subfield=fields.StringField())
    allowed_in = fields.ListField(subfield=fields.StringField(), required=False)
    allowed = fields.ListField(subfield=fields.StringField(), required=False)

    def _allowed_pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for entry in self.allowed or []:
            importer, sep, imported = (part.strip() for part in entry.partition("->"))
            if not sep or not importer or not imported:
                raise ValueError(f"`allowed` entries read 'importer -> imported', not {entry!r}")
            pairs.append((importer, imported))
        return pairs

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        pairs = self._allowed_pairs()
        used: set[tuple[str, str]] = set()
        known = set(graph.modules)
        violations: list[Deferred] = []
        for container in self.containers:
            for module in sorted(m for m in known if _within(m, container)):
                if any(_within(module, p) for p in self.allowed_in or []):
                    continue
                path = _source(module)
                if path is None:
                    continue
                finder = _Finder(module, path.name == "__init__.py", known)
                finder.visit(ast.parse(path.read_text(), filename=str(path)))
                for imported, line in finder.found:
                    if not any(_within(imported, c) for c in self.containers):
                        continue  # third-party (torch, transformers, ray...) may load lazily
                    match = next((p for p in pairs if p[0] == module and _within(imported, p[1])), None)
                    if match is not None:
                        used.add(match)
                    else:
                        violations.append(Deferred(module, imported, line))
        warnings = [
            f"allowed deferred import {a} -> {b} is not in the code any more: remove it from the contract"
            for a, b in pairs
            if (a, b) not in used
        ]
        return ContractCheck(kept=not violations, metadata={"violations": violations}, warnings=warnings)

    def render_broken_contract(self, check: ContractCheck) -> None:
        violations: list[Deferred] = check.metadata["violations"]
        output.print_error(
            f"{len(violations)} import(s) of our own modules inside functions: move each to the top of "
            "its module, fixing the dependency's direction where that makes a cycle:",
            bold=True,
        )
        output.new_line()
        for v in violations:
            output.print_error(f"-   {v.importer} -> {v.imported} (l.{v.line})", bold=False)
        output.new_line()
