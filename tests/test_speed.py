"""The fast paths: a rerun with nothing stale is answered before torch loads; the project's training
loop computes exactly what a plain PyTorch loop computes (so the benchmark compares like with like);
the speed benchmark runs end to end on a tiny setting (its figures are not checked: no test asserts a
time)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cyclemerge.config import DataConfig, ModelConfig, SyntheticConfig, TrainConfig
from cyclemerge.data import load_data
from cyclemerge.train import lr_factor, model_for, train_model

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Runs flows.uptodate as `python -m` would, then says whether torch got imported and the exit code.
PROBE = """
import runpy, sys
try:
    runpy.run_module("flows.uptodate", run_name="__main__")
except SystemExit as e:
    print("torch imported:", "torch" in sys.modules, "exit:", e.code)
"""


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_uptodate_answers_without_torch_and_only_when_dvc_finds_nothing_stale(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    (root / "dvc.yaml").write_text("stages:\n  copy:\n    cmd: cp in.txt out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n")
    (root / "in.txt").write_text("a")
    (root / "reports").mkdir()
    (root / "reports" / "short_table.txt").write_text("the last run's table")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "CYCLEMERGE_PROJECT": str(root),
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(REPO)}

    def probe() -> str:
        done = _run([sys.executable, "-c", PROBE], REPO, env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert probe().strip().endswith("torch imported: False exit: 1")  # not a DVC project yet
    assert _run([str(BIN / "dvc"), "init", "-q", "--no-scm"], root, env).returncode == 0
    assert probe().strip().endswith("exit: 1")  # no dvc.lock: never ran
    assert _run([str(BIN / "dvc"), "repro", "-q"], root, env).returncode == 0
    out = probe()
    assert "torch imported: False exit: 0" in out and "Nothing to do" in out and "the last run's table" in out
    (root / "in.txt").write_text("b")
    assert probe().strip().endswith("torch imported: False exit: 1")  # a changed input is stale


def plain_reference(model_cfg: ModelConfig, cfg: TrainConfig, data, seed: int) -> dict:
    """The recipe as a plain loop: seeded init, one randperm per epoch from a seeded generator, Adam,
    the cosine schedule set before each step, the grad-norm clip."""
    torch.manual_seed(seed)
    model = model_for(model_cfg, data).train()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    x, y = data.train_set()
    gen = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(x) / cfg.batch_size)
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            opt.param_groups[0]["lr"] = cfg.lr * lr_factor(step, steps * cfg.epochs, 0, cfg.schedule)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
    return model.state_dict()


def test_the_project_loop_computes_what_the_plain_loop_computes(tmp_path):
    torch.set_num_threads(1)
    data = load_data(DataConfig(name="synthetic", calibration_size=50, validation_size=0,
                                synthetic=SyntheticConfig(num_train=330, num_test=50, num_classes=4, image_size=8)),
                     project_dir=tmp_path)
    model_cfg = ModelConfig(arch="mlp", hidden=[16, 16])
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.01, grad_clip=0.5)  # a clip that bites, an uneven last batch
    ours = train_model(model_cfg, cfg, data, seed=5).state_dict
    plain = plain_reference(model_cfg, cfg, data, seed=5)
    assert all(torch.equal(ours[k], plain[k]) for k in plain), "same seed, same recipe: the same weights bit for bit"
    unclipped = plain_reference(model_cfg, cfg.model_copy(update={"grad_clip": 1e9}), data, seed=5)
    assert not torch.equal(unclipped["layers.0.weight"], plain["layers.0.weight"]), "the clip must bite in this test"


@pytest.mark.slow
def test_speed_benchmark_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--smoke", "--json", str(out),
                           "--no-record"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["load_average"]["before"]) == 3
    names = [row["what"] for row in result["rows"]]
    for expected in ("training loop (MLP)", "seed training, 2 models side by side", "REPAIR (MLP", "C2M3",
                     "C2M3 (phases)", "C2M3 vs MergeMany"):
        assert any(name.startswith(expected) for name in names), (expected, names)
    for row in result["rows"]:
        assert row["seconds"] > 0 and row["floor_seconds"] > 0 and row["ratio"] > 0, row
