"""Is the poor C2M3 + REPAIR of short-trained ResNet20-x2 (LayerNorm) the recipe or the implementation?

    python benchmarks/resnet_repair_check.py                 # results/resnet_repair_check.md
    python benchmarks/resnet_repair_check.py --images 2000 --models 3 --epochs 1   # quicker
    python benchmarks/resnet_repair_check.py --checkpoints .cache/grid/models/fashion_mnist-resnet20/KEY/seed*.pt

With ``--checkpoints`` the seed models are read (weights only) from those files, e.g. the ``resnet_cpu``
grid's model cache, instead of trained here; ``--recipe`` then says in the report how they were trained.

Two checks on ResNet20-x2 (LayerNorm) seed models trained here on a slice of Fashion-MNIST:

1. Permuted copies. Model 1 and N-1 copies of it under random permutations of every group are one
   network written N ways: C2M3 must undo the permutations (merged weights = model 1, cycle error 0)
   and REPAIR must leave it as it is (its goal statistics are the model's own). Any loss here is the
   implementation's.
2. Independent seeds. For N models trained from different seeds: the merged network's statistics
   before REPAIR (the variance collapse REPAIR exists to undo: std / goal std per stat point) and
   after it (the largest |mean - goal| / goal std and |std / goal std - 1| over all points and
   channels). Statistics met to rounding error while accuracy stays low means REPAIR does what the
   method says, and the loss is the models' (their barrier after alignment), not REPAIR's.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cyclemerge.activations import channel_stats, permute_stats  # noqa: E402
from cyclemerge.api import align  # noqa: E402
from cyclemerge.averaging import average  # noqa: E402
from cyclemerge.config import load_config  # noqa: E402
from cyclemerge.data import load_data  # noqa: E402
from cyclemerge.evaluate import accuracy_and_loss, load_into  # noqa: E402
from cyclemerge.permutation import apply_perms, random_perms  # noqa: E402
from cyclemerge.repair import apply_repair, goal_statistics  # noqa: E402
from cyclemerge.train import import_checkpoints, model_for, train_model  # noqa: E402
from speed import stat_error  # noqa: E402


def collapse(model, merged, goal, x, batch_size: int) -> tuple[float, float]:
    """Median and minimum over stat points of the merged network's mean channel std / goal std."""
    got = channel_stats(load_into(model, merged).eval(), x, batch_size=batch_size)
    ratios = []
    for p, g in goal.items():
        live = g.var > 1e-10
        ratios.append((got[p].std[live] / g.std[live]).mean().item())
    ratios.sort()
    return ratios[len(ratios) // 2], ratios[0]


def acc(model, sd, data) -> float:
    return accuracy_and_loss(load_into(model, sd), data.test_x, data.test_y, batch_size=1000)["acc"]


def merge_report(model, cfg, sds, x, data, batch: int) -> dict:
    stats = [channel_stats(load_into(model, sd).eval(), x, batch_size=batch) for sd in sds]
    alignment = align(sds, model, cfg)
    points = model.stat_points()
    goal_in = [permute_stats(stats[i], p, points) for i, p in zip(alignment.indices, alignment.perms)]
    goal = goal_statistics(goal_in)
    merged = average(alignment.universe)
    repaired = apply_repair("repair", model, merged, x, batch_size=batch, endpoint_stats=goal_in)
    median, worst = collapse(model, merged, goal, x, batch)
    return {"endpoints": [acc(model, sd, data) for sd in sds], "merged": acc(model, merged, data),
            "repaired": acc(model, repaired, data), "collapse_median": median, "collapse_min": worst,
            "error_after": stat_error(model, repaired, goal, x, batch), "objective": alignment.objective,
            "cycle_error": alignment.cycle_error, "merged_sd": merged, "points": len(goal)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000, help="training images per model")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--checkpoints", nargs="+", default=None, help="seed model files to read instead of training")
    ap.add_argument("--recipe", default=None, help="how the --checkpoints models were trained (for the report)")
    ap.add_argument("--calib", type=int, default=1000, help="calibration images for statistics and REPAIR")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "resnet_repair_check.md"))
    args = ap.parse_args(argv)
    cfg = load_config(REPO / "params.yaml", overrides=[
        "model.arch=resnet20", "model.width=2", "model.norm=layernorm", f"train.epochs={args.epochs}",
        f"data.train_subset={args.images}", f"align.max_iter=100"])
    data = load_data(cfg.data, project_dir=REPO)
    x = data.calibration_set()[0][:args.calib]
    batch = min(500, len(x))
    load, started = os.getloadavg(), time.perf_counter()
    if args.checkpoints:
        sds = import_checkpoints(args.checkpoints, cfg.model, data)
        args.models = len(sds)
        made = f"{len(sds)} seed models read from {', '.join(Path(p).name for p in args.checkpoints)} ({args.recipe or 'recipe not given'})"
    else:
        torch.set_num_threads(1)  # seeds side by side, one core each
        with ThreadPoolExecutor(max_workers=2) as pool:
            sds = list(pool.map(lambda s: train_model(cfg.model, cfg.train, data, seed=s).state_dict,
                                range(1, args.models + 1)))
        torch.set_num_threads(os.cpu_count() or 1)
        made = (f"{args.models} seed models, {args.epochs} epochs on {args.images} Fashion-MNIST training images each "
                f"(trained here in {time.perf_counter() - started:.0f} s, two side by side)")
    model = model_for(cfg.model, data)

    gen = torch.Generator().manual_seed(0)
    copies = [sds[0]] + [apply_perms(sds[0], model.perm_spec(), random_perms(model.perm_spec(), sds[0], gen))
                         for _ in range(args.models - 1)]
    same = merge_report(model, cfg, copies, x, data, batch)
    drift = max((same["merged_sd"][k].float() - sds[0][k].float()).abs().max().item() for k in sds[0])
    indep = merge_report(model, cfg, sds, x, data, batch)

    def line(name, r):
        ends = " / ".join(f"{100 * a:.2f}" for a in r["endpoints"])
        return (f"| {name} | {ends} | {100 * r['merged']:.2f} | {100 * r['repaired']:.2f} | "
                f"{r['collapse_median']:.3f} ({r['collapse_min']:.3f}) | {r['error_after']:.1e} | {r['cycle_error']:.0e} |")

    md = "\n".join([
        "# ResNet20-x2 (LayerNorm): REPAIR against its goal statistics", "",
        f"{made}; statistics and REPAIR on {len(x)} calibration "
        f"images, {same['points']} stat points; C2M3 with params.yaml's settings (max_iter 100). Load average "
        f"{load[0]:.2f} at the start. Test accuracy (%):", "",
        "| models | endpoints | C2M3 merge | + REPAIR | std / goal std before REPAIR, median (min) over points | "
        "statistics error after REPAIR | cycle error |", "|---|---|--:|--:|--:|--:|--:|",
        line("model 1 and permuted copies", same), line("independent seeds", indep), "",
        f"Permuted copies: the C2M3 merge differs from model 1 by at most {drift:.1e} in any weight.", ""])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
