"""Comparison grids: methods x N x architecture x dataset, described by one small YAML file.

    name: paper
    methods: [naive, merge_many, c2m3, c2m3_gates]   # each reported as is and after REPAIR
    num_models: [5]
    set: {evaluate.cycle: false}                     # params overrides for every point
    points:                                          # architecture x dataset, one entry each
      - name: mlp-fashion_mnist
      - name: resnet20x2-cifar10
        requires: cuda                               # skipped, and said so, on a machine without it
        set: {model.arch: resnet20, model.width: 2, data.name: cifar10}
    axes:                                            # optional: the cartesian product of these
      model.hidden: [[32, 32, 32, 16], [64, 64, 64, 32]]
    reference: [...]                                 # published numbers shown beside ours

A grid point is a full params set (params.yaml + the overrides) and N; every method of a point is
read from one pipeline run. Trained models are cached by their *recipe* (data, model and training
params, and the seed) so that N = 2, 3 and 5 and every method share the same seed models.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cyclemerge.config import MATCHERS, Config, ConfigError, Matcher, config_from_dict, set_override
from cyclemerge.results import METHOD_LABELS

# A grid's methods: every alignment method's uniform merge, and C2M3 with gates.
GridMethod = Literal[Matcher, "c2m3_gates"]
# Grid method -> the row of the evaluate stage's method table that holds it.
METHOD_ROWS = {**{m: METHOD_LABELS[m] for m in MATCHERS if m != "c2m3"}, "c2m3": f"{METHOD_LABELS['c2m3']} uniform",
               "c2m3_gates": f"{METHOD_LABELS['c2m3']} + gates"}
CSV_COLUMNS = ("grid", "point", "dataset", "arch", "N", "method", "test_acc", "test_loss", "train_acc", "train_loss",
               "validation_acc", "validation_loss", "endpoints_validation_acc", "endpoints_test_acc", "relative_to_endpoints", "objective", "align_seconds", "params_hash")
# Parameters that say which models exist or where they run, not how one model is trained.
NOT_RECIPE = {"data": ("root", "download"), "train": ("num_models", "seeds", "checkpoints", "device")}


class GridError(ValueError):
    """A grid file that cannot be run; the message names the file, the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PointSpec(_Strict):
    name: str = Field(min_length=1)
    requires: Literal["cuda"] | None = None
    set: dict[str, Any] = Field(default_factory=dict)


class Reference(_Strict):
    dataset: str
    arch: str
    method: str
    test_acc: float
    source: str = ""


class GridFile(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    methods: list[GridMethod] = Field(min_length=1)
    num_models: list[int] = Field(default_factory=lambda: [5], min_length=1)
    set: dict[str, Any] = Field(default_factory=dict)
    points: list[PointSpec] = Field(min_length=1)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    reference: list[Reference] = Field(default_factory=list)


@dataclass
class GridPoint:
    """One run of the grid: a validated config (N included) and its place in the grid."""

    id: str
    name: str
    num_models: int
    cfg: Config
    requires: str | None = None
    axes: dict[str, Any] = field(default_factory=dict)


def load_grid(path: str | Path) -> GridFile:
    path = Path(path)
    if not path.exists():
        raise GridError(f"{path}: grid file not found (the shipped grids are in benchmarks/grids/)")
    try:
        raw = yaml.safe_load(path.read_text())
        return GridFile.model_validate(raw)
    except yaml.YAMLError as e:
        raise GridError(f"{path}: not valid YAML: {e}") from e
    except ValidationError as e:
        lines = [f"{path}: invalid grid file"]
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {key}: {err['msg']}")
        raise GridError("\n".join(lines)) from None


def _slug(value: Any) -> str:
    text = "-".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def expand(grid: GridFile, base: dict, source: str = "grid") -> list[GridPoint]:
    """Every (point, axes combination, N) as a validated config; bad overrides fail here, before any work."""
    out: list[GridPoint] = []
    axis_keys = list(grid.axes)
    for spec in grid.points:
        for combo in itertools.product(*(grid.axes[k] for k in axis_keys)):
            axes = dict(zip(axis_keys, combo))
            for n in grid.num_models:
                raw = json.loads(json.dumps(base))
                settings = {**grid.set, **spec.set, **axes}
                derived = pipeline_settings(grid)
                # Baselines a point asks for come on top of those the grid's methods need.
                derived["evaluate.baselines"] = list(dict.fromkeys(
                    derived["evaluate.baselines"] + list(settings.get("evaluate.baselines", []))))
                for dotted, value in {**settings, **derived}.items():
                    set_override(raw, dotted, value)
                set_override(raw, "train.num_models", n)
                seeds = raw.get("train", {}).get("seeds")
                if seeds:
                    if len(seeds) < n:
                        raise GridError(f"{source}: point {spec.name}: train.seeds has {len(seeds)} seeds, N = {n}")
                    set_override(raw, "train.seeds", seeds[:n])
                point_id = "__".join([spec.name, *(f"{k.split('.')[-1]}={_slug(v)}" for k, v in axes.items()), f"N{n}"])
                try:
                    cfg = config_from_dict(raw, source=f"{source}: point {point_id}")
                except ConfigError as e:
                    raise GridError(str(e)) from None
                out.append(GridPoint(id=point_id, name=spec.name, num_models=n, cfg=cfg, requires=spec.requires,
                                     axes=axes))
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):
        raise GridError(f"{source}: two points share a name; point names must be unique")
    return out


def pipeline_settings(grid: GridFile) -> dict[str, Any]:
    """The params that make one pipeline run produce every method the grid asks for."""
    baselines = [m for m in grid.methods if m in MATCHERS and m != "c2m3"]  # c2m3 is the main alignment
    return {"align.method": "c2m3", "gates.enabled": "c2m3_gates" in grid.methods,
            "evaluate.baselines": baselines + ["ensemble"]}


def recipe_key(cfg: Config) -> str:
    """Cache key of a training recipe: what decides a seed model's weights, not N, paths or the device."""
    dumped = cfg.model_dump(mode="json")
    recipe = {s: {k: v for k, v in dumped[s].items() if k not in NOT_RECIPE.get(s, ())} for s in ("data", "model", "train")}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def model_cache_path(cache_dir: Path, cfg: Config, seed: int) -> Path:
    return Path(cache_dir) / f"{cfg.data.name}-{cfg.model.arch}" / recipe_key(cfg) / f"seed{seed}.pt"


def point_rows(grid: GridFile, point: GridPoint, evaluation: dict, alignment: dict) -> list[dict]:
    """The grid's rows for one point, from the evaluate and align stages' metrics."""
    endpoints = evaluation["endpoints"]["mean"]["test_acc"]
    table = evaluation["methods"]
    # Selection grids choose on validation (data.validation_size > 0); the endpoint mean is its yardstick.
    endpoints_val = table.get("endpoint mean", {}).get("validation_acc")
    repair = point.cfg.repair.method
    # c2m3_gates reuses C2M3's alignment: its objective and seconds are C2M3's row, not repeated.
    objectives = {"c2m3": alignment.get("objective"),
                  **{m: b.get("objective") for m, b in evaluation.get("baselines", {}).items()}}
    seconds = {"c2m3": alignment.get("seconds"),
               **{m: b.get("align_seconds") for m, b in evaluation.get("baselines", {}).items()}}
    rows = []
    labels = [("endpoint mean", "endpoint mean", None), ("ensemble", "ensemble (outputs)", None)]
    for m in grid.methods:
        labels.append((m, METHOD_ROWS[m], m))
        if repair != "none":
            labels.append((f"{m}+{repair}", f"{METHOD_ROWS[m]} + {repair}", m))
    for name, label, method in labels:
        if label not in table:
            raise KeyError(f"point {point.id}: the evaluate stage reported no {label!r} row")
        r = table[label]
        rows.append({
            "grid": grid.name, "point": point.id, "dataset": point.cfg.data.name, "arch": arch_label(point.cfg),
            "N": point.num_models, "method": name, "test_acc": r["test_acc"], "test_loss": r["test_loss"],
            "train_acc": r.get("train_acc"), "train_loss": r.get("train_loss"),
            "validation_acc": r.get("validation_acc"), "validation_loss": r.get("validation_loss"),
            "endpoints_validation_acc": endpoints_val, "endpoints_test_acc": endpoints,
            "relative_to_endpoints": r["test_acc"] / endpoints if endpoints else None,
            "objective": objectives.get(method), "align_seconds": seconds.get(method),
            "params_hash": point.cfg.section_hash(),
        })
    return rows


def arch_label(cfg: Config) -> str:
    m = cfg.model
    if m.arch == "mlp":
        return "MLP " + "-".join(map(str, m.hidden))
    return f"{'ResNet20' if m.arch == 'resnet20' else 'VGG16'}-x{m.width}" + (f" ({m.norm})" if m.arch == "resnet20" else "")


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Old rows with those of the same (grid, point, method) replaced by the new ones, order kept."""
    key = lambda r: (r["grid"], r["point"], r["method"])  # noqa: E731
    fresh = {key(r): r for r in new}
    kept = [r for r in old if key(r) not in fresh]
    return kept + list(new)


def read_csv(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k not in ("grid", "point", "dataset", "arch", "method", "params_hash"):
                r[k] = None if v in ("", None) else (int(v) if k == "N" else float(v))
    return rows


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


def _pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def to_markdown(grid: GridFile, rows: list[dict], skipped: dict[str, str] | None = None) -> str:
    """A pivot: one line per point, test accuracy (%) of each method; then the published numbers."""
    methods: list[str] = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    points: dict[str, dict] = {}
    for r in rows:
        points.setdefault(r["point"], {"dataset": r["dataset"], "arch": r["arch"], "N": r["N"]})[r["method"]] = r
    lines = [f"## Grid `{grid.name}`", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    lines += ["Test accuracy (%) of each method; `+repair` = after REPAIR; every point is one pipeline run.", "",
              "| point | dataset | arch | N | " + " | ".join(methods) + " |",
              "|---|---|---|--:|" + "--:|" * len(methods)]
    for pid, p in points.items():
        cells = [_pct(p[m]["test_acc"]) if m in p else "–" for m in methods]
        lines.append(f"| {pid} | {p['dataset']} | {p['arch']} | {p['N']} | " + " | ".join(cells) + " |")
    if any(r.get("validation_acc") is not None for r in rows):
        lines += ["", "Validation accuracy (%) of each method (what a selection grid chooses by; never the test split):", "",
                  "| point | " + " | ".join(methods) + " |", "|---|" + "--:|" * len(methods)]
        for pid, p in points.items():
            cells = [_pct(p[m].get("validation_acc")) if m in p else "–" for m in methods]
            lines.append(f"| {pid} | " + " | ".join(cells) + " |")
    if any(r.get("objective") is not None for r in rows):
        lines += ["", "Alignment objective (sum of pairwise inner products in the universe) and seconds:", "",
                  "| point | method | objective | align s |", "|---|---|--:|--:|"]
        for r in rows:
            if r.get("objective") is not None and "+" not in r["method"]:
                lines.append(f"| {r['point']} | {r['method']} | {r['objective']:.6g} | {r['align_seconds']:.1f} |")
    if skipped:
        lines += ["", "Not run here:", ""] + [f"- {pid}: {why}" for pid, why in skipped.items()]
    if grid.reference:
        lines += ["", "Published numbers for orientation (other datasets and recipes; not comparable cell by cell):", "",
                  "| dataset | arch | method | test acc (%) | source |", "|---|---|---|--:|---|"]
        for ref in grid.reference:
            lines.append(f"| {ref.dataset} | {ref.arch} | {ref.method} | {100 * ref.test_acc:.0f} | {ref.source} |")
    return "\n".join(lines) + "\n"
