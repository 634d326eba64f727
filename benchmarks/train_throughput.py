"""Training throughput of the seed models: samples per second of one optimisation step, fp32 or bf16.

One step is what ``cyclemerge.train.train_model`` does per batch: forward, cross-entropy, backward,
gradient-norm clipping, Adam step, and reading the loss back (a device sync). Inputs are synthetic
tensors of the dataset's shape, so no dataset is needed and nothing is read from disk. Each case is
measured ``--repeats`` times (a fresh model each time, the repeats taking turns with the other cases)
and the best repeat is kept, because on a shared machine the slow repeats measure the neighbours,
not the model.

    python benchmarks/train_throughput.py             # print the table
    python benchmarks/train_throughput.py --record    # and append it to benchmarks/RESULTS.md
    python benchmarks/train_throughput.py --precision fp32,bf16 --only ResNet20-x2   # train.precision side by side

``bf16`` is what ``train.precision: bf16`` does: bf16 autocast with channels-last images.

``loop_throughput`` (used by benchmarks/speed.py) compares the project's own loop,
``cyclemerge.train.train_model``, with a plain PyTorch loop on the same model, batch and data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from cyclemerge.config import ModelConfig, TrainConfig
from cyclemerge.data import DataBundle
from cyclemerge.models import build_model
from cyclemerge.train import model_for, train_model

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NUM_CLASSES = 10
EPOCH_SAMPLES = 60_000  # an MNIST-sized training split, to turn samples/s into time per epoch

# (architecture, width, channels, image size, what it stands for)
CASES = [
    ("mlp", 1, 1, 28, "MLP 784-512-512-512-256-10"),
    ("resnet20", 1, 1, 28, "ResNet20-x1 (LayerNorm)"),
    ("resnet20", 1, 3, 32, "ResNet20-x1 (LayerNorm)"),
    ("resnet20", 2, 1, 28, "ResNet20-x2 (LayerNorm)"),
]


@dataclass
class Measurement:
    label: str
    shape: str
    device: str
    precision: str
    params: int
    steps: int
    seconds_per_step: float

    def samples_per_second(self, batch_size: int) -> float:
        return batch_size / self.seconds_per_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(arch: str, width: int, in_channels: int, image_size: int, device: torch.device, *,
                  precision: str, batch_size: int, warmup: int, min_steps: int, min_seconds: float,
                  seed: int) -> tuple[int, int, float]:
    """(parameter count, steps timed, seconds per step) of training one fresh model on random data."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch=arch, width=width), in_channels=in_channels, image_size=image_size,
                        num_classes=NUM_CLASSES).to(device).train()
    bf16 = precision == "bf16"  # as cyclemerge.train.train_model does it
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    defaults = TrainConfig()
    opt = torch.optim.Adam(params, lr=defaults.lr)
    x = torch.randn(batch_size, in_channels, image_size, image_size, device=device)
    if bf16:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if defaults.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, defaults.grad_clip)
        opt.step()
        return loss.item()

    for _ in range(warmup):
        step()
    sync(device)
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < min_seconds:
        step()
        steps += 1
    sync(device)
    return sum(p.numel() for p in params), steps, (time.perf_counter() - start) / steps


def plain_loop_seconds(model_cfg: ModelConfig, train_cfg: TrainConfig, data: DataBundle, seed: int) -> float:
    """Seconds of one epoch of the same recipe written as the plain loop anyone would: shuffle, index,
    forward, cross-entropy, backward, the recipe's grad-norm clip, Adam (or SGD) step. The floor the
    project's loop is judged against: nothing of it can be skipped, and nothing else is done."""
    torch.manual_seed(seed)
    model = model_for(model_cfg, data).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if train_cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum, weight_decay=train_cfg.weight_decay)
    x, y = data.train_set()
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    order = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), train_cfg.batch_size):
        idx = order[i:i + train_cfg.batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
        opt.step()
    loss.item()
    return time.perf_counter() - start


def loop_throughput(model_cfg: ModelConfig, train_cfg: TrainConfig, data: DataBundle, *, samples: int,
                    repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Samples/s of ``train_model`` and of ``plain_loop_seconds`` on the first ``samples`` training
    samples, one epoch each, same model, batch, optimizer and data; the best of ``repeats``, the two
    loops taking turns so that a burst of load from elsewhere hits one repeat of both."""
    data = replace(data, train_idx=data.train_idx[:samples])
    n = len(data.train_idx)
    cfg = train_cfg.model_copy(update={"epochs": 1, "device": "cpu"})
    best = {"project": 0.0, "plain": 0.0}
    for repeat in range(repeats):
        best["plain"] = max(best["plain"], n / plain_loop_seconds(model_cfg, cfg, data, seed + repeat))
        best["project"] = max(best["project"], n / train_model(model_cfg, cfg, data, seed + repeat).seconds)
    return {"samples": n, **best, "ratio": best["project"] / best["plain"]}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(devices: list[torch.device]) -> list[tuple[str, str]]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [("CPU", f"{cpu_model()}; {usable} of {os.cpu_count()} logical cores usable"),
             ("torch", f"{torch.__version__}, {torch.get_num_threads()} intra-op threads"),
             ("Python / OS", f"{platform.python_version()} / {platform.platform(terse=True)}")]
    for device in devices:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            lines.append(("GPU", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"))
    return lines


def load(avg: tuple[float, ...]) -> str:
    return "/".join(f"{v:.2f}" for v in avg)


def markdown(results: list[Measurement], machine: list[tuple[str, str]], args: argparse.Namespace,
             load_before: tuple[float, ...], load_after: tuple[float, ...], when: dt.datetime) -> str:
    out = [
        "## Training throughput",
        "",
        f"Recorded {when:%Y-%m-%d %H:%M} UTC by `benchmarks/train_throughput.py`: training steps "
        f"(forward, cross-entropy, backward, grad-norm clip, Adam) at batch size {args.batch_size} on synthetic "
        f"tensors; {args.warmup} warm-up steps, then at least {args.min_steps} steps and {args.min_seconds:g} s "
        f"timed; best of {args.repeats} repeats.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine),
        f"| load average (1/5/15 min) | {load(load_before)} before, {load(load_after)} after |",
        "",
        f"| model | input | device | precision | params | steps timed | ms/step | samples/s | s per {EPOCH_SAMPLES // 1000}k-sample epoch |",
        "|---|---|---|---|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        rate = r.samples_per_second(args.batch_size)
        out.append(f"| {r.label} | {r.shape} | {r.device} | {r.precision} | {r.params:,} | {r.steps} | "
                   f"{1000 * r.seconds_per_step:.1f} | {rate:,.0f} | {EPOCH_SAMPLES / rate:.1f} |")
    return "\n".join(out) + "\n"


def pick_devices(names: str) -> list[torch.device]:
    devices = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in ("cpu", "cuda"):
            raise SystemExit(f"--devices: unknown device {name!r}; use cpu, cuda or cpu,cuda")
        if name == "cuda" and not torch.cuda.is_available():
            print("no CUDA device visible: measuring the CPU only", file=sys.stderr)
            continue
        devices.append(torch.device(name))
    if not devices:
        raise SystemExit("--devices: nothing to measure")
    return devices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when absent")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, caches)")
    parser.add_argument("--min-steps", type=int, default=5, help="timed steps at least")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="timed seconds at least")
    parser.add_argument("--repeats", type=int, default=2, help="measure each case this often, keep the best")
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16 (train.precision)")
    parser.add_argument("--only", default=None, help="measure only the models whose label contains this")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--record", action="store_true", help=f"append the table to {RESULTS}")
    args = parser.parse_args()
    if min(args.batch_size, args.min_steps, args.repeats) < 1 or args.warmup < 0:
        raise SystemExit("--batch-size, --min-steps and --repeats must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = pick_devices(args.devices)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise SystemExit(f"--precision: use fp32, bf16 or fp32,bf16, got {args.precision!r}")
    cases = [c for c in CASES if args.only is None or args.only in c[-1]]
    if not cases:
        raise SystemExit(f"--only {args.only!r} matches no model; models: {', '.join(c[-1] for c in CASES)}")
    when = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()
    best: dict[tuple, Measurement] = {}
    # Repeats go round all cases in turn, so a burst of load from other processes hits one repeat
    # of several cases rather than every repeat of one case.
    for repeat in range(args.repeats):
        for device, precision, (arch, width, channels, size, label) in (
                (d, p, c) for d in devices for c in cases for p in precisions):
            params, steps, per_step = time_training(
                arch, width, channels, size, device, precision=precision, batch_size=args.batch_size,
                warmup=args.warmup, min_steps=args.min_steps, min_seconds=args.min_seconds, seed=repeat)
            m = Measurement(label, f"{channels}x{size}x{size}", device.type, precision, params, steps, per_step)
            print(f"  repeat {repeat + 1}/{args.repeats}: {label} {m.shape} on {device.type}, {precision}: "
                  f"{m.samples_per_second(args.batch_size):,.0f} samples/s", file=sys.stderr)
            key = (label, m.shape, device.type, precision)
            if key not in best or per_step < best[key].seconds_per_step:
                best[key] = m
    results = list(best.values())
    table = markdown(results, machine_lines(devices), args, load_before, os.getloadavg(), when)
    print(table)
    if args.record:
        # One append of the whole section, so teammates appending their own sections cannot interleave.
        header = "" if RESULTS.exists() else "# Benchmark results\n\nEach section is appended by the script it names.\n"
        with RESULTS.open("a") as f:
            f.write(f"{header}\n{table}")
        print(f"appended to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
