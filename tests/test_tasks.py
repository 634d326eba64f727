"""Each stage task's body through ``.fn()`` on a tiny project: its artifacts, their manifest, its metrics.

No Prefect run and no MLflow: ``tests/conftest.py`` runs every task body once per session (the
default project and a variant for the branches it leaves out) and these tests read what they left.
"""

from __future__ import annotations

import json
import math

import pytest

from cyclemerge.io import file_hash, load_torch
from tasks import artifacts
from tasks.common import Project

STAGE_MODULES = ("train", "activations", "align", "baselines", "gates", "repair", "evaluate", "grid")
SUPPORT = {"tasks", "tasks.common", "tasks.artifacts", "tasks.tracking"}


def _metrics(root, stage: str) -> dict:
    return json.loads((root / "metrics" / f"{stage}.json").read_text())


def _manifests(result) -> list[dict]:
    if isinstance(result, tuple):  # train: (per-model results, summary)
        result = result[0]
    return result if isinstance(result, list) else [result]


@pytest.mark.parametrize("stage", ["train", "align", "baselines", "gates", "repair", "evaluate"])
def test_every_output_a_task_returns_exists_with_the_hash_it_reports(tiny_stages, stage):
    root, out = tiny_stages
    manifests = _manifests(out[stage][0])
    assert manifests and all(m["outputs"] for m in manifests)
    for m in manifests:
        for rel, digest in m["outputs"].items():
            assert file_hash(root / rel) == digest, rel
    assert not list(root.rglob("*.tmp")), "no half-written artifact may remain"


def test_train_writes_one_checkpoint_per_seed_and_the_summary(tiny_stages):
    root, out = tiny_stages
    results, summary = out["train"][0]
    assert [r["seed"] for r in results] == [1, 2, 3]
    ckpts = artifacts.load_checkpoints(Project.load(root))
    assert [c["seed"] for c in ckpts] == [1, 2, 3] and all(c["format"] == "cyclemerge-checkpoint/1" for c in ckpts)
    train = _metrics(root, "train")
    assert [m["index"] for m in train["models"]] == [0, 1, 2]
    assert train["min_test_acc"] == min(m["test_acc"] for m in train["models"]) > 0.5  # 4 classes: chance 0.25
    assert summary["summary"] == train and (root / "plots" / "train_curves.png").stat().st_size > 1000


def test_activations_store_every_models_statistics(tiny_stages):
    root, out = tiny_stages
    stats = artifacts.load_stats(Project.load(root))
    assert len(stats) == 3 and all(set(s) == set(stats[0]) for s in stats)
    summary = _metrics(root, "activations")
    assert summary["models"] == 3 and summary["stat_points"] == len(stats[0]) and not summary["correlations"]
    assert out["activations"][0]["summary"] == summary


def test_align_saves_an_alignment_that_loads_back_and_is_cycle_consistent(tiny_stages):
    root, _ = tiny_stages
    alignment = artifacts.load_alignment(Project.load(root))
    metrics = _metrics(root, "align")
    assert alignment.method == metrics["method"] == "c2m3" and alignment.indices == metrics["models"] == [0, 1, 2]
    assert alignment.cycle_error == metrics["cycle_error"] == 0.0 and alignment.objective == metrics["objective"]
    assert len(alignment.perms) == len(alignment.universe) == 3


def test_baselines_hold_every_other_method_before_and_after_repair_and_the_cycle_maps(tiny_stages):
    root, _ = tiny_stages
    baselines = artifacts.load_baselines(Project.load(root))
    assert list(baselines.methods) == ["naive", "merge_many", "pairwise"] and baselines.indices == [0, 1, 2]
    assert all(b.repaired is not None for b in baselines.methods.values()) and baselines.cycle_maps is not None
    seconds = _metrics(root, "baselines")["methods"]
    assert {m: b.seconds for m, b in baselines.methods.items()} == {m: s["seconds"] for m, s in seconds.items()}


def test_gates_repair_and_evaluate_report_the_merge(tiny_stages):
    root, out = tiny_stages
    gates = _metrics(root, "gates")
    assert gates["learned"] and set(gates["models"]) == {"model 0", "model 1", "model 2"}
    merged = load_torch(root / "artifacts" / "merged" / "merged.pt")
    assert merged["source"] == "cyclemerge merge" and (root / "artifacts" / "merged" / "merged.safetensors").exists()
    ev = _metrics(root, "evaluate")
    assert ev["merged"]["method"] == "C2M3 + gates + repair" == out["evaluate"][0]["merged"]["method"]
    assert {"naive average + repair", "MergeMany + repair", "pairwise to reference + repair"} <= set(ev["methods"])
    assert set(ev["cycle"]) == {"pairwise to reference", "C2M3"} and ev["cycle"]["C2M3"]["consistent"]
    assert ev["merged"]["test_acc"] > 0.6 and "C2M3 + gates + repair" in (root / "reports" / "summary.md").read_text()


def test_the_variant_imports_checkpoints_matches_on_activations_and_runs_without_gates_or_repair(tiny_stages,
                                                                                                tiny_stages_variant):
    root, out = tiny_stages_variant
    imported = out["train"][0][0]
    assert [r["seed"] for r in imported] == [None] * 3 and all(r["source"].endswith(".pt") for r in imported)
    ref = _metrics(tiny_stages[0], "train")["models"]
    assert [r["metrics"]["test_acc"] for r in imported] == [m["test_acc"] for m in ref]
    assert (root / "artifacts" / "activations" / "correlations.pt").exists()
    starts = _metrics(root, "align")["starts"]
    assert len(starts) == 2 and all(math.isfinite(s["score"]) for s in starts)  # scored by calibration loss
    ev = _metrics(root, "evaluate")
    assert ev["merged"]["method"] == "C2M3 uniform" and not _metrics(root, "gates")["learned"]
    assert list(ev["baselines"]) == ["naive"] and "naive average + none" not in ev["methods"]
    # the validation slice is scored beside the test split, in the metrics and the report's table
    assert {"validation_acc", "validation_loss"} <= set(ev["merged"]) and "validation_acc" in ev["endpoints"]["mean"]
    assert all("validation_acc" in m for m in ev["methods"].values())
    assert "validation acc (%)" in (root / "reports" / "summary.md").read_text()


def test_no_task_module_imports_another():
    from tasks.deps import discover

    modules = discover()
    for name in STAGE_MODULES:
        inside = {m for m in modules[f"tasks.{name}"].imports if m.split(".")[0] == "tasks"}
        assert inside <= SUPPORT, f"tasks/{name}.py imports {sorted(inside - SUPPORT)}"
