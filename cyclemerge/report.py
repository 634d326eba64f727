"""The run summary: ``reports/summary.md`` and a compact table for the terminal.

The context dict
----------------
Every key is optional; a missing section is left out of the report.

``title``: str
    First heading (default "cyclemerge run summary").
``params``: dict[str, scalar]
    The settings that matter, label -> value, in display order; ``params_from_config(cfg)`` fills it
    (dataset, architecture, N, alignment method and init, gates on/off and granularity, repair).
``rows``: list[dict]
    ``cyclemerge.evaluate.method_table(...)`` output: ``method, kind, test_acc, test_loss,
    train_acc, train_loss`` and, when a validation split was evaluated, ``validation_acc,
    validation_loss`` (accuracies as fractions, losses in nats, None when not evaluated); kind is
    "endpoint", "reference" (the endpoints' mean) or "method". Each method is placed against the
    endpoints' band (min to max endpoint test accuracy): inside, above or below it.
``figures``: dict[str, str]
    Caption -> PNG path, relative to the repository root (or absolute).
``report_dir``: str
    Folder the summary is written to, relative to the same root (default "reports"); figure links
    are made relative to it, so ``plots/x.png`` becomes ``../plots/x.png``.
``timings``: dict[str, float]
    Stage -> wall-clock seconds, in pipeline order.
``alignment``: dict[str, scalar]
    Facts about the alignment, label -> value (e.g. method, final objective, iterations,
    cycle error of the maps, mean cosine before/after mapping to the universe).
``cycle``: dict[str, dict]
    Method -> ``cyclemerge.evaluate.cycle_experiment`` result (the curve itself is not printed).
``notes``: list[str]
    Free-text lines appended at the end (warnings, dropped models, ...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from cyclemerge.config import Config

_COLUMNS = (
    ("test_acc", "test acc (%)"),
    ("test_loss", "test loss"),
    ("validation_acc", "validation acc (%)"),
    ("validation_loss", "validation loss"),
    ("train_acc", "train acc (%)"),
    ("train_loss", "train loss"),
)
_OPTIONAL = {"validation_acc", "validation_loss"}  # shown only when some row has them


def _columns(rows: Sequence[Mapping]) -> list[tuple[str, str]]:
    return [(c, label) for c, label in _COLUMNS if c not in _OPTIONAL or any(r.get(c) is not None for r in rows)]


def endpoint_band(rows: Sequence[Mapping], metric: str = "test_acc") -> tuple[float, float] | None:
    """(min, max) of ``metric`` over the endpoint rows; None without endpoints."""
    values = [r[metric] for r in rows if r.get("kind") == "endpoint" and r.get(metric) is not None]
    return (min(values), max(values)) if values else None


def band_position(value: float, band: tuple[float, float]) -> str:
    """"above", "inside" or "below" the endpoints' band (its edges count as inside)."""
    lo, hi = band
    return "above" if value > hi else "below" if value < lo else "inside"


def _band_cell(row: Mapping, band: tuple[float, float] | None, metric: str = "test_acc") -> str:
    if band is None or row.get("kind") != "method" or row.get(metric) is None:
        return "–"
    where = band_position(row[metric], band)
    if where == "above":
        return f"above (+{100 * (row[metric] - band[1]):.2f} over the best)"
    if where == "below":
        return f"below ({100 * (row[metric] - band[0]):+.2f} under the worst)"
    return "inside"


def params_from_config(cfg: Config) -> dict[str, object]:
    """The params that decide what a run means, in the order a reader wants them."""
    arch = cfg.model.arch
    shape = f"hidden {cfg.model.hidden}" if arch == "mlp" else f"width ×{cfg.model.width}, {cfg.model.norm}"
    if arch == "custom":
        shape = f"factory {cfg.model.factory}, kwargs {cfg.model.kwargs}"
    models = len(cfg.train.checkpoints) if cfg.train.checkpoints else cfg.train.num_models
    source = "user checkpoints" if cfg.train.checkpoints else f"seeds {cfg.train.model_seeds()}"
    gates = f"on, {cfg.gates.granularity} granularity, λ = {cfg.gates.lam:g}" if cfg.gates.enabled else "off"
    return {
        "dataset": cfg.data.name,
        "architecture": f"{arch} ({shape})",
        "models merged (N)": f"{models} ({source})",
        "alignment": (
            f"{cfg.align.method} (cost {cfg.align.cost}, init {cfg.align.init}, max {cfg.align.max_iter} iterations)"
        ),
        "gates": gates,
        "repair method": cfg.repair.method,
    }


def _fmt(value, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "acc":
        return f"{100 * value:.2f}"
    if kind == "loss":
        return f"{value:.4f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _kind(column: str) -> str:
    return "acc" if column.endswith("acc") else "loss"


def _reference(rows: Sequence[Mapping]) -> Mapping | None:
    return next((r for r in rows if r.get("kind") == "reference"), None)


def _comparison(rows: Sequence[Mapping]) -> list[str]:
    ref = _reference(rows)
    band = endpoint_band(rows)
    columns = _columns(rows)
    header = ["method", *(label for _, label in columns), "Δ test acc vs endpoint mean (pp)", "vs endpoints' band (test)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 2) + "---|"]
    for row in rows:
        name = str(row["method"])
        if row.get("kind") == "reference":
            name = f"**{name}**"
        elif row.get("kind") == "endpoint":
            name = f"{name} (endpoint)"
        cells = [_fmt(row.get(col), _kind(col)) for col, _ in columns]
        delta = "–"
        if row.get("kind") == "method" and ref and ref.get("test_acc") is not None and row.get("test_acc") is not None:
            delta = f"{100 * (row['test_acc'] - ref['test_acc']):+.2f}"
        lines.append("| " + " | ".join([name, *cells, delta, _band_cell(row, band)]) + " |")
    return lines


def _band_summary(rows: Sequence[Mapping]) -> list[str]:
    """One line per side of the band: which methods lie above, inside and below it."""
    band = endpoint_band(rows)
    methods = [r for r in rows if r.get("kind") == "method" and r.get("test_acc") is not None]
    if band is None or not methods:
        return []
    groups: dict[str, list[str]] = {"above": [], "inside": [], "below": []}
    for r in methods:
        groups[band_position(r["test_acc"], band)].append(f"{r['method']} {_fmt(r['test_acc'], 'acc')}")
    lines = [f"Endpoints' band (test accuracy, worst to best endpoint): {_fmt(band[0], 'acc')}–{_fmt(band[1], 'acc')}%."]
    for where, names in groups.items():
        lines.append(f"- {where} the band: {'; '.join(names) if names else 'none'}")
    return lines


def _cycle(results: Mapping[str, Mapping]) -> list[str]:
    lines = [
        "| method | ‖A′−A‖/‖A‖ | cosine(A, A′) | units back in place (%) "
        "| min acc on A…A′ (%) | max loss on A…A′ | loss barrier |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        barrier = r.get("curve", {}).get("barrier")
        cells = [
            f"{r['distance']:.4f}",
            f"{r['cosine']:.4f}",
            f"{100 * r['fixed_fraction_mean']:.1f}",
            _fmt(r.get("path_min_acc"), "acc"),
            _fmt(r.get("path_max_loss"), "loss"),
            _fmt(barrier, "loss"),
        ]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


def render_summary(context: Mapping) -> str:
    """Markdown for ``reports/summary.md`` from the context dict described in the module docstring."""
    out = [f"# {context.get('title', 'cyclemerge run summary')}", ""]
    if params := context.get("params"):
        out += ["## Settings", ""] + [f"- **{k}**: {_fmt(v, 'other')}" for k, v in params.items()] + [""]
    rows = context.get("rows") or []
    if rows:
        out += [
            "## Comparison",
            "",
            "Accuracy in percent, loss = mean cross-entropy (nats); train metrics use the test-time transform.",
            "",
            *_comparison(rows),
            "",
        ]
        endpoints = [r for r in rows if r.get("kind") == "endpoint"]
        ref = _reference(rows)
        if endpoints and ref and ref.get("test_acc") is not None:
            listed = ", ".join(f"{r['method']} {_fmt(r.get('test_acc'), 'acc')}%" for r in endpoints)
            out += [f"Endpoints (test accuracy): {listed}; mean {_fmt(ref['test_acc'], 'acc')}%.", ""]
        if band_lines := _band_summary(rows):
            out += [*band_lines, ""]
    if alignment := context.get("alignment"):
        out += ["## Alignment", ""] + [f"- **{k}**: {_fmt(v, 'other')}" for k, v in alignment.items()] + [""]
    if cycle := context.get("cycle"):
        out += [
            "## Cycle consistency (A → B → C → A)",
            "",
            "A′ is model A carried around the cycle by the pairwise maps; cycle-consistent maps give A′ = A.",
            "",
            *_cycle(cycle),
            "",
        ]
    if figures := context.get("figures"):
        report_dir = context.get("report_dir", "reports")
        out += ["## Figures", ""]
        for caption, path in figures.items():
            link = os.path.relpath(path, report_dir).replace(os.sep, "/")
            out += [f"### {caption}", "", f"![{caption}]({link})", ""]
    if timings := context.get("timings"):
        out += ["## Timing", "", "| stage | seconds |", "|---|---:|"]
        out += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
        out += [f"| **total** | {sum(timings.values()):.1f} |", ""]
    if notes := context.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out).rstrip() + "\n"


def short_table(context: Mapping) -> str:
    """The comparison as a fixed-width text table for a terminal (accuracy in %, loss in nats)."""
    rows = context.get("rows") or []
    if not rows:
        return "(no results)\n"
    width = max(len("method"), *(len(str(r["method"])) for r in rows))
    columns = _columns(rows)
    heads = [col.replace("validation", "val").replace("_", " ") for col, _ in columns]
    lines = [f"{'method':<{width}}  " + "  ".join(f"{h:>10}" for h in heads)]
    lines.append("-" * len(lines[0]))
    for row in rows:
        cells = []
        for col, _ in columns:
            text = _fmt(row.get(col), _kind(col))
            cells.append(f"{text + '%' if _kind(col) == 'acc' and text != '–' else text:>10}")
        lines.append(f"{str(row['method']):<{width}}  " + "  ".join(cells))
    return "\n".join(lines) + "\n"
