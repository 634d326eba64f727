"""What makes a stage stale is complete by construction: its code deps are what its task module imports,
its params are what it reads, and DVC and the Prefect cache keys agree on both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tasks import deps
from tasks.common import STAGE_ORDER, Project
from tests.conftest import REPO, write_params

FRAMEWORKS = ("prefect", "mlflow", "dvc", "prefect_dask", "distributed")


def declared_params(stage: str) -> list[str]:
    return [str(p) for p in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage].get("params", [])]


def covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


# --- code deps ------------------------------------------------------------------------------------


def test_dvc_yaml_lists_exactly_the_code_each_stage_imports():
    wrong = deps.disagreements(REPO)
    assert not wrong, f"dvc.yaml disagrees with the imports: {wrong}; fix: python -m tasks.deps --write"


def test_the_stages_depend_on_the_code_that_computes_them_and_on_no_other():
    modules = deps.discover(REPO)
    code = {s: set(deps.stage_code_deps(s, modules)) for s in STAGE_ORDER}
    assert "cyclemerge/gates/learning.py" in code["gates"]  # the optimiser loop, not only the distribution
    for stage in ("align", "gates", "repair"):
        assert "cyclemerge/models/resnet.py" in code[stage]  # the permutation specs live with the models
    assert "cyclemerge/matching/c2m3.py" in code["align"] and "cyclemerge/matching/c2m3.py" not in code["train"]
    assert not {f for f in code["train"] if f.startswith(("cyclemerge/gates/", "cyclemerge/matching/"))}
    assert "cyclemerge/stages/evaluate.py" in code["evaluate"] and "cyclemerge/api.py" not in set().union(*code.values())


def test_every_task_module_has_a_stage_and_every_stage_a_task_module():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGE_ORDER)
    assert all((REPO / "tasks" / f"{s}.py").exists() for s in stages)


def test_rewrite_replaces_only_the_code_deps_and_keeps_the_rest_of_the_file():
    text = textwrap.dedent("""\
        # a comment that must survive
        stages:
          train:
            cmd: python -m flows.pipeline --stage train   # and this one
            deps:
              - cyclemerge/old.py
              - artifacts/in
            params:
              - train
    """)
    new = deps.rewrite(text, {"train": ["cyclemerge/a.py", "tasks/train.py", "artifacts/in"]})
    assert yaml.safe_load(new)["stages"]["train"]["deps"] == ["cyclemerge/a.py", "tasks/train.py", "artifacts/in"]
    assert "# a comment that must survive" in new and "# and this one" in new
    assert yaml.safe_load(new)["stages"]["train"]["params"] == ["train"]


def test_the_check_command_fails_on_a_stale_dvc_yaml_and_names_the_fix(tmp_path):
    for name in ("cyclemerge", "tasks"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    text = (REPO / "dvc.yaml").read_text().replace("      - cyclemerge/gates/learning.py\n", "", 1)
    (tmp_path / "dvc.yaml").write_text(text)
    check = [sys.executable, "-c", "import sys; from tasks import deps; deps.ROOT = deps.Path('.').resolve(); "
             "sys.exit(deps.main(sys.argv[1:]))"]
    out = subprocess.run([*check, "--check"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1 and "cyclemerge/gates/learning.py" in out.stderr
    assert "fix: python -m tasks.deps --write" in out.stderr
    assert subprocess.run([*check, "--write"], cwd=tmp_path, capture_output=True, text=True).returncode == 0
    assert deps.disagreements(tmp_path) == {}


# --- layers and cycles ----------------------------------------------------------------------------


def test_the_library_imports_without_cycles():
    assert deps.cycles(deps.discover(REPO)) == []


def test_a_cycle_held_together_by_a_lazy_import_is_found(tmp_path):
    (tmp_path / "cyclemerge").mkdir()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "cyclemerge" / "__init__.py").write_text("")
    (tmp_path / "cyclemerge" / "a.py").write_text("from cyclemerge.b import g\n")
    (tmp_path / "cyclemerge" / "b.py").write_text("def g():\n    from cyclemerge import a\n    return a\n")
    assert deps.cycles(deps.discover(tmp_path)) == [["cyclemerge.a", "cyclemerge.b"]]


def test_the_library_never_imports_the_orchestration_frameworks():
    import ast

    for path in sorted((REPO / "cyclemerge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad = [n for n in names if n.split(".")[0] in FRAMEWORKS]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}: the library stays free of Prefect, MLflow, DVC"


def test_importing_one_library_module_runs_no_other_stage():
    code = ("import sys, cyclemerge.train; print(sorted(m for m in sys.modules if m.startswith('cyclemerge.')"
            " and m.split('.')[1] in ('api', 'stages', 'matching', 'gates')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# --- params ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_every_param_a_stage_reads_is_declared_in_dvc_yaml(tiny_stages, tiny_stages_variant, stage):
    declared = declared_params(stage)
    reads = tiny_stages[1][stage][1] | tiny_stages_variant[1][stage][1]
    undeclared = sorted(r for r in reads if not covered(r, declared))
    assert not undeclared, f"stage {stage} reads {undeclared} but dvc.yaml declares only {declared}"
    unread = [d for d in declared if not any(covered(r, [d]) or r == d for r in reads)]
    assert not unread, f"stage {stage} declares {unread} but never reads them: an unrelated change would rerun it"


def test_the_recorder_sees_reads_through_copies_and_dumps_but_not_overridden_keys():
    from cyclemerge.config import Config
    from tests.conftest import recorded_params

    cfg = Config()
    with recorded_params() as reads:
        copy = cfg.align.model_copy(update={"method": "naive"})
        _ = copy.method, copy.max_iter, cfg.data.synthetic.noise
        cfg.gates.model_dump()
        cfg.section_hash()
    assert reads == {"align.max_iter", "data.synthetic.noise", "gates"}


# --- touching a module: DVC and the Prefect keys name the same stale stages ------------------------


def _fake_outputs(root: Path) -> None:
    """A placeholder for every output dvc.yaml declares, so its lock can be recorded without a run."""
    for spec in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in spec.get(kind, []):
                path = root / (entry if isinstance(entry, str) else next(iter(entry)))
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("placeholder")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("placeholder")


@pytest.fixture(scope="module")
def locked_copy(tmp_path_factory) -> Path:
    """A copy of the project's code and dvc.yaml with a DVC lock that matches it."""
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("touch") / "proj"
    root.mkdir()
    for name in ("cyclemerge", "tasks"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root)
    _fake_outputs(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        Repo.init(str(root), no_scm=True)
        with Repo(str(root)) as repo:
            repo.commit(None, force=True)
    finally:
        os.chdir(cwd)
    return root


def _dvc_stale(root: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:  # keys are "dvc.yaml:stage", the file relative to the cwd
        return {key.rsplit(":", 1)[-1] for key in repo.status()}


def _prefect_keys(root: Path) -> dict[str, str]:
    from tasks.train import seed_key

    project = Project.load(root)
    return {**{s: project.stage_key(s) for s in STAGE_ORDER}, "train seed": seed_key(project, 0, 1)}


def test_touching_a_module_makes_exactly_its_importers_stale_in_dvc_and_in_the_prefect_keys(locked_copy):
    root = locked_copy
    modules = deps.discover(root)
    code = {s: set(deps.stage_code_deps(s, modules, root)) for s in STAGE_ORDER}
    assert _dvc_stale(root) == set()
    before = _prefect_keys(root)
    files = sorted(p.relative_to(root).as_posix() for pkg in ("cyclemerge", "tasks") for p in (root / pkg).rglob("*.py")
                   if "__pycache__" not in p.parts)
    assert len(files) > 40
    for rel in files:
        path = root / rel
        saved = path.read_bytes()
        path.write_bytes(saved + b"\n# touched by the test\n")
        try:
            importers = {s for s, c in code.items() if rel in c}
            after = _prefect_keys(root)
            by_prefect = {s for s in STAGE_ORDER if after[s] != before[s]}
            assert _dvc_stale(root) == by_prefect == importers, rel
            seed_changed = after["train seed"] != before["train seed"]
            assert seed_changed == (rel in Project.load(root).library_deps("train")), rel
        finally:
            path.write_bytes(saved)
    assert _dvc_stale(root) == set() and _prefect_keys(root) == before
