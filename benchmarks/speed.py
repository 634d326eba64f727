"""Speed: the parts of the default run, each beside its floor, measured in the same run on this machine.

    python benchmarks/speed.py           # full (~10 min): benchmarks/RESULTS.md "Speed", results/speed.{md,json}
    python benchmarks/speed.py --quick   # smaller settings (~3 min), printed only unless --record
    python benchmarks/speed.py --smoke --no-record --json out.json   # seconds: does it run (the tests)

Ratios are the figures (time / floor time; 1.00 = at the floor); seconds move with the machine and
its load, so the load average before and after is recorded:

- training loop, MLP and ResNet20-x1: ``train_model`` vs a plain PyTorch loop, same model, batch and
  data (benchmarks/train_throughput.py);
- REPAIR: ``repair()`` vs one forward pass of the merged model over the same calibration data at the
  same batch size (default MLP merge of the seed models; ResNet20-x2 on 1,000 images), with the
  statistics error it leaves (max over points of |mean - goal|/std and |std/goal - 1|);
- C2M3 vs its floor, the same linear assignments solved alone in the same thread pool (a second,
  instrumented run re-solves each Frank-Wolfe step's LAPs with SciPy), and vs MergeMany;
- per stage of a tiny synthetic project (full and quick only): time from process start to the first
  line of stage work and after its last line, on the one Prefect API a `dvc repro` shares (and one
  stage on a server of its own, as every stage had before); the no-op `make run` check.

Models: ``artifacts/models/model_*.pt`` when a default run left them, else seed models trained here
(one short epoch each), which is said in the output.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from scipy.optimize import linear_sum_assignment

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cyclemerge import matching  # noqa: E402
from cyclemerge.activations import channel_stats, permute_stats  # noqa: E402
from cyclemerge.averaging import average, to_universe_all  # noqa: E402
from cyclemerge.config import AlignConfig, DataConfig, ModelConfig, SyntheticConfig, TrainConfig  # noqa: E402
from cyclemerge.data import load_data  # noqa: E402
from cyclemerge.io import load_torch  # noqa: E402
from cyclemerge.repair import goal_statistics, repair  # noqa: E402
from cyclemerge.train import model_for, train_model  # noqa: E402
from train_throughput import loop_throughput, machine_lines  # noqa: E402

RESULTS, OUT = REPO / "benchmarks" / "RESULTS.md", REPO / "benchmarks" / "results"
MODES = {  # loop samples (MLP, ResNet), repeats, seed models, calibration, ResNet20-x2 images
    "full": {"mlp_samples": 20480, "resnet_samples": 2048, "repeats": 3, "models": 5, "calib": 5000, "resnet_images": 1000},
    "quick": {"mlp_samples": 5120, "resnet_samples": 512, "repeats": 2, "models": 3, "calib": 2000, "resnet_images": 200},
    "smoke": {"mlp_samples": 512, "resnet_samples": 0, "repeats": 1, "models": 3, "calib": 200, "resnet_images": 0},
}
TINY = {"data": {"name": "synthetic", "calibration_size": 120, "validation_size": 0,
                 "synthetic": {"num_train": 600, "num_test": 200, "num_classes": 4, "channels": 1, "image_size": 8}},
        "model": {"hidden": [24, 24]}, "train": {"num_models": 3, "epochs": 3, "batch_size": 64, "lr": 0.01},
        "activations": {"num_samples": 120, "batch_size": 60}, "align": {"max_iter": 30},
        "gates": {"steps": 5, "batch_size": 60}, "repair": {"num_samples": 120, "batch_size": 60},
        "evaluate": {"baselines": ["naive"], "cycle": False, "train_subset": 200, "interpolation_steps": 3,
                     "batch_size": 200}}


def row(what: str, seconds: float, floor: str, floor_seconds: float, detail: str = "") -> dict:
    return {"what": what, "seconds": seconds, "floor": floor, "floor_seconds": floor_seconds,
            "ratio": seconds / floor_seconds, "detail": detail}


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def training_rows(data, mode: dict, smoke: bool) -> list[dict]:
    cases = [("MLP", ModelConfig(arch="mlp", hidden=[64, 64]) if smoke else ModelConfig(), mode["mlp_samples"])]
    if mode["resnet_samples"]:
        cases.append(("ResNet20-x1", ModelConfig(arch="resnet20"), mode["resnet_samples"]))
    rows = []
    for label, model_cfg, samples in cases:
        r = loop_throughput(model_cfg, TrainConfig(), data, samples=samples, repeats=mode["repeats"])
        rows.append(row(f"training loop ({label})", r["samples"] / r["project"], "plain PyTorch loop",
                        r["samples"] / r["plain"], f"{r['project']:,.0f} vs {r['plain']:,.0f} samples/s, "
                        f"batch {TrainConfig().batch_size}, {r['samples']} samples, best of {mode['repeats']}"))
    return rows


def side_by_side_row(data, model_cfg: ModelConfig, samples: int) -> dict:
    """Two seed models trained side by side with one thread each (what the train stage's thread runner
    does) against one after the other with every thread, same models and data."""
    from dataclasses import replace

    small = replace(data, train_idx=data.train_idx[:samples])
    cfg = TrainConfig(epochs=1, device="cpu")
    threads = torch.get_num_threads()
    start = time.perf_counter()
    for seed in (1, 2):
        train_model(model_cfg, cfg, small, seed=seed)
    sequential = time.perf_counter() - start
    torch.set_num_threads(max(1, threads // 2))
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda seed: train_model(model_cfg, cfg, small, seed=seed), (1, 2)))
        side_by_side = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return row("seed training, 2 models side by side", side_by_side, f"one after another, {threads} threads each",
               sequential, f"{samples} samples each, 1 epoch, {max(1, threads // 2)} thread(s) each side by side; "
               "ratio < 1: side by side is faster")


def seed_models(data, model_cfg: ModelConfig, n: int, smoke: bool) -> tuple[list[dict], str]:
    folder = REPO / "artifacts" / "models"
    files = sorted(folder.glob("model_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[:n]
    if not smoke and len(files) == n:
        ckpts = [load_torch(f) for f in files]
        if all(c.get("model", {}).get("arch") == model_cfg.arch for c in ckpts):
            return [c["state_dict"] for c in ckpts], f"{n} trained models from {folder}"
    cfg = TrainConfig(epochs=1, device="cpu")
    sds = [train_model(model_cfg, cfg, data, seed=s).state_dict for s in range(1, n + 1)]
    return sds, f"{n} models trained here for 1 epoch on {len(data.train_idx)} samples"


class LapFloor:
    """Re-solves, right after each C2M3 Frank-Wolfe step (and each rounding), the same LAPs with SciPy in
    the same thread pool, timing only that: the linear assignments alone, which nothing can skip."""

    def __init__(self) -> None:
        from cyclemerge.matching import c2m3

        self.c2m3, self.seconds, self.count = c2m3, 0.0, 0
        self.batch: list | None = None
        self._lap, self._lmo = c2m3.lap_maximize, c2m3._lmo

    def _resolve(self, scores: list) -> None:
        workers = max(1, min(torch.get_num_threads(), len(scores)))
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda s: linear_sum_assignment(s, maximize=True), scores))
        self.seconds += time.perf_counter() - start
        self.count += len(scores)

    def lap(self, score):
        s = score.detach().to("cpu", torch.float64).numpy().copy()
        out = self._lap(score)
        if self.batch is None:
            self._resolve([s])
        else:
            self.batch.append(s)
        return out

    def lmo(self, grads, anchor):
        self.batch = []
        try:
            return self._lmo(grads, anchor)
        finally:
            scores, self.batch = self.batch, None
            self._resolve(scores)

    def __enter__(self) -> "LapFloor":
        self.c2m3.lap_maximize, self.c2m3._lmo = self.lap, self.lmo
        return self

    def __exit__(self, *exc) -> None:
        self.c2m3.lap_maximize, self.c2m3._lmo = self._lap, self._lmo


class PhaseClock:
    """Seconds C2M3 spends in each phase of its Frank-Wolfe iteration (gradient products, LAPs,
    exact line search, step), by timing the weight objective's methods and the LMO in place."""

    PHASES = {"gradient": "gradient", "line search": "line", "step": "step", "reset": "reset"}

    def __init__(self) -> None:
        from cyclemerge.matching import c2m3, objectives

        self.c2m3, self.cls = c2m3, objectives.WeightObjective
        self.seconds = dict.fromkeys([*self.PHASES, "LAPs (LMO)"], 0.0)
        self._saved = {name: getattr(self.cls, name) for name in self.PHASES.values()}
        self._lmo = c2m3._lmo

    def _timed(self, phase: str, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
        return run

    def __enter__(self) -> "PhaseClock":
        for phase, name in self.PHASES.items():
            setattr(self.cls, name, self._timed(phase, self._saved[name]))
        self.c2m3._lmo = self._timed("LAPs (LMO)", self._lmo)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(self.cls, name, fn)
        self.c2m3._lmo = self._lmo


def alignment_rows(sds: list[dict], spec, source: str) -> tuple[list[dict], list]:
    runs = {}
    for method in ("c2m3", "merge_many"):
        start = time.perf_counter()
        result = matching.match(state_dicts=sds, spec=spec, config=AlignConfig(method=method))
        runs[method] = (time.perf_counter() - start, result)
    seconds, result = runs["c2m3"]
    with LapFloor() as floor:
        matching.match(state_dicts=sds, spec=spec, config=AlignConfig(method="c2m3"))
    with PhaseClock() as phases:
        matching.match(state_dicts=sds, spec=spec, config=AlignConfig(method="c2m3"))
    mm_seconds, mm = runs["merge_many"]

    def summary(r):
        return f"{r.report.iterations} iterations, objective {r.report.objective_history[-1]:.2f}"

    split = ", ".join(f"{k} {v:.2f} s" for k, v in phases.seconds.items())
    # Any Frank-Wolfe step needs the gradient as well as the LAPs: their sum is the floor of the method.
    fw_floor = floor.seconds + phases.seconds["gradient"]
    return [row("C2M3", seconds, "its LAPs alone (same pool)", floor.seconds,
                f"{floor.count} LAPs; {summary(result)}; {source}"),
            row("C2M3 (phases)", seconds, "its LAPs alone + its gradient products", fw_floor,
                f"one more run, timed by phase: {split}"),
            row("C2M3 vs MergeMany", seconds, "MergeMany, same models", mm_seconds,
                f"C2M3 {summary(result)}; MergeMany {summary(mm)}")], result.perms


def stat_error(model, state_dict, goal, x, batch_size: int) -> float:
    model.load_state_dict(state_dict)
    after = channel_stats(model.eval(), x, batch_size=batch_size)
    points = model.stat_points()
    summands = {q for p, g in points.items() if p.endswith(".residual")
                for q, h in points.items() if h == g and q != p and q.startswith(p.rsplit(".", 1)[0] + ".")}
    worst = 0.0
    for p, g in goal.items():
        live = g.var > 1e-10
        worst = max(worst, ((after[p].mean - g.mean)[live].abs() / g.std[live]).max().item())
        if p not in summands:
            worst = max(worst, (after[p].std[live] / g.std[live] - 1).abs().max().item())
    return worst


def repair_row(label: str, model, sds: list[dict], goal, x, batch_size: int, repeats: int) -> dict:
    merged = average(sds)
    model.load_state_dict(merged)
    model.eval()

    def forward():
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size])

    forward_s = best_of(repeats, forward)
    out = {}
    repair_s = best_of(repeats, lambda: out.update(sd=repair(model, merged, goal, x, batch_size=batch_size)))
    error = stat_error(model, out["sd"], goal, x, batch_size)
    return row(f"REPAIR ({label})", repair_s, "one forward pass, same data and batch", forward_s,
               f"{len(x)} images, batch {batch_size}, {len(goal)} stat points; statistics error {error:.1e}")


def repair_rows(data, mlp, sds, perms, spec, mode: dict) -> list[dict]:
    x = data.calibration_set()[0][:mode["calib"]]
    batch = min(500, len(x))
    points = mlp.stat_points()
    stats = []
    for sd in sds:
        mlp.load_state_dict(sd)
        stats.append(channel_stats(mlp.eval(), x, batch_size=batch))
    goal = goal_statistics([permute_stats(s, p, points) for s, p in zip(stats, perms)])
    rows = [repair_row("MLP, C2M3 merge", mlp, to_universe_all(sds, spec, perms), goal, x, batch, mode["repeats"])]
    if mode["resnet_images"]:
        xr = x[:mode["resnet_images"]]
        resnets = []
        for seed in range(3):
            torch.manual_seed(seed)
            resnets.append(model_for(ModelConfig(arch="resnet20", width=2), data).eval())
        goal = goal_statistics([channel_stats(m, xr, batch_size=batch) for m in resnets])
        rows.append(repair_row("ResNet20-x2, random init, plain average", resnets[0],
                               [m.state_dict() for m in resnets], goal, xr, min(batch, len(xr)), mode["repeats"]))
    return rows


PROBE = r"""
import functools, importlib, json, sys, time
stage, out = sys.argv[1], sys.argv[2]
import flows.pipeline as fp
from prefect import Task
marks, entries, exits = {"imported": time.time()}, [], []
module = importlib.import_module(f"tasks.{stage}")
for name, obj in list(vars(module).items()):
    if isinstance(obj, Task):
        def timed(*a, _fn=obj.fn, **k):
            entries.append(time.time())
            try:
                return _fn(*a, **k)
            finally:
                exits.append(time.time())
        obj.fn = functools.update_wrapper(timed, obj.fn)
rc = fp.main(["--stage", stage, "--force", stage])
marks.update(first_entry=min(entries), last_exit=max(exits), returned=time.time(), rc=rc)
open(out, "w").write(json.dumps(marks))
"""

# The stage server as `make run` starts it (flows/stage_server.py), with every stage task timed: each
# forked stage appends a line per mark (its entry into flows.pipeline.main, each task's entry and exit).
PROBE_SERVED = r"""
import functools, importlib, json, os, sys, time
out = sys.argv.pop(1)
import flows.stage_server as server

def mark(kind):
    with open(out, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "kind": kind, "t": time.time()}) + "\n")

def probed_warm(uri, _warm=server._warm):
    env = _warm(uri)
    import flows.pipeline as fp
    from prefect import Task
    def main(argv, _main=fp.main):
        mark("main")
        return _main(argv)
    fp.main = main
    for stage in fp.STAGE_ORDER:
        for obj in list(vars(importlib.import_module(f"tasks.{stage}")).values()):
            if isinstance(obj, Task):
                def timed(*a, _fn=obj.fn, **k):
                    mark("entry")
                    try:
                        return _fn(*a, **k)
                    finally:
                        mark("exit")
                obj.fn = functools.update_wrapper(timed, obj.fn)
    return env

server._warm = probed_warm
code = server.main(sys.argv[1:])
sys.stdout.flush(); sys.stderr.flush()
os._exit(code)
"""


def tiny_project(root: Path) -> dict:
    for name in ("cyclemerge", "tasks", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        for key, value in values.items():
            params[section][key] = value if not isinstance(value, dict) else {**params[section][key], **value}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "CYCLEMERGE_PROJECT": str(root),
            "DVC_NO_ANALYTICS": "1"}


def probe_stage(root: Path, env: dict, stage: str) -> dict:
    out = root / f"probe_{stage}.json"
    start = time.time()
    done = subprocess.run([sys.executable, "-c", PROBE, stage, str(out)], cwd=root, env=env, capture_output=True,
                          text=True)
    end = time.time()
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"stage probe {stage} failed: {done.stderr[-2000:]}")
    m = json.loads(out.read_text())
    return {"stage": stage, "imports": m["imported"] - start, "before_first_line": m["first_entry"] - start,
            "after_last_line": end - m["last_exit"], "work": m["last_exit"] - m["first_entry"], "wall": end - start}


def probe_served_stage(root: Path, env: dict, stage: str, marks: Path) -> dict:
    """``python -m flows.stage X --force X`` (dvc.yaml's command) through the stage server: from the client's
    start to the forked stage's first task, and from its last task to the client's exit."""
    marks.write_text("")
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "flows.stage", stage, "--force", stage], cwd=root, env=env,
                          capture_output=True, text=True)
    end = time.time()
    rows = [json.loads(line) for line in marks.read_text().splitlines()]
    if done.returncode != 0 or "stage server" in done.stderr or not any(r["kind"] == "entry" for r in rows):
        raise RuntimeError(f"stage probe {stage} through the stage server failed: {done.stderr[-2000:]}")
    t = {kind: [r["t"] for r in rows if r["kind"] == kind] for kind in ("main", "entry", "exit")}
    return {"stage": stage, "imports": min(t["main"]) - start, "before_first_line": min(t["entry"]) - start,
            "after_last_line": end - max(t["exit"]), "work": max(t["exit"]) - min(t["entry"]), "wall": end - start}


def overhead_section(stages: list[str]) -> dict:
    from flows.stage_server import serving
    from tasks.common import STAGE_ORDER, Project
    from tasks.tracking import resolve_uri

    with tempfile.TemporaryDirectory(prefix="cyclemerge-speed-") as tmp:
        root = Path(tmp)
        # Before Prefect is first imported here: the shared server's home is the tiny project's, not ours.
        os.environ["CYCLEMERGE_PROJECT"] = str(root)
        import flows._env

        env = tiny_project(root)
        subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q", "--no-scm"], cwd=root, env=env,
                       check=True)
        start = time.perf_counter()
        full = subprocess.run([sys.executable, "-m", "flows.pipeline", "--run-dvc"], cwd=root, env=env,
                              capture_output=True, text=True)
        repro_s = time.perf_counter() - start
        if full.returncode != 0:
            raise RuntimeError(f"tiny `--run-dvc` failed: {full.stderr[-3000:]}")
        noop = []
        for _ in range(3):
            start = time.perf_counter()
            rc = subprocess.run([sys.executable, "-m", "flows.uptodate"], cwd=root, env=env,
                                capture_output=True).returncode
            noop.append(time.perf_counter() - start)
            if rc != 0:
                raise RuntimeError("flows.uptodate found the freshly reproduced tiny project stale")
        # The whole `make run` again, every stage forced, with and without the stage server.
        rerun = {}
        for label, extra in (("stage server", {}), ("a process per stage", {"CYCLEMERGE_STAGE_SERVER": "off"})):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "flows.pipeline", "--run-dvc", "--force", "all"], cwd=root,
                                  env={**env, **extra}, capture_output=True, text=True)
            rerun[label] = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"tiny `--run-dvc --force all` ({label}) failed: {done.stderr[-3000:]}")
        probes = []
        with flows._env.shared_prefect_api() as url:
            shared = {**env, "PREFECT_API_URL": url, "CYCLEMERGE_LOCK_HELD": "1"}
            marks = root / "probe_served.jsonl"
            command = [sys.executable, "-c", PROBE_SERVED, str(marks)]
            with serving(shared, root, resolve_uri(Project.load(root)), command=command) as served:
                if not served:
                    raise RuntimeError("the stage server did not start")
                # In `make run` the server's imports overlap DVC's start; here one refused request waits them out.
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "flows.stage", "train", "--set", "no.such=1"], cwd=root,
                               env={**shared, **served}, capture_output=True)
                ready_s = time.perf_counter() - start
                for stage in (s for s in STAGE_ORDER if s in stages):  # side by side: the load moves
                    probes.append({**probe_stage(root, shared, stage), "api": "shared"})
                    probes.append({**probe_served_stage(root, {**shared, **served}, stage, marks),
                                   "api": "shared, stage server"})
        alone = {k: v for k, v in env.items() if k != "PREFECT_API_URL"} | {"CYCLEMERGE_LOCK_HELD": "1"}
        probes.append({**probe_stage(root, alone, "repair"), "api": "own ephemeral server"})
    return {"tiny_run_dvc_seconds": repro_s, "noop_seconds": sorted(noop), "stages": probes,
            "tiny_run_dvc_force_all_seconds": rerun, "stage_server_ready_seconds": ready_s}


def markdown(result: dict) -> str:
    load = lambda v: "/".join(f"{x:.2f}" for x in v)  # noqa: E731
    out = ["## Speed", "",
           f"Recorded {result['when']} by `benchmarks/speed.py{'' if result['mode'] == 'full' else ' --' + result['mode']}`"
           f" (commit {result['commit']}); load average (1/5/15 min) {load(result['load_average']['before'])} before, "
           f"{load(result['load_average']['after'])} after; torch with {result['threads']} intra-op thread(s).", "",
           "| machine | |", "|---|---|", *(f"| {k} | {v} |" for k, v in result["machine"]), "",
           "| what | seconds | floor | floor seconds | ratio | detail |", "|---|--:|---|--:|--:|---|"]
    out += [f"| {r['what']} | {r['seconds']:.2f} | {r['floor']} | {r['floor_seconds']:.2f} | {r['ratio']:.2f} | "
            f"{r['detail']} |" for r in result["rows"]]
    over = result.get("overhead")
    if over:
        noop = over["noop_seconds"]
        out += ["", f"Stage processes of a tiny synthetic project (3 MLPs 24-24): the whole `--run-dvc` took "
                f"{over['tiny_run_dvc_seconds']:.1f} s; the no-op check (`python -m flows.uptodate`, what a `make run` "
                f"with nothing stale runs) {noop[0]:.2f} / {statistics.median(noop):.2f} / {noop[-1]:.2f} s "
                "(min / median / max of 3). Per stage, `python -m flows.pipeline --stage X --force X`:", "",
                "| stage | Prefect API | imports | before first line of work | work | after last line | wall |",
                "|---|---|--:|--:|--:|--:|--:|"]
        out += [f"| {p['stage']} | {p['api']} | {p['imports']:.2f} | {p['before_first_line']:.2f} | {p['work']:.2f} | "
                f"{p['after_last_line']:.2f} | {p['wall']:.2f} |" for p in over["stages"]]
    return "\n".join(out) + "\n"


def record(md: str, result: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "speed.md").write_text(md)
    (OUT / "speed.json").write_text(json.dumps(result, indent=2))
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = text.find("\n## Speed\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + md
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start + 1] + md + (text[end:] if end >= 0 else "")
    RESULTS.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller settings, a few minutes")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic settings, seconds (the tests)")
    ap.add_argument("--record", action=argparse.BooleanOptionalAction, default=None,
                    help="write RESULTS.md 'Speed' and results/speed.{md,json} (default: only in the full mode)")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[name]
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    if args.smoke:
        data = load_data(DataConfig(name="synthetic", calibration_size=mode["calib"], validation_size=0,
                                    synthetic=SyntheticConfig(num_train=1200, num_test=100, image_size=8)),
                         project_dir=tempfile.mkdtemp(prefix="cyclemerge-speed-"))
        mlp_cfg = ModelConfig(arch="mlp", hidden=[64, 64])
    else:
        data = load_data(DataConfig(calibration_size=mode["calib"]), project_dir=REPO)
        mlp_cfg = ModelConfig()
    rows = training_rows(data, mode, args.smoke)
    rows.append(side_by_side_row(data, mlp_cfg, mode["mlp_samples"]))
    sds, source = seed_models(data, mlp_cfg, mode["models"], args.smoke)
    mlp = model_for(mlp_cfg, data)
    align_rows, perms = alignment_rows(sds, mlp.perm_spec(), source)
    rows += repair_rows(data, mlp, sds, perms, mlp.perm_spec(), mode) + align_rows
    overhead = None if args.smoke else overhead_section(["train", "activations", "align", "baselines", "gates",
                                                         "repair", "evaluate"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "?"
    result = {"when": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "mode": name, "commit": commit,
              "threads": torch.get_num_threads(), "machine": machine_lines([torch.device("cpu")]),
              "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
              "rows": rows, "overhead": overhead}
    md = markdown(result)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.record if args.record is not None else name == "full":
        record(md, result)
        print(f"recorded in {RESULTS} and {OUT}/speed.{{md,json}}", file=sys.stderr)


if __name__ == "__main__":
    main()
