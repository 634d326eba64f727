"""Speed and objective of the alignment methods on RANDOMLY INITIALIZED models (no training, no data).

    python benchmarks/align.py                                   # the full grid, every device present
    python benchmarks/align.py --archs mlp,resnet20-x2 --models 2,3,5 --out benchmarks/results/align.md
    python benchmarks/align.py --trained artifacts/models --models 5 --out benchmarks/results/align_trained.md

Grid: method x number of models N x architecture (MLP 784-512-512-512-256-10 on 1x28x28; ResNet20
x2 / x4 and VGG16 on 3x32x32, LayerNorm), on CPU and on CUDA when available. Each cell aligns N
models built from seeds 0..N-1 with the default ``AlignConfig`` (C2M3: barycenter start anchored at
model 0) and reports wall seconds, CPU seconds, iterations and the final N-model objective
sum_{a<b} <U_a, U_b>. Random-init weights have no shared structure to find, so iteration counts
(and hence times) are typically HIGHER than for trained models; objectives are comparable only
within a row group (same architecture and N). ``pairwise`` matches every pair (N(N-1)/2 matchings, kept
for the cycle-error metric), not only the N-1 its merge uses. Only torch and scipy are needed.
With ``--trained DIR`` the models are the pipeline checkpoints ``DIR/model_*.pt`` (first N of them),
built from the architecture stored in each checkpoint.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cyclemerge import matching  # noqa: E402
from cyclemerge.config import AlignConfig, ModelConfig  # noqa: E402
from cyclemerge.models import build_model  # noqa: E402

ARCHS = {
    "mlp": (ModelConfig(arch="mlp"), 1, 28),
    "resnet20-x2": (ModelConfig(arch="resnet20", width=2), 3, 32),
    "resnet20-x4": (ModelConfig(arch="resnet20", width=4), 3, 32),
    "vgg16": (ModelConfig(arch="vgg16"), 3, 32),
}


def random_models(arch: str, n_models: int) -> tuple[list[dict], dict]:
    cfg, channels, size = ARCHS[arch]
    sds = []
    for seed in range(n_models):
        torch.manual_seed(seed)
        model = build_model(cfg, in_channels=channels, image_size=size, num_classes=10)
        sds.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return sds, model.perm_spec()


def trained_models(folder: Path, n_models: int) -> tuple[list[dict], dict]:
    files = sorted(folder.glob("model_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[:n_models]
    if len(files) < n_models:
        raise SystemExit(f"--trained {folder}: {len(files)} checkpoint(s) model_*.pt, {n_models} asked for")
    ckpts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    data = ckpts[0]["data"]
    model = build_model(ModelConfig(**ckpts[0]["model"]), in_channels=data["in_channels"],
                        image_size=data["image_size"], num_classes=data["num_classes"])
    return [c["state_dict"] for c in ckpts], model.perm_spec()


def run_cell(arch: str, n_models: int, method: str, device: str, trained: Path | None = None) -> dict:
    sds, spec = trained_models(trained, n_models) if trained else random_models(arch, n_models)
    config = AlignConfig(method=method, device=device)
    if device == "cuda":
        sds = [{k: v.cuda() for k, v in sd.items()} for sd in sds]
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = matching.match(state_dicts=sds, spec=spec, config=config)
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "arch": arch, "N": n_models, "method": method, "device": device, "seconds": wall, "cpu_seconds": cpu,
        "iterations": result.report.iterations, "objective": matching.objective(sds, spec, result.perms),
        "stop": result.report.extra.get("stop_reason", ""),
    }


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cuda = f", CUDA: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no CUDA"
    return (f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} logical CPUs, "
            f"torch {torch.__version__} with {torch.get_num_threads()} intra-op threads{cuda}; "
            f"load average at start {load[0]:.1f}")


def table(rows: list[dict]) -> str:
    lines = ["| arch | N | method | device | seconds | CPU s | iterations | objective | stop |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['N']} | {r['method']} | {r['device']} | {r['seconds']:.2f} | "
                     f"{r['cpu_seconds']:.2f} | {r['iterations']} | {r['objective']:.6g} | {r['stop']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"comma list of {', '.join(ARCHS)}")
    parser.add_argument("--models", default="2,3,5,10", help="comma list of N")
    parser.add_argument("--methods", default="c2m3,merge_many,pairwise", help="comma list of alignment methods")
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip", default="", help="comma list of arch:N cells to leave out, e.g. vgg16:10")
    parser.add_argument("--trained", type=Path, default=None,
                        help="folder of trained checkpoints model_*.pt (replaces --archs)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/align.md"))
    args = parser.parse_args()
    if args.trained:
        args.archs = f"trained:{args.trained}"
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = {tuple(s.split(":")) for s in args.skip.split(",") if s}
    header = (f"# Alignment benchmark ({datetime.now():%Y-%m-%d %H:%M})\n\n"
              + (f"Models are TRAINED checkpoints from {args.trained}. " if args.trained else
                 "Models are RANDOMLY INITIALIZED (seeds 0..N-1), not trained. ")
              + f"Machine: {machine()}.\n"
              f"Command: `python benchmarks/align.py {' '.join(sys.argv[1:])}`\n\n")
    rows: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for arch in args.archs.split(","):
        for n_models in (int(n) for n in args.models.split(",")):
            if (arch, str(n_models)) in skip:
                continue
            for method in args.methods.split(","):
                for device in args.devices.split(","):
                    row = run_cell(arch, n_models, method, device, args.trained)
                    rows.append(row)
                    print(f"{arch:12s} N={n_models:<2d} {method:10s} {device:4s} {row['seconds']:8.2f}s "
                          f"{row['iterations']:4d} it  objective {row['objective']:.6g}", flush=True)
                    # Rewritten after every cell, so a long run leaves a usable partial table.
                    args.out.write_text(header + table(rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
