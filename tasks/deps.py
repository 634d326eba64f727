"""Each stage's code dependencies, derived from what its task module imports (read, not run).

    python -m tasks.deps             # each stage's derived code deps, and whether dvc.yaml agrees
    python -m tasks.deps --write     # rewrite the code deps of every stage in dvc.yaml
    python -m tasks.deps --check     # exit 1 when dvc.yaml disagrees (what tests/test_stage_deps.py checks)

Stage ``s`` runs ``tasks/s.py``; its code deps are every module of ``cyclemerge/`` and ``tasks/`` that
module reaches through import statements, transitively: at module level and inside functions (they
run when called), ``from package import submodule`` and the package ``__init__`` of every module
(Python runs it first). Imports under ``if TYPE_CHECKING:`` never run and are left out; names a
package exports lazily (a literal ``_EXPORTS = {name: module}`` read by its ``__getattr__``) count
for a module that imports that name. ``dvc.yaml`` lists the files; ``tasks/common.py`` hashes the
same list for the Prefect cache keys, so DVC and Prefect call the same stages stale.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PACKAGES = ("cyclemerge", "tasks")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Module:
    name: str
    path: Path  # relative to the root
    is_package: bool
    imports: set[str] = field(default_factory=set)  # explicit targets, resolved to modules of the tree
    exports: dict[str, str] = field(default_factory=dict)  # a package's lazy exports: name -> module


def discover(root: Path = ROOT) -> dict[str, Module]:
    """Every module of the packages, by dotted name, with its explicit imports resolved."""
    modules: dict[str, Module] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            if "__pycache__" in rel.parts:
                continue
            parts = list(rel.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join(parts)] = Module(".".join(parts), rel, is_package)
    trees = {name: ast.parse((root / m.path).read_text(), filename=str(m.path)) for name, m in modules.items()}
    for name, tree in trees.items():
        if modules[name].is_package:
            modules[name].exports = _lazy_exports(tree)
    for name, tree in trees.items():
        modules[name].imports = _imports(tree, modules[name], modules)
    return modules


def _lazy_exports(tree: ast.Module) -> dict[str, str]:
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
                return dict(ast.literal_eval(node.value))
    return {}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.AST):
    """Every import statement that can run: all of them but those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse
        stack.extend(children)


def _owning_module(dotted: str, modules: dict[str, Module]) -> str | None:
    """The longest prefix of ``dotted`` that is a module of the tree (None outside the packages)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _imports(tree: ast.Module, module: Module, modules: dict[str, Module]) -> set[str]:
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    out: set[str] = set()
    for node in _statements(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _owning_module(alias.name, modules)
                if target:
                    out.add(target)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        source = _owning_module(base, modules) if base else None
        if source is None:
            continue
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in modules:
                out.add(sub)
            elif alias.name in modules[source].exports:
                out.add(modules[source].exports[alias.name])
            else:
                out.add(source)
    out.discard(module.name)
    return out


def parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(start: str, modules: dict[str, Module]) -> set[str]:
    """Every module that runs when ``start`` is imported and its functions are called."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(modules[name].imports)
        todo.extend(p for p in parents(name) if p in modules)
    return seen


def module_files(names: set[str], modules: dict[str, Module]) -> list[str]:
    return sorted(modules[n].path.as_posix() for n in names)


def stage_code_deps(stage: str, modules: dict[str, Module] | None = None, root: Path = ROOT) -> list[str]:
    """The files stage ``stage`` depends on: its task module ``tasks/<stage>.py`` and all it reaches."""
    modules = modules if modules is not None else discover(root)
    name = f"tasks.{stage}"
    if name not in modules:
        raise KeyError(f"stage {stage!r} has no task module tasks/{stage}.py")
    return module_files(closure(name, modules), modules)


def importers(path: str, stages: list[str], modules: dict[str, Module]) -> set[str]:
    """The stages whose code deps include the file ``path``."""
    return {s for s in stages if path in stage_code_deps(s, modules)}


def cycles(modules: dict[str, Module], package: str = "cyclemerge") -> list[list[str]]:
    """Import cycles among the package's modules (explicit imports; Tarjan's strongly connected components)."""
    names = [n for n in modules if n == package or n.startswith(package + ".")]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(modules[v].imports):
            if w not in names:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in names:
        if name not in index:
            visit(name)
    return found


def is_code(dep: str) -> bool:
    return dep.split("/", 1)[0] in PACKAGES


def derived_deps(root: Path = ROOT) -> dict[str, list[str]]:
    """Every stage of dvc.yaml with its deps as they should be: derived code deps, then its data deps."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    modules = discover(root)
    out = {}
    for stage, spec in stages.items():
        listed = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
        out[stage] = stage_code_deps(stage, modules, root) + [d for d in listed if not is_code(d)]
    return out


def disagreements(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """Per stage, the code deps dvc.yaml lacks and those it lists but the imports do not reach."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for stage, wanted in derived_deps(root).items():
        listed = [d if isinstance(d, str) else next(iter(d)) for d in stages[stage].get("deps", [])]
        missing = [d for d in wanted if d not in listed]
        extra = [d for d in listed if is_code(d) and d not in wanted]
        if missing or extra:
            out[stage] = {"missing": missing, "extra": extra}
    return out


def rewrite(text: str, deps: dict[str, list[str]]) -> str:
    """dvc.yaml's text with each stage's ``deps:`` list replaced, everything else (comments too) kept."""
    lines = text.splitlines()
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if indent == 2 and stripped.endswith(":") and not stripped.startswith("#"):
            stage = stripped[:-1]
        if stage in deps and indent == 4 and stripped == "deps:":
            out.append(line)
            out.extend(f"      - {d}" for d in deps[stage])
            i += 1
            while i < len(lines) and lines[i].startswith("      "):  # the old items (and their options)
                i += 1
            continue
        out.append(line)
        i += 1
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def write(root: Path = ROOT) -> bool:
    """Rewrite dvc.yaml's code deps; True when the file changed."""
    path = root / "dvc.yaml"
    text = path.read_text()
    new = rewrite(text, derived_deps(root))
    stages = yaml.safe_load(new)["stages"]
    for stage, wanted in derived_deps(root).items():
        got = [d if isinstance(d, str) else next(iter(d)) for d in stages[stage].get("deps", [])]
        if got != wanted:
            raise RuntimeError(f"dvc.yaml: rewriting the deps of stage {stage!r} went wrong; edit it by hand")
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.deps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    ap.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml disagrees with the imports")
    args = ap.parse_args(argv)
    if args.write:
        print("dvc.yaml: code deps rewritten" if write() else "dvc.yaml: code deps already agree with the imports")
        return 0
    wrong = disagreements()
    if not args.check:
        for stage, deps in derived_deps().items():
            print(f"{stage}:")
            for d in deps:
                print(f"  {d}")
    for stage, diff in wrong.items():
        print(f"dvc.yaml stage {stage}: missing {diff['missing']}, not imported {diff['extra']}", file=sys.stderr)
    if wrong:
        print("fix: python -m tasks.deps --write", file=sys.stderr)
    return 1 if wrong and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
