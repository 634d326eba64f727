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
    train_acc, train_loss`` (accuracies as fractions, losses in nats, None when not evaluated);
    kind is "endpoint", "reference" (the endpoints' mean) or "method".
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
    ("train_acc", "train acc (%)"),
    ("train_loss", "train loss"),
)


def params_from_config(cfg: Config) -> dict[str, object]:
    """The params that decide what a run means, in the order a reader wants them."""
    arch = cfg.model.arch
    shape = f"hidden {cfg.model.hidden}" if arch == "mlp" else f"width ×{cfg.model.width}, {cfg.model.norm}"
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
    header = ["method", *(label for _, label in _COLUMNS), "Δ test acc vs endpoint mean (pp)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        name = str(row["method"])
        if row.get("kind") == "reference":
            name = f"**{name}**"
        elif row.get("kind") == "endpoint":
            name = f"{name} (endpoint)"
        cells = [_fmt(row.get(col), _kind(col)) for col, _ in _COLUMNS]
        delta = "–"
        if row.get("kind") == "method" and ref and ref.get("test_acc") is not None and row.get("test_acc") is not None:
            delta = f"{100 * (row['test_acc'] - ref['test_acc']):+.2f}"
        lines.append("| " + " | ".join([name, *cells, delta]) + " |")
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
    heads = ("test acc", "test loss", "train acc", "train loss")
    lines = [f"{'method':<{width}}  " + "  ".join(f"{h:>10}" for h in heads)]
    lines.append("-" * len(lines[0]))
    for row in rows:
        cells = []
        for col, _ in _COLUMNS:
            text = _fmt(row.get(col), _kind(col))
            cells.append(f"{text + '%' if _kind(col) == 'acc' and text != '–' else text:>10}")
        lines.append(f"{str(row['method']):<{width}}  " + "  ".join(cells))
    return "\n".join(lines) + "\n"
