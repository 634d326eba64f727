"""Merge quality of the alignment, REPAIR and gates stages, measured the way the pipeline composes them.

    python benchmarks/merge_quality.py --sets 1-5 6-10 11-15 --out benchmarks/results/narrow_mlp.json

Seed models are trained once (``cyclemerge.stages.train.train_model``, the default recipe) and cached
under ``--cache``; every later run reuses them. The library is called directly, through the pipeline's
own stage functions (``cyclemerge.stages``: train, activations, align, gates, repair; no Prefect,
MLflow or DVC), so the numbers describe the product:

- A: alignment methods (naive, pairwise, MergeMany, C2M3) -> uniform merge, objective, cycle error,
  seconds; C2M3 with 3 restarts selected by objective or by calibration loss after REPAIR.
- B: each method's merge with and without REPAIR (goal statistics of the universe-aligned endpoints).
- C: C2M3 + uniform / gates, each with and without gate-weighted REPAIR; the gate table.
- D: one bad model among honest ones (noise with matching norms, weights x1e3, NaN) through the
  user-checkpoint path: import -> pre-filter -> align -> gates -> REPAIR.

Calibration data (activation statistics, gates, REPAIR, restart selection) is the data bundle's
calibration slice of the TRAIN split; every reported accuracy and loss is on the full test split.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cyclemerge.config import Config, DataConfig, ModelConfig  # noqa: E402
from cyclemerge.data import load_data  # noqa: E402
from cyclemerge.evaluate import accuracy_and_loss, load_into  # noqa: E402
from cyclemerge.io import load_torch, save_torch  # noqa: E402
from cyclemerge.results import Alignment, Gates, Merged  # noqa: E402
from cyclemerge.stages.activations import activation_stats, calibration_slice  # noqa: E402
from cyclemerge.stages.align import align, screen  # noqa: E402
from cyclemerge.stages.gates import learn_gates  # noqa: E402
from cyclemerge.stages.repair import merge_and_repair, repair  # noqa: E402
from cyclemerge.stages.train import import_models, train_model  # noqa: E402
from cyclemerge.train import model_for  # noqa: E402

METHODS = ("naive", "pairwise", "merge_many", "c2m3")  # the tables' order
LABELS = {"naive": "naive", "pairwise": "pairwise (ref 0)", "merge_many": "MergeMany", "c2m3": "C2M3"}
NOISE_SEED = 0  # fixed once; the noise model is not tuned


@dataclass
class Bench:
    """Everything the measurements share: config, data, a template model. Every step is the pipeline's
    own stage function (``cyclemerge.stages``) on the prefix of the calibration slice that stage takes."""

    cfg: Config
    data: object
    cache: Path
    checkpoint_dir: Path | None

    def __post_init__(self) -> None:
        self.model = model_for(self.cfg.model, self.data)
        self.calibration = calibration_slice(self.data, len(self.data.calib_idx))
        self._stats: dict[int, dict] = {}

    @property
    def tag(self) -> str:
        return "mlp_" + "-".join(map(str, self.cfg.model.hidden))

    def checkpoint_path(self, seed: int) -> Path:
        if self.checkpoint_dir is not None:  # the pipeline's model_{i}.pt hold seeds 1..N
            return self.checkpoint_dir / f"model_{seed - 1}.pt"
        return self.cache / "models" / self.tag / f"seed_{seed}.pt"

    def seed_model(self, seed: int) -> dict:
        """The seed's state dict: trained once with the default recipe, then read from the cache."""
        path = self.checkpoint_path(seed)
        if path.exists():
            ckpt = load_torch(path)
            if ckpt.get("seed") != seed or ckpt["model"]["hidden"] != list(self.cfg.model.hidden):
                raise ValueError(f"{path}: holds seed {ckpt.get('seed')} / hidden {ckpt['model']['hidden']}, "
                                 f"expected seed {seed} / hidden {self.cfg.model.hidden}")
            return ckpt["state_dict"]
        if self.checkpoint_dir is not None:
            raise FileNotFoundError(f"{path} not found (--checkpoint-dir is read-only; omit it to train here)")
        print(f"training seed {seed} ({self.tag}) ...", flush=True)
        trained = train_model(self.cfg, self.data, seed, params_hash="merge_quality")
        save_torch(trained.checkpoint, path)
        print(f"  seed {seed}: test acc {trained.metrics['test_acc']:.4f}, {trained.metrics['seconds']:.0f}s", flush=True)
        return trained.state_dict

    def score(self, sd: dict) -> dict:
        """Test accuracy and mean cross-entropy (full test split)."""
        return accuracy_and_loss(load_into(self.model, sd), self.data.test_x, self.data.test_y,
                                 batch_size=self.cfg.evaluate.batch_size)

    def stats(self, sd: dict) -> dict:
        """Per-stat-point channel statistics, as the activations stage computes them."""
        return activation_stats(self.model, sd, self.calibration[0], self.cfg)

    def seed_stats(self, seed: int) -> dict:
        if seed not in self._stats:
            self._stats[seed] = self.stats(self.seed_model(seed))
        return self._stats[seed]

    def config(self, gates: dict | None = None, **align: object) -> Config:
        """The benchmark's config with some align (and gates) params changed."""
        return self.cfg.model_copy(update={"align": self.cfg.align.model_copy(update=align),
                                           "gates": self.cfg.gates.model_copy(update=gates or {})})

    def align(self, sds: list[dict], stats: list[dict], **update) -> Alignment:
        """The align stage; restarts selected by calibration loss score the merge after REPAIR, as there."""
        return align(sds, self.model, self.config(**update), endpoint_stats=stats, calibration=self.calibration)

    def uniform_repair(self, alignment: Alignment, stats: list[dict]) -> tuple[dict, dict]:
        """(uniform merge, its REPAIR) in the alignment's universe."""
        rcfg = self.cfg.repair
        return merge_and_repair(self.model, alignment.universe, method=rcfg.method,
                                x=self.calibration[0][:rcfg.num_samples], batch_size=rcfg.batch_size,
                                endpoint_stats=[stats[i] for i in alignment.indices], perms=alignment.perms)

    def gates_and_repair(self, alignment: Alignment, stats: list[dict], *, enabled: bool, names: list[str],
                         config: Config | None = None) -> tuple[Gates, Merged]:
        """The gates stage (or its uniform stand-in), then the repair stage (gate-weighted REPAIR)."""
        cfg = (config or self.cfg).model_copy(update={"gates": self.cfg.gates.model_copy(update={"enabled": enabled})})
        gates = learn_gates(self.model, alignment, self.calibration, cfg, model_names=names)
        return gates, repair(self.model, alignment, gates, self.calibration, cfg, endpoint_stats=stats)


def _acc_loss(scores: dict, prefix: str = "") -> dict:
    return {f"{prefix}acc": scores["acc"], f"{prefix}loss": scores["loss"]}


def align_row(bench: Bench, sds: list[dict], stats: list[dict], **update) -> tuple[dict, Alignment]:
    """One alignment: its uniform merge before and after REPAIR, objective, cycle error, seconds."""
    alignment = bench.align(sds, stats, **update)
    merged, repaired = bench.uniform_repair(alignment, stats)
    extra = alignment.report["extra"]
    row = {**_acc_loss(bench.score(merged)), **_acc_loss(bench.score(repaired), "repair_"),
           "objective": alignment.objective, "cycle_error": alignment.cycle_error,
           "seconds": alignment.seconds, "iterations": alignment.iterations}
    if "relaxed_objective" in extra:
        row.update(relaxed_objective=extra["relaxed_objective"], stop_reason=extra["stop_reason"])
    if "starts" in extra and len(extra["starts"]) > 1:
        row["selected"] = extra["starts"][extra["selected_start"]]["start"]
        row["starts"] = [{k: st[k] for k in ("start", "seed", "objective", "score", "iterations")} for st in extra["starts"]]
    return row, alignment


def c2m3_keys(init: str) -> list[str]:
    """The pipeline's C2M3 (config defaults, start ``init``) and, unless that is the identity, C2M3 from the identity."""
    return ["c2m3"] + (["c2m3_identity"] if init != "identity" else [])


def label(init: str, key: str) -> str:
    if key == "c2m3":
        return f"C2M3 (default, init {init})"
    return {"c2m3_identity": "C2M3 (init identity)", **LABELS}.get(key, key)


def part_a(bench: Bench, seeds: list[int], aligned: dict) -> dict:
    """Alignment methods: uniform merge in the universe (no REPAIR, no gates), objective, cycle error, seconds;
    C2M3 restarts selected by objective or by calibration loss; C2M3 init x anchor variants (diagnostic)."""
    sds = [bench.seed_model(s) for s in seeds]
    stats = [bench.seed_stats(s) for s in seeds]
    endpoints = {s: bench.score(sd) for s, sd in zip(seeds, sds)}
    rows = {}
    for key in [*METHODS[:-1], *c2m3_keys(bench.cfg.align.init)]:
        update = {"method": "c2m3", "init": "identity"} if key == "c2m3_identity" else {"method": key}
        rows[key], aligned[key] = align_row(bench, sds, stats, restarts=1, **update)
    restarts = {}
    for select_by in ("objective", "calibration_loss"):
        restarts[select_by], _ = align_row(bench, sds, stats, method="c2m3", restarts=3, select_by=select_by)
    # Diagnostic only (never used for a target): Frank-Wolfe's start and the anchored reference model.
    variants = {}
    for init in ("identity", "barycenter"):
        for anchor in (True, False):
            name = f"init {init}, anchor {'model 0' if anchor else 'none'}"
            same = [k for k in c2m3_keys(bench.cfg.align.init) if anchor == bench.cfg.align.anchor
                    and init == ("identity" if k == "c2m3_identity" else bench.cfg.align.init)]
            variants[name] = rows[same[0]] if same else align_row(bench, sds, stats, method="c2m3", restarts=1,
                                                                  init=init, anchor=anchor)[0]
    return {"endpoints": {str(s): e for s, e in endpoints.items()},
            "endpoint_mean": {"acc": statistics.fmean(e["acc"] for e in endpoints.values()),
                              "loss": statistics.fmean(e["loss"] for e in endpoints.values())},
            "methods": rows, "restarts": restarts, "c2m3_variants": variants}


def part_b(bench: Bench, seeds: list[int], aligned: dict) -> dict:
    """Each method's uniform merge before and after REPAIR (goal statistics of the aligned endpoints)."""
    sds = [bench.seed_model(s) for s in seeds]
    stats = [bench.seed_stats(s) for s in seeds]
    rows = {}
    for key in [*METHODS[:-1], *c2m3_keys(bench.cfg.align.init)]:
        if key not in aligned:
            update = {"method": "c2m3", "init": "identity"} if key == "c2m3_identity" else {"method": key}
            aligned[key] = bench.align(sds, stats, restarts=1, **update)
        merged, repaired = bench.uniform_repair(aligned[key], stats)
        rows[key] = {**_acc_loss(bench.score(merged)), **_acc_loss(bench.score(repaired), "repair_")}
    return rows


def gate_weights(gates: Gates, names: list[str]) -> dict:
    """Part -> {model name: final weight} (the layer's mean over its float keys, as the gates stage reports)."""
    return {part: dict(zip(names, (round(float(v), 4) for v in w))) for part, w in gates.layer_means().items()}


def part_c(bench: Bench, seeds: list[int], aligned: dict) -> dict:
    """C2M3 + uniform or gates, each with and without gate-weighted REPAIR; the gate table."""
    sds = [bench.seed_model(s) for s in seeds]
    stats = [bench.seed_stats(s) for s in seeds]
    if "c2m3" not in aligned:
        aligned["c2m3"] = bench.align(sds, stats, method="c2m3", restarts=1)
    names = [f"seed {s}" for s in seeds]
    rows = {}
    for label, enabled in (("uniform", False), ("gates", True)):
        gates, merged = bench.gates_and_repair(aligned["c2m3"], stats, enabled=enabled, names=names)
        rows[label] = {**_acc_loss(bench.score(merged.before_repair)), **_acc_loss(bench.score(merged.state_dict), "repair_"),
                       "seconds": gates.seconds}
        if enabled:
            rows[label]["weights"] = gate_weights(gates, names)
            rows[label]["table"] = gates.table
            rows[label]["skipped_steps"] = gates.skipped_steps
            rows[label]["final_loss"] = gates.history["loss"][-1]
    return rows


def bad_model(kind: str, sd: dict) -> dict:
    """A broken stand-in for an honest state dict (int buffers untouched)."""
    gen = torch.Generator().manual_seed(NOISE_SEED)
    out = {}
    for key, t in sd.items():
        if not torch.is_floating_point(t):
            out[key] = t.clone()
        elif kind == "noise":  # same per-tensor norm, so the norm screen cannot see it
            z = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            out[key] = z * (t.norm() / z.norm().clamp_min(1e-30))
        elif kind == "scaled":
            out[key] = t * 1e3
        elif kind == "nan":
            out[key] = torch.full_like(t, float("nan"))
        elif kind == "nan_one":
            out[key] = t.clone()
            if key == "layers.0.weight":
                out[key].view(-1)[0] = float("nan")
        else:
            raise ValueError(f"unknown bad model kind {kind!r}")
    return out


D_CASES = (  # label, bad model kind (None: honest only), align.outlier_norm_ratio, align.outlier_action
    ("honest only", None, 100.0, "drop"),
    ("(a) Gaussian noise, same norms", "noise", 100.0, "drop"),
    ("(b) x1e3, pre-filter drop", "scaled", 100.0, "drop"),
    ("(b) x1e3, pre-filter gate_off", "scaled", 100.0, "gate_off"),
    ("(b) x1e3, pre-filter off", "scaled", None, "drop"),
    ("(c) NaN everywhere", "nan", 100.0, "drop"),
    ("(c) one NaN entry", "nan_one", 100.0, "drop"),
)


def user_checkpoint_merge(bench: Bench, paths: list[Path], *, ratio, action: str) -> dict:
    """The pipeline's user-checkpoint mode: import -> stats of every model -> pre-filter + align -> gates -> REPAIR."""
    cfg = bench.config(outlier_norm_ratio=ratio, outlier_action=action)
    sds = [m.state_dict for m in import_models(paths, cfg, bench.data)]
    stats = [bench.stats(sd) for sd in sds]  # the activations stage runs on every imported model
    alignment = align(sds, bench.model, cfg)
    names = [f"model {i}" for i in alignment.indices]
    out = {"models": alignment.indices, "flagged": sorted(alignment.prefilter), "dropped": alignment.dropped,
           "gate_off": alignment.gate_off, "warnings": [f"warning: {w}" for w in alignment.warnings()],
           "describe": screen(sds, cfg, quiet=True).report.describe(), "align_seconds": alignment.seconds}
    for label, enabled in (("uniform", False), ("gates", True)):
        gates, merged = bench.gates_and_repair(alignment, stats, enabled=enabled, names=names, config=cfg)
        out[label] = {**_acc_loss(bench.score(merged.before_repair)), **_acc_loss(bench.score(merged.state_dict), "repair_")}
        if enabled:
            out[label]["weights"] = gate_weights(gates, names)
            out[label]["seconds"] = gates.seconds
    return out


def part_d(bench: Bench, seeds: list[int]) -> dict:
    """One bad model replacing the last seed of the set, through the user-checkpoint path."""
    honest = [bench.checkpoint_path(s) for s in seeds]
    for s in seeds:
        bench.seed_model(s)  # trained and cached when missing
    folder = bench.cache / "bad" / bench.tag
    rows = {}
    for label, kind, ratio, action in D_CASES:
        paths = honest[:-1]
        if kind is not None:
            path = folder / f"{kind}_from_seed_{seeds[-1]}.pt"
            if not path.exists():
                save_torch(bad_model(kind, bench.seed_model(seeds[-1])), path)  # a bare state dict, as users save
            paths = paths + [path]
        print(f"  D: {label}", flush=True)
        try:
            rows[label] = {"kind": kind, "ratio": ratio, "action": action,
                           **user_checkpoint_merge(bench, paths, ratio=ratio, action=action)}
        except Exception as e:  # noqa: BLE001 - a crash is a result here, recorded and reported
            rows[label] = {"kind": kind, "ratio": ratio, "action": action, "error": f"{type(e).__name__}: {e}"}
        if kind is not None and "uniform" in rows[label]:
            bad_name = f"model {len(paths) - 1}"
            w = rows[label]["gates"]["weights"]
            rows[label]["bad_weights"] = {p: v.get(bad_name) for p, v in w.items()}
    return rows


# ---------------------------------------------------------------- summaries and markdown

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single set)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def num(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    return f"{v:.3g}" if abs(v) >= 1e4 else f"{v:.{digits}f}"


def ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def md_a(sets: dict, init: str) -> str:
    out = ["### A. Alignment: uniform merge in the universe (no REPAIR, no gates)", ""]
    all_a = [res["A"] for res in sets.values()]
    keys = list(all_a[0]["methods"])
    rows = []
    for name, a in zip(sets, all_a):
        rows.append([name, "mean endpoint", pct(a["endpoint_mean"]["acc"]), num(a["endpoint_mean"]["loss"]), "", "", ""])
        for m, r in a["methods"].items():
            rows.append([name, label(init, m), pct(r["acc"]), num(r["loss"]), f"{r['objective']:.1f}", num(r["cycle_error"]),
                         f"{r['seconds']:.1f}"])
    rows.append(["**mean ± std**", "mean endpoint", ms([a["endpoint_mean"]["acc"] for a in all_a]),
                 ms([a["endpoint_mean"]["loss"] for a in all_a], 1, 4), "", "", ""])
    for m in keys:
        rs = [a["methods"][m] for a in all_a]
        rows.append(["**mean ± std**", label(init, m), ms([r["acc"] for r in rs]), ms([r["loss"] for r in rs], 1, 4),
                     ms([r["objective"] for r in rs], 1, 1), ms([r["cycle_error"] for r in rs], 1, 4),
                     ms([r["seconds"] for r in rs], 1, 1)])
    out.append(table(["set", "method", "test acc %", "test loss", "objective", "cycle error", "align s"], rows))

    out += ["", "C2M3 restarts (3 starts: identity, barycenter, sinkhorn seed 0) against single starts; `+R` = after REPAIR:", ""]
    picks = {"restarts, select by objective": ("restarts", "objective"),
             "restarts, select by calibration loss": ("restarts", "calibration_loss"),
             **{f"single start: {label(init, k)}": ("methods", k) for k in c2m3_keys(init)}}
    rows = []
    for name, a in zip(sets, all_a):
        for v, (group, key) in picks.items():
            r = a[group][key]
            rows.append([name, v, r.get("selected", ""), pct(r["acc"]), num(r["loss"]), pct(r["repair_acc"]),
                         num(r["repair_loss"]), f"{r['objective']:.1f}", f"{r['seconds']:.1f}"])
    for v, (group, key) in picks.items():
        rs = [a[group][key] for a in all_a]
        rows.append(["**mean ± std**", v, "", ms([r["acc"] for r in rs]), ms([r["loss"] for r in rs], 1, 4),
                     ms([r["repair_acc"] for r in rs]), ms([r["repair_loss"] for r in rs], 1, 4),
                     ms([r["objective"] for r in rs], 1, 1), ms([r["seconds"] for r in rs], 1, 1)])
    out.append(table(["set", "C2M3", "chosen start", "acc %", "loss", "+R acc %", "+R loss", "objective", "align s"], rows))
    rows = [[name, st["start"], f"{st['objective']:.1f}", num(st["score"]), st["iterations"]]
            for name, a in zip(sets, all_a) for st in a["restarts"]["calibration_loss"]["starts"]]
    out += ["", "Per start (the calibration-loss run scores every start; the starts are the same in both runs):", "",
            table(["set", "start", "objective", "calibration CE after REPAIR", "FW iterations"], rows)]

    rows = []
    for name, a in zip(sets, all_a):
        for v, r in a["c2m3_variants"].items():
            rows.append([name, v, pct(r["acc"]), num(r["loss"]), pct(r["repair_acc"]), num(r["repair_loss"]),
                         f"{r['objective']:.1f}", f"{r['relaxed_objective']:.1f}", r["stop_reason"], r["iterations"],
                         f"{a['methods']['merge_many']['objective']:.1f}"])
    for v in all_a[0]["c2m3_variants"]:
        rs = [a["c2m3_variants"][v] for a in all_a]
        rows.append(["**mean ± std**", v, ms([r["acc"] for r in rs]), ms([r["loss"] for r in rs], 1, 4),
                     ms([r["repair_acc"] for r in rs]), ms([r["repair_loss"] for r in rs], 1, 4),
                     ms([r["objective"] for r in rs], 1, 1), "", "", "",
                     ms([a["methods"]["merge_many"]["objective"] for a in all_a], 1, 1)])
    out += ["", "Diagnostic (not used for any target): C2M3's Frank-Wolfe by start and by anchored reference model "
            "(`anchor none` is the paper's symmetric iteration); relaxed = the soft iterate's objective before rounding:", "",
            table(["set", "C2M3 variant", "acc %", "loss", "+R acc %", "+R loss", "objective", "relaxed objective", "stop",
                   "FW iterations", "MergeMany objective"], rows)]
    return "\n".join(out)


def md_b(sets: dict, init: str) -> str:
    rows = []
    for name, res in sets.items():
        for m, r in res["B"].items():
            rows.append([name, label(init, m), pct(r["acc"]), num(r["loss"]), pct(r["repair_acc"]), num(r["repair_loss"]),
                         f"{100 * (r['repair_acc'] - r['acc']):+.2f}"])
    for m in next(iter(sets.values()))["B"]:
        rs = [res["B"][m] for res in sets.values()]
        rows.append(["**mean ± std**", label(init, m), ms([r["acc"] for r in rs]), ms([r["loss"] for r in rs], 1, 4),
                     ms([r["repair_acc"] for r in rs]), ms([r["repair_loss"] for r in rs], 1, 4),
                     ms([r["repair_acc"] - r["acc"] for r in rs])])
    return "\n".join(["### B. REPAIR (uniform merge; goal statistics of the universe-aligned endpoints)", "",
                      table(["set", "method", "acc %", "loss", "+REPAIR acc %", "+REPAIR loss", "Δ acc (points)"], rows)])


def md_c(sets: dict) -> str:
    variants = (("C2M3 + uniform", "uniform", ""), ("C2M3 + gates", "gates", ""),
                ("C2M3 + uniform + REPAIR", "uniform", "repair_"), ("C2M3 + gates + REPAIR", "gates", "repair_"))
    rows = []
    for name, res in sets.items():
        for label, v, p in variants:
            r = res["C"][v]
            rows.append([name, label, pct(r[p + "acc"]), num(r[p + "loss"]), f"{r['seconds']:.1f}" if v == "gates" else ""])
    for label, v, p in variants:
        rs = [res["C"][v] for res in sets.values()]
        rows.append(["**mean ± std**", label, ms([r[p + "acc"] for r in rs]), ms([r[p + "loss"] for r in rs], 1, 4),
                     ms([r["seconds"] for r in rs], 1, 1) if v == "gates" else ""])
    out = ["### C. Gates (layer granularity, default GatesConfig) vs uniform, with and without REPAIR", "",
           table(["set", "variant", "acc %", "loss", "gate s"], rows), "", "Final gate weights (share of each layer per model):", ""]
    for name, res in sets.items():
        w = res["C"]["gates"]["weights"]
        models = list(next(iter(w.values())))
        out += [f"Set {name}:", "", table(["part", *models], [[p, *(f"{v[m]:.3f}" for m in models)] for p, v in w.items()]), ""]
    return "\n".join(out)


def md_d(rows: dict, title: str) -> str:
    body = []
    for label, r in rows.items():
        if "error" in r:
            body.append([label, "—", "—", f"**crashed**: {r['error']}", *[""] * 6])
            continue
        fate = ", ".join([f"{i} dropped" for i in r["dropped"]] + [f"{i} gate_off" for i in r["gate_off"]]) or "none"
        bad = r.get("bad_weights")
        bad_text = " / ".join(f"{v:.3f}" if v is not None else "—" for v in bad.values()) if bad else "—"
        body.append([label, ",".join(map(str, r["models"])), fate, pct(r["uniform"]["acc"]), pct(r["uniform"]["repair_acc"]),
                     num(r["uniform"]["repair_loss"]), pct(r["gates"]["acc"]), pct(r["gates"]["repair_acc"]),
                     num(r["gates"]["repair_loss"]), bad_text])
    header = ["case", "merged", "pre-filter", "uniform acc %", "uniform+R acc %", "uniform+R loss", "gates acc %",
              "gates+R acc %", "gates+R loss", "bad model's final gate weight per layer (first / … / last)"]
    warn = [f"- {label}: " + "; ".join(r["warnings"]) for label, r in rows.items() if r.get("warnings")]
    return "\n".join([title, "", table(header, body), "", "Warnings printed by the pre-filter step:", "", *warn])


def targets(sets: dict, d_rows: dict | None, default_width: bool, names: dict) -> list[dict]:
    """The issues' targets, each with its measured value and met / missed (never used to pick anything)."""
    out = []

    def add(name: str, measured: str, met) -> None:
        out.append({"target": name, "measured": measured,
                    "status": "met" if met is True else "missed" if met is False else met})

    res = list(sets.values())
    if res and "A" in res[0]:
        for key in [k for k in ("c2m3", "c2m3_identity") if k in res[0]["A"]["methods"]]:
            pairs = [(r["A"]["methods"][key]["objective"], r["A"]["methods"]["merge_many"]["objective"]) for r in res]
            add(f"{names[key]} objective ≥ MergeMany's on every set", "; ".join(f"{c:.1f} vs {m:.1f}" for c, m in pairs),
                all(c >= m for c, m in pairs))
        ratios = [r["A"]["methods"]["c2m3"]["acc"] / r["A"]["endpoint_mean"]["acc"] for r in res]
        add(f"{names['c2m3']} uniform merge ≥ 0.99 × mean endpoint acc", "ratios " + ", ".join(f"{x:.3f}" for x in ratios),
            all(x >= 0.99 for x in ratios) if default_width else "n/a (default-width target; narrow reported as measured)")
    if res and "B" in res[0]:
        gain = {m: mean_std([r["B"][m]["repair_acc"] - r["B"][m]["acc"] for r in res])[0] for m in ("merge_many", "c2m3")}
        add("REPAIR raises MergeMany by ≥ 3 points (mean over sets)", f"{100 * gain['merge_many']:+.2f}", gain["merge_many"] >= 0.03)
        add(f"REPAIR raises {names['c2m3']} by ≥ 1 point (mean over sets)", f"{100 * gain['c2m3']:+.2f}", gain["c2m3"] >= 0.01)
        if "A" in res[0]:
            ratios = [r["B"]["c2m3"]["repair_acc"] / r["A"]["endpoint_mean"]["acc"] for r in res]
            add(f"{names['c2m3']} + REPAIR ≥ 0.93 × mean endpoint acc (every set)", "ratios " + ", ".join(f"{x:.3f}" for x in ratios),
                all(x >= 0.93 for x in ratios))
    if res and "C" in res[0]:
        diff = mean_std([r["C"]["gates"]["acc"] - r["C"]["uniform"]["acc"] for r in res])[0]
        add("gates beat uniform without REPAIR (mean over sets)", f"{100 * diff:+.2f} points", diff > 0)
        diff = mean_std([r["C"]["gates"]["repair_acc"] - r["C"]["uniform"]["repair_acc"] for r in res])[0]
        add("with REPAIR, gates ≥ uniform − 0.5 points (mean over sets)", f"{100 * diff:+.2f} points", diff >= -0.005)
    if d_rows:
        ref = d_rows["honest only"]
        ref_u, ref_g = ref["uniform"]["repair_acc"], ref["gates"]["repair_acc"]
        a = d_rows["(a) Gaussian noise, same norms"]
        if "error" in a:
            add("(a) noise model gated to 0 everywhere, acc ≥ honest reference − 1", a["error"], False)
        else:
            zero = all(v == 0 for v in a["bad_weights"].values())
            acc = a["gates"]["repair_acc"]
            add("(a) noise model's final gate weight 0 in every part",
                ", ".join(f"{v:.3f}" for v in a["bad_weights"].values()), zero)
            add("(a) gates + REPAIR acc ≥ honest reference (C2M3 + uniform + REPAIR) − 1 point",
                f"{pct(acc)} vs {pct(ref_u)}", acc >= ref_u - 0.01)
            add("(a) same, like for like: gates + REPAIR ≥ honest gates + REPAIR − 1 point",
                f"{pct(acc)} vs {pct(ref_g)}", acc >= ref_g - 0.01)
            u_acc = a["uniform"]["repair_acc"]
            add("(a) uniform + REPAIR (noise model averaged in) ≥ honest reference − 1 point",
                f"{pct(u_acc)} vs {pct(ref_u)}", u_acc >= ref_u - 0.01)
        b = d_rows["(b) x1e3, pre-filter drop"]
        if "error" in b:
            add("(b) x1e3 within 1 point of the honest reference", b["error"], False)
        else:
            acc, u_acc = b["gates"]["repair_acc"], b["uniform"]["repair_acc"]
            add("(b) x1e3 (pre-filter, drop): within 1 point of the honest reference, like for like",
                f"gates + REPAIR {pct(acc)} vs {pct(ref_g)}; uniform + REPAIR {pct(u_acc)} vs {pct(ref_u)}",
                abs(acc - ref_g) <= 0.01 and abs(u_acc - ref_u) <= 0.01)
        crashed = [k for k, r in d_rows.items() if "error" in r]
        add("(c) NaN model excluded with a warning, nothing crashes",
            "crashed: " + ", ".join(crashed) if crashed else "; ".join(d_rows["(c) NaN everywhere"]["warnings"])[:160],
            not crashed and all(r["dropped"] for k, r in d_rows.items() if k.startswith("(c)")))
    return out


def md_targets(rows: list[dict]) -> str:
    return "\n".join(["### Targets", "", table(["target", "measured", "status"],
                                               [[r["target"], r["measured"], r["status"]] for r in rows])])


def flat_rows(obj, prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves as (dotted path, value), for the CSV."""
    if isinstance(obj, dict):
        return [row for k, v in obj.items() for row in flat_rows(v, f"{prefix}{k}." if prefix or k else "")]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [(prefix.rstrip("."), obj)]
    return []


def parse_set(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    seeds = list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    if not seeds:
        raise argparse.ArgumentTypeError(f"empty seed set {text!r}; write e.g. 1-5")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=["1-5", "6-10", "11-15"], help="seed sets, e.g. 1-5 6-10")
    parser.add_argument("--parts", nargs="+", default=["A", "B", "C", "D"], choices=["A", "B", "C", "D"])
    parser.add_argument("--hidden", nargs="+", type=int, default=[128, 128, 128, 64], help="MLP hidden widths")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/narrow_mlp.json"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cm-quality"), help="trained seed models and bad models")
    parser.add_argument("--data-root", default="/tmp/cm-data")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="read seeds 1..N from a pipeline's artifacts/models/model_{i}.pt instead of training")
    parser.add_argument("--d-set", default=None, help="seed set for part D (default: the first of --sets)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the .md/.csv (and targets) from the JSON at --out; measure nothing")
    args = parser.parse_args(argv)
    if args.render:
        print(write_outputs(json.loads(args.out.read_text()), args.out))
        return 0
    torch.set_num_threads(args.threads)
    return run(args, Config(data=DataConfig(root=args.data_root), model=ModelConfig(hidden=args.hidden)))


def file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def code_version() -> dict:
    """The git commit and a hash of the library's sources as run (the tree may hold uncommitted edits)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted((root / "cyclemerge").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "cyclemerge"], cwd=root, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return {"commit": commit, "library_dirty": dirty, "library_sha256": digest.hexdigest()[:16]}


def run(args: argparse.Namespace, cfg: Config) -> int:
    """All requested parts on ``cfg`` (the pipeline's defaults but for the model widths and data root)."""
    bench = Bench(cfg, load_data(cfg.data), args.cache, args.checkpoint_dir)
    meta = {"date": date.today().isoformat(), "command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": args.threads,
            "model": cfg.model.model_dump(), "train": cfg.train.model_dump(), "align": cfg.align.model_dump(),
            "gates": cfg.gates.model_dump(), "repair": cfg.repair.model_dump(), "data_source": bench.data.source,
            "std": "sample standard deviation (ddof 1) over seed sets", "code": code_version()}
    report = {"meta": meta, "sets": {}, "D": None}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))

    for text in args.sets:
        seeds = parse_set(text)
        aligned: dict = {}
        res = report["sets"].setdefault(text, {"seeds": seeds})
        for part, fn in (("A", part_a), ("B", part_b), ("C", part_c)):
            if part in args.parts:
                print(f"set {text}: part {part}", flush=True)
                res[part] = fn(bench, seeds, aligned)
                save()
    if "D" in args.parts:
        d_seeds = parse_set(args.d_set or args.sets[0])
        print(f"part D on seeds {d_seeds}", flush=True)
        report["D"] = {"seeds": d_seeds, "cases": part_d(bench, d_seeds)}
    used = sorted({s for v in report["sets"].values() for s in v["seeds"]} | set(report["D"]["seeds"] if report["D"] else []))
    meta["checkpoints"] = {str(s): {"path": str(bench.checkpoint_path(s)), "sha256": file_digest(bench.checkpoint_path(s))}
                           for s in used if bench.checkpoint_path(s).exists()}
    save()
    print(write_outputs(report, args.out))
    return 0


def write_outputs(report: dict, out: Path) -> str:
    """Targets, markdown (``out`` with .md) and a flat CSV (.csv) from a finished report; returns the markdown."""
    meta = report["meta"]
    init = meta["align"]["init"]
    sets = {k: v for k, v in report["sets"].items() if len(v) > 1}
    parts = {p for v in sets.values() for p in ("A", "B", "C") if p in v}
    default_width = list(meta["model"]["hidden"]) == list(ModelConfig().hidden)
    report["targets"] = targets(sets, report["D"]["cases"] if report["D"] else None, default_width,
                                {k: label(init, k) for k in ("c2m3", "c2m3_identity")})
    out.write_text(json.dumps(report, indent=1, default=str))

    width = "-".join(map(str, meta["model"]["hidden"]))
    sections = [f"## MLP {width}: seed sets {', '.join(report['sets'])}"]
    if "A" in parts:
        sections.append(md_a(sets, init))
    if "B" in parts:
        sections.append(md_b(sets, init))
    if "C" in parts:
        sections.append(md_c(sets))
    if report["D"]:
        d = report["D"]
        sections.append(md_d(d["cases"], f"### D. One bad model among honest ones (seeds {d['seeds'][0]}–{d['seeds'][-2]}"
                                          f" + a bad copy of seed {d['seeds'][-1]}), user-checkpoint path"))
    sections.append(md_targets(report["targets"]))
    markdown = "\n\n".join(sections) + "\n"
    if len(sets) == 1:  # a mean over one set says nothing new
        markdown = "\n".join(line for line in markdown.split("\n") if not line.startswith("| **mean ± std** |"))
    out.with_suffix(".md").write_text(markdown)
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["set", "metric", "value"])
        for name, res in report["sets"].items():
            writer.writerows((name, k, v) for k, v in flat_rows({p: res[p] for p in ("A", "B", "C") if p in res}))
        if report["D"]:
            writer.writerows(("D", k, v) for k, v in flat_rows(report["D"]["cases"]))
    return markdown

if __name__ == "__main__":
    raise SystemExit(main())
