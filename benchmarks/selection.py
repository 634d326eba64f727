"""Apply the selection rule of benchmarks/grids/selection.yaml to its grid's rows (issue 16, item 3).

    python benchmarks/selection.py            # results/selection.md: validation table, choice, test table
    python benchmarks/selection.py --csv benchmarks/results/selection_a/grid_selection.csv --csv ...

The rule (written in the grid file before the grid ran) is implemented here as it is written: the
score of a point is the mean over the six (seed set, width) cells of the final merged model's
VALIDATION accuracy; REPAIR on/off is decided first on the `baseline` point; then one winner per
dimension, where options within 0.10 points of the best are tied and a tie goes to the simpler
option (or to today's default where options are equally simple); the `winners` point, when it has
run, is taken if its score is >= the best stage-1 point's. Test accuracy is only reported, for the
chosen defaults beside today's, after the choice is made.

Also written: per cell, the objective of C2M3 without polish (`baseline`) and with it (`polish`)
beside MergeMany's (the `polish` point's merge_many baseline), and the accuracy of each.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cyclemerge.grid import read_csv  # noqa: E402

TIE = 0.10  # points of mean validation accuracy
# Dimension -> options from the simplest (or, where equally simple, None and today's default first).
DIMENSIONS = {
    "init": (None, ["baseline", "init-identity", "init-sinkhorn"]),
    "restarts": ("ranked", ["baseline", "restarts3-objective", "restarts3-validation", "restarts5-objective",
                            "restarts5-validation"]),
    "cost": ("ranked", ["baseline", "cost-activations"]),
    "polish": ("ranked", ["baseline", "polish"]),
    "gate granularity": ("ranked", ["baseline", "gates-channel"]),
    "gate lambda": (None, ["baseline", "lam-0.001", "lam-0.1"]),
}
SETTINGS = {"baseline": {}, "init-identity": {"align.init": "identity"}, "init-sinkhorn": {"align.init": "sinkhorn"},
            "restarts3-objective": {"align.restarts": 3, "align.select_by": "objective"},
            "restarts5-objective": {"align.restarts": 5, "align.select_by": "objective"},
            "restarts3-validation": {"align.restarts": 3, "align.select_by": "calibration_loss"},
            "restarts5-validation": {"align.restarts": 5, "align.select_by": "calibration_loss"},
            "cost-activations": {"align.cost": "activations", "activations.correlations": True},
            "polish": {"align.polish": True}, "gates-channel": {"gates.granularity": "channel"},
            "lam-0.001": {"gates.lam": 0.001}, "lam-0.1": {"gates.lam": 0.1}}


def split(point_id: str) -> tuple[str, str]:
    name, cell = point_id.split("__", 1)
    return name, cell


def cell_label(cell: str) -> str:
    seeds, hidden, _ = cell.split("__")
    s = seeds.split("=")[1].split("-")
    return f"seeds {s[0]}-{s[-1]}, {'default' if hidden.endswith('512-512-512-256') else 'narrow'}"


def table(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """(point name, cell) -> method -> row."""
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        out.setdefault(split(r["point"]), {})[r["method"]] = r
    return out


def scores(by: dict, method: str, metric: str) -> dict[str, dict[str, float]]:
    """point name -> cell -> metric of ``method``."""
    out: dict[str, dict[str, float]] = {}
    for (name, cell), methods in by.items():
        if method in methods and methods[method][metric] is not None:
            out.setdefault(name, {})[cell] = float(methods[method][metric])
    return out


def mean_of(cells: dict[str, float], all_cells: list[str]) -> float | None:
    return 100 * statistics.fmean(cells[c] for c in all_cells) if all(c in cells for c in all_cells) else None


def choose(dimension: str, options: list[str], score: dict[str, float | None]) -> tuple[str, str]:
    kind, ranked = DIMENSIONS[dimension]
    ran = [o for o in options if score.get(o) is not None]
    if len(ran) < len(options):
        return "baseline", f"not every option has run on every cell ({', '.join(set(options) - set(ran))} missing)"
    best = max(ran, key=lambda o: score[o])
    tied = [o for o in ran if score[best] - score[o] < TIE]
    if kind == "ranked":
        pick = tied[0]  # options are listed simplest first
    else:
        pick = "baseline" if "baseline" in tied else best
    why = f"best {best} {score[best]:.2f}; tied within {TIE}: {', '.join(tied)}"
    return pick, why


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", action="append", default=[], help="grid CSVs (default: every selection grid CSV)")
    ap.add_argument("--points", default=str(REPO / ".cache" / "grid" / "selection"), help="the grid's point folders")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "selection"))
    args = ap.parse_args(argv)
    files = args.csv or sorted(glob.glob(str(REPO / "benchmarks" / "results" / "selection_*" / "grid_selection.csv")))
    rows = [r for f in files for r in read_csv(Path(f)) if r["grid"] == "selection"]
    by = table(rows)
    cells = sorted({cell for _, cell in by}, key=lambda c: ("512-512-512-256" not in c, int(c.split("=")[1].split("-")[0])))
    lines = ["# Selection of the merge defaults (benchmarks/grids/selection.yaml)", "",
             f"Rows from {', '.join(str(Path(f).relative_to(REPO)) for f in files)}. Cells: "
             + "; ".join(cell_label(c) for c in cells) + ".", ""]

    # Rule 2: REPAIR on/off on the baseline point.
    val_on = mean_of(scores(by, "c2m3_gates+repair", "validation_acc").get("baseline", {}), cells)
    val_off = mean_of(scores(by, "c2m3_gates", "validation_acc").get("baseline", {}), cells)
    repair_on = val_on is not None and val_off is not None and not (val_on - val_off < TIE)
    final = "c2m3_gates+repair" if repair_on else "c2m3_gates"
    lines += [f"Rule 2, REPAIR on the `baseline` point: C2M3 + gates + REPAIR {val_on:.2f} vs C2M3 + gates "
              f"{val_off:.2f} mean validation accuracy -> REPAIR {'on' if repair_on else 'off'}; every point is "
              f"scored on `{final}`.", ""]

    val = scores(by, final, "validation_acc")
    point_score = {name: mean_of(c, cells) for name, c in val.items()}
    lines += ["## Validation accuracy (%) of the final merged model, per point and cell", "",
              "| point | " + " | ".join(cell_label(c) for c in cells) + " | mean |",
              "|---|" + "--:|" * (len(cells) + 1)]
    names = [n for n in dict.fromkeys(["baseline", *SETTINGS, "winners"]) if n in val]
    for name in names:
        cs = val[name]
        mean = point_score[name]
        lines.append(f"| {name} | " + " | ".join(f"{100 * cs[c]:.2f}" if c in cs else "-" for c in cells)
                     + (f" | {mean:.2f} |" if mean is not None else " | (incomplete) |"))
    lines.append("")

    winners, settings = {}, {}
    lines += ["## Winners per dimension (rule 3)", "", "| dimension | winner | why |", "|---|---|---|"]
    for dim, (_, options) in DIMENSIONS.items():
        pick, why = choose(dim, options, point_score)
        winners[dim] = pick
        settings.update(SETTINGS[pick])
        lines.append(f"| {dim} | {pick} | {why} |")
    changed = {d: w for d, w in winners.items() if w != "baseline"}
    stage1 = {n: s for n, s in point_score.items() if n != "winners" and s is not None}
    best1 = max(stage1, key=lambda n: stage1[n])
    lines += ["", f"Changed dimensions: {', '.join(f'{d} -> {w}' for d, w in changed.items()) or 'none'}; "
              f"stage-2 `winners` settings: {json.dumps(settings) if settings else '(none: today defaults stay)'}.",
              f"Best stage-1 point: {best1} ({stage1[best1]:.2f})."]
    chosen = "baseline"
    if len(changed) > 1:
        w = point_score.get("winners")
        if w is None:
            lines.append("Stage 2 has not run yet: append the `winners` point with the settings above and run it.")
            chosen = None
        else:
            chosen = "winners" if w >= stage1[best1] else best1
            lines.append(f"`winners` scored {w:.2f} -> chosen: {chosen}.")
    elif len(changed) == 1:
        chosen = next(iter(changed.values()))
        lines.append(f"One dimension changed: chosen {chosen} (no combination to run).")
    else:
        lines.append("No dimension changed: today's defaults stay.")
    chosen_settings = {} if chosen in (None, "baseline") else settings if chosen == "winners" else SETTINGS[chosen]
    if not repair_on:
        chosen_settings = {**chosen_settings, "repair.method": "none"}
    lines += ["", f"**Chosen: {chosen}** -> params: {json.dumps(chosen_settings) if chosen_settings else 'unchanged'}",
              ""]

    # Test accuracy, read only now: chosen beside today's.
    test = scores(by, final, "test_acc")
    ends = scores(by, "endpoint mean", "test_acc")
    lines += ["## Test accuracy (%) of the chosen defaults beside today's (read after the choice)", "",
              "| point | " + " | ".join(cell_label(c) for c in cells) + " | default width mean ± std | narrow mean ± std |",
              "|---|" + "--:|" * (len(cells) + 2)]

    def mean_std(cs: dict[str, float], which: str) -> str:
        vals = [100 * cs[c] for c in cells if c in cs and (("512-512-512-256" in c) == (which == "default"))]
        if len(vals) < 2:
            return "-"
        return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f} (spread {max(vals) - min(vals):.2f})"

    shown = ["endpoint mean", "baseline"] + ([chosen] if chosen not in (None, "baseline") else [])
    for name in shown:
        cs = ends.get("baseline", {}) if name == "endpoint mean" else test.get(name, {})
        label = "endpoints (mean of 5)" if name == "endpoint mean" else name
        lines.append(f"| {label} | " + " | ".join(f"{100 * cs[c]:.2f}" if c in cs else "-" for c in cells)
                     + f" | {mean_std(cs, 'default')} | {mean_std(cs, 'narrow')} |")
    lines.append("")

    # Objectives: C2M3 without / with polish beside MergeMany, per cell, with accuracies.
    folder = Path(args.points)
    lines += ["## C2M3 objective without / with polish beside MergeMany's (uniform merges, test accuracy %)", "",
              "| cell | C2M3 objective | + polish | MergeMany | C2M3 acc | polished acc | MergeMany acc | "
              "C2M3 + REPAIR | polished + REPAIR | MergeMany + REPAIR | best endpoint |",
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for c in cells:
        base, pol = by.get(("baseline", c), {}), by.get(("polish", c), {})
        ev_file = folder / f"polish__{c}" / "metrics" / "evaluate.json"
        if not base or not pol or not ev_file.exists():
            lines.append(f"| {cell_label(c)} | (not run) |")
            continue
        ev = json.loads(ev_file.read_text())
        mm = ev["baselines"].get("merge_many", {})
        methods = ev["methods"]
        mm_row = methods.get("MergeMany", {})
        mm_rep = methods.get("MergeMany + repair", {})
        best_end = max(v["test_acc"] for k, v in methods.items() if k.startswith("model "))

        def pct(r):
            return f"{100 * r['test_acc']:.2f}" if r and r.get("test_acc") is not None else "-"

        lines.append(f"| {cell_label(c)} | {float(base['c2m3']['objective']):.1f} | {float(pol['c2m3']['objective']):.1f} | "
                     f"{mm.get('objective', float('nan')):.1f} | {pct(base['c2m3'])} | {pct(pol['c2m3'])} | "
                     f"{pct(mm_row)} | {pct(base['c2m3+repair'])} | {pct(pol['c2m3+repair'])} | {pct(mm_rep)} | "
                     f"{100 * best_end:.2f} |")
    lines.append("")
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"repair_on": repair_on, "scores": point_score, "winners": winners,
                                                    "chosen": chosen, "chosen_settings": chosen_settings}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
