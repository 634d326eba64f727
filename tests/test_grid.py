"""The comparison grid: grid files, point expansion, the model cache key, tables; and the grid flow end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cyclemerge.config import Config
from cyclemerge.grid import (
    GridError,
    GridFile,
    expand,
    load_grid,
    merge_rows,
    model_cache_path,
    point_rows,
    read_csv,
    recipe_key,
    to_csv,
    to_markdown,
)
from tests.conftest import REPO, make_project

BASE = yaml.safe_load((REPO / "params.yaml").read_text())


def grid(**kw) -> GridFile:
    return GridFile.model_validate({"name": "g", "methods": ["merge_many", "c2m3"], "points": [{"name": "mlp"}], **kw})


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "grid.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "benchmarks" / "grids").glob("*.yaml")))
def test_shipped_grids_load_and_expand_against_params_yaml(name):
    g = load_grid(REPO / "benchmarks" / "grids" / f"{name}.yaml")
    points = expand(g, BASE)
    assert points and all(p.cfg.align.method == "c2m3" for p in points)
    if name == "width":
        assert [p.cfg.model.hidden[0] for p in points] == [32, 64, 128, 256, 512]
    if name == "paper":
        assert {p.id: p.requires for p in points}["mlp-fashion_mnist__N5"] is None
        assert all(p.requires == "cuda" for p in points if p.cfg.model.arch != "mlp")


def test_a_bad_grid_file_names_the_file_and_the_key(tmp_path):
    p = write(tmp_path, "name: g\nmethods: [c2m3, magic]\npoints: [{name: a}]\n")
    with pytest.raises(GridError, match=r"grid.yaml: invalid grid file(.|\n)*methods.1"):
        load_grid(p)
    p = write(tmp_path, "name: g\nmethods: [c2m3]\npoints: [{name: a, sett: {}}]\n")
    with pytest.raises(GridError, match=r"points.0.sett"):
        load_grid(p)
    with pytest.raises(GridError, match="not found"):
        load_grid(tmp_path / "missing.yaml")


def test_a_bad_override_fails_before_any_work_naming_the_point_and_key():
    g = grid(points=[{"name": "a", "set": {"gates.lamda": 0.1}}])
    with pytest.raises(GridError, match=r"point a__N5(.|\n)*gates.lamda: unknown key"):
        expand(g, BASE)
    with pytest.raises(GridError, match="train.seeds has 2 seeds, N = 3"):
        expand(grid(num_models=[3], set={"train.seeds": [7, 8]}), BASE)


def test_expand_is_points_times_axes_times_n_with_every_override_applied():
    g = grid(num_models=[2, 3], set={"train.epochs": 2, "gates.enabled": False},
             points=[{"name": "a"}, {"name": "b", "requires": "cuda", "set": {"train.lr": 0.01}}],
             axes={"model.hidden": [[8], [16, 8]]})
    points = expand(g, BASE)
    assert len(points) == 2 * 2 * 2 and len({p.id for p in points}) == 8
    p = next(p for p in points if p.id == "b__hidden=16-8__N3")
    assert (p.cfg.train.lr, p.cfg.train.epochs, p.cfg.model.hidden, p.cfg.train.num_models) == (0.01, 2, [16, 8], 3)
    assert p.requires == "cuda" and p.axes == {"model.hidden": [16, 8]}
    assert p.cfg.train.model_seeds() == [1, 2, 3]
    # Every method comes from one pipeline run: its settings win over the grid's.
    g2 = grid(methods=["naive", "c2m3_gates"], set={"gates.enabled": False, "align.method": "merge_many"})
    q = expand(g2, BASE)[0]
    assert q.cfg.gates.enabled and q.cfg.align.method == "c2m3" and q.cfg.evaluate.baselines == ["naive", "ensemble"]
    s = expand(grid(num_models=[2], set={"train.seeds": [7, 8, 9]}), BASE)[0]
    assert s.cfg.train.model_seeds() == [7, 8]


def test_the_model_cache_key_is_the_training_recipe_not_n_paths_or_device():
    a = Config()
    same = Config.model_validate({"train": {"num_models": 3, "device": "cpu", "checkpoints": ["x.pt", "y.pt"]},
                                  "data": {"root": "/elsewhere", "download": False}, "gates": {"lam": 9.0}})
    assert recipe_key(a) == recipe_key(same)
    for changed in ({"train": {"lr": 0.002}}, {"model": {"hidden": [64]}}, {"data": {"calibration_size": 10, "validation_size": 0}},
                    {"data": {"name": "mnist"}}):
        assert recipe_key(Config.model_validate(changed)) != recipe_key(a), changed
    p1, p2 = model_cache_path(Path("c"), a, 1), model_cache_path(Path("c"), same, 2)
    assert p1.parent == p2.parent and (p1.name, p2.name) == ("seed1.pt", "seed2.pt")


def fake_evaluation() -> dict:
    rows = {"endpoint mean": 0.9, "ensemble (outputs)": 0.92, "C2M3 uniform": 0.85, "C2M3 uniform + repair": 0.88,
            "MergeMany": 0.8, "MergeMany + repair": 0.86}
    return {"endpoints": {"mean": {"test_acc": 0.9}},
            "methods": {k: {"test_acc": v, "test_loss": 1 - v, "train_acc": v, "train_loss": 1 - v} for k, v in rows.items()},
            "baselines": {"merge_many": {"objective": 10.0, "align_seconds": 2.0}}}


def test_point_rows_read_each_method_and_its_repaired_row():
    g = grid(num_models=[2])
    point = expand(g, BASE)[0]
    rows = point_rows(g, point, fake_evaluation(), {"objective": 12.0, "seconds": 3.0})
    by = {r["method"]: r for r in rows}
    assert list(by) == ["endpoint mean", "ensemble", "merge_many", "merge_many+repair", "c2m3", "c2m3+repair"]
    assert by["c2m3+repair"]["test_acc"] == 0.88 and by["c2m3"]["objective"] == 12.0
    assert by["merge_many"]["objective"] == 10.0 and by["merge_many"]["align_seconds"] == 2.0
    assert by["merge_many+repair"]["relative_to_endpoints"] == pytest.approx(0.86 / 0.9)
    assert all(r["N"] == 2 and r["arch"] == "MLP 512-512-512-256" for r in rows)
    bad = fake_evaluation()
    del bad["methods"]["MergeMany + repair"]
    with pytest.raises(KeyError, match="MergeMany \\+ repair"):
        point_rows(g, point, bad, {"objective": 1.0, "seconds": 1.0})


def test_tables_keep_other_points_replace_reruns_and_show_published_numbers(tmp_path):
    g = grid(reference=[{"dataset": "CIFAR10", "arch": "VGG16", "method": "c2m3+repair", "test_acc": 0.62}])
    point = expand(g, BASE)[0]
    rows = point_rows(g, point, fake_evaluation(), {"objective": 12.0, "seconds": 3.0})
    other = [dict(r, point="other") for r in rows]
    f = tmp_path / "t.csv"
    f.write_text(to_csv(merge_rows([], other + rows)))
    rerun = [dict(r, test_acc=0.5) for r in rows]
    merged = merge_rows(read_csv(f), rerun)
    assert len(merged) == 2 * len(rows)
    assert {r["test_acc"] for r in merged if r["point"] == point.id} == {0.5}
    assert [r["test_acc"] for r in merged if r["point"] == "other"] == [r["test_acc"] for r in rows]
    assert read_csv(f)[0]["N"] == 5 and isinstance(read_csv(f)[2]["objective"], float)
    md = to_markdown(g, merged, {"x__N5": "needs a CUDA GPU"})
    assert "| other | fashion_mnist | MLP 512-512-512-256 | 5 | 90.00 | 92.00 | 80.00 | 86.00 | 85.00 | 88.00 |" in md
    assert "- x__N5: needs a CUDA GPU" in md and "| CIFAR10 | VGG16 | c2m3+repair | 62 |" in md


def test_rows_and_tables_carry_validation_when_the_points_have_a_validation_split():
    g = grid(num_models=[2])
    point = expand(g, BASE)[0]
    ev = fake_evaluation()
    for name, scores in ev["methods"].items():
        scores["validation_acc"], scores["validation_loss"] = scores["test_acc"] - 0.01, 0.5
    rows = point_rows(g, point, ev, {"objective": 12.0, "seconds": 3.0})
    by = {r["method"]: r for r in rows}
    assert by["c2m3+repair"]["validation_acc"] == pytest.approx(0.87)
    assert by["c2m3"]["endpoints_validation_acc"] == pytest.approx(0.89)
    md = to_markdown(g, rows)
    assert "Validation accuracy (%)" in md and f"| {point.id} | 89.00 | 91.00 | 79.00 | 85.00 | 84.00 | 87.00 |" in md
    plain = to_markdown(g, point_rows(g, point, fake_evaluation(), {"objective": 12.0, "seconds": 3.0}))
    assert "Validation accuracy" not in plain


@pytest.mark.slow
def test_grid_flow_shares_seed_models_across_n_tracks_each_point_and_reruns_from_cache(tmp_path, prefect_harness):
    import torch

    from flows.grid import grid_flow

    torch.set_num_threads(1)
    root = make_project(tmp_path / "proj", {"tracking": {"register_model": False}})
    grid_file = write(tmp_path, yaml.safe_dump({
        "name": "tiny", "methods": ["naive", "merge_many", "c2m3", "c2m3_gates"], "num_models": [2, 3],
        "set": {"evaluate.cycle": False},
        "points": [{"name": "mlp"}, {"name": "big", "requires": "cuda", "set": {"model.hidden": [64, 64]}}]}))
    rows = grid_flow(str(grid_file), params="params.yaml", project_dir=str(root))
    models = sorted((root / ".cache" / "grid" / "models").rglob("seed*.pt"))
    assert [m.name for m in models] == ["seed1.pt", "seed2.pt", "seed3.pt"]  # N=2 and N=3 share seeds 1, 2
    stamps = {m: m.stat().st_mtime_ns for m in models}

    table = read_csv(root / "benchmarks" / "results" / "grid_tiny.csv")
    assert len(table) == len(rows) == 2 * (2 + 4 * 2)
    by = {(r["point"], r["method"]): r for r in table}
    for n in (2, 3):
        point = f"mlp__N{n}"
        assert by[point, "naive"]["test_acc"] < by[point, "c2m3"]["test_acc"] <= 1.0
        assert by[point, "c2m3"]["objective"] > 0
        ev = json.loads((root / ".cache" / "grid" / "tiny" / point / "metrics" / "evaluate.json").read_text())
        assert len([k for k in ev["endpoints"] if k != "mean"]) == n
    md = (root / "benchmarks" / "results" / "grid_tiny.md").read_text()
    if not torch.cuda.is_available():
        assert "big__N2: needs a CUDA GPU" in md

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cyclemerge-grid")
    runs = client.search_runs([exp.experiment_id], "tags.grid = 'tiny'")
    assert sorted(r.data.tags["grid.point"] for r in runs) == ["mlp__N2", "mlp__N3"]
    assert all("grid.c2m3.repair.test_acc" in r.data.metrics for r in runs)

    again = grid_flow(str(grid_file), params="params.yaml", project_dir=str(root), only=["mlp__N3"])
    assert {m: m.stat().st_mtime_ns for m in models} == stamps  # nothing retrained
    assert [r["test_acc"] for r in again] == [by["mlp__N3", r["method"]]["test_acc"] for r in again]
    assert len(read_csv(root / "benchmarks" / "results" / "grid_tiny.csv")) == len(table)
    with pytest.raises(GridError, match="no point matches"):
        grid_flow(str(grid_file), params="params.yaml", project_dir=str(root), only=["nothing*"])


@pytest.mark.parametrize("orchestration, runner, workers", [
    ({"task_runner": "threads", "max_workers": 2}, "ThreadPoolTaskRunner", 2),
    ({"task_runner": "sequential"}, "ThreadPoolTaskRunner", 1),
    ({"task_runner": "dask", "dask_workers": 2}, "DaskTaskRunner", None),
])
def test_run_grid_runs_points_on_the_configured_task_runner(tmp_path, monkeypatch, orchestration, runner, workers):
    import flows.grid as fg

    root = make_project(tmp_path / "proj", {"orchestration": orchestration})
    grid_file = write(tmp_path, yaml.safe_dump({"name": "tiny", "methods": ["c2m3"], "num_models": [2],
                                                "points": [{"name": "mlp"}]}))
    seen = {}

    class Flow:
        def with_options(self, task_runner):
            seen["runner"] = task_runner
            return lambda *a, **k: ["ran"]

    monkeypatch.setattr(fg, "grid_flow", Flow())
    assert fg.run_grid(str(grid_file), project_dir=str(root)) == ["ran"]
    assert type(seen["runner"]).__name__ == runner
    if workers:
        assert seen["runner"]._max_workers == workers


def test_a_point_can_ask_for_baselines_on_top_of_those_the_methods_need():
    g = GridFile.model_validate({"name": "g", "methods": ["c2m3", "pairwise"], "num_models": [2],
                                 "points": [{"name": "plain"},
                                            {"name": "more", "set": {"evaluate.baselines": ["merge_many"]}}]})
    by = {p.name: p.cfg.evaluate.baselines for p in expand(g, BASE)}
    assert by == {"plain": ["pairwise", "ensemble"], "more": ["pairwise", "ensemble", "merge_many"]}
