"""Derived permutation specs for torchvision classification models (weights=None: no download).

    python benchmarks/spec_torchvision.py        # all models -> benchmarks/results/spec_torchvision.md
    python benchmarks/spec_torchvision.py --models resnet18,densenet121 --size 32 --out /tmp/spec.md

For each model: ``derive_spec`` on one random image batch (1x3xSxS; ViT needs 224), then its built-in
verification (every group randomly permuted at once on a float64 copy with randomized weights; the
relative change of the logits is reported). A model the rules cannot reason about is listed with the
refusal message. vit_b_16 is also derived with its attention modules opaque, as the message suggests.
The planted check (``--planted``, on by default) permutes 3 copies of resnet18 at random, adds 1e-4
relative noise, re-aligns them with C2M3 and reports how far the merged model's logits are from the
original's. Single-threaded by default (``--threads``) so that timings are comparable between machines.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cyclemerge import matching  # noqa: E402
from cyclemerge.config import AlignConfig  # noqa: E402
from cyclemerge.permutation import apply_perms  # noqa: E402
from cyclemerge.spec import SpecError, derive_spec  # noqa: E402

MODELS = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
          "densenet121", "convnext_tiny", "vit_b_16"]
FIXED_SIZE = {"vit_b_16": 224}


def opaque_for(name: str, model: torch.nn.Module) -> list[str]:
    if name == "vit_b_16":
        return [p for p, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    return []


def derive_row(name: str, size: int, opaque: bool) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    side = FIXED_SIZE.get(name, size)
    paths = opaque_for(name, model) if opaque else []
    label = name + (f" (opaque: {len(paths)} attention modules)" if paths else "")
    try:
        spec = derive_spec(model, torch.randn(1, 3, side, side), opaque_modules=paths)
    except SpecError as err:
        return {"model": label, "input": side, "refused": str(err)}
    return {"model": label, "input": side, "groups": len(spec.groups), "channels": sum(spec.groups.values()),
            "composite": len(spec.composite_keys), "stat_points": len(spec.stat_points),
            "parts": len(spec.layer_parts), "derive": spec.seconds["derive"], "verify": spec.seconds["verify"],
            "change": spec.max_relative_change, "notes": len(spec.notes)}


def planted_resnet18(size: int, noise: float = 1e-4) -> dict:
    """3 permuted noisy copies of resnet18 -> C2M3 -> average in the universe -> compare logits."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(8, 3, size, size)
    spec = derive_spec(model, x[:1], verify=False)
    sd = model.state_dict()
    g = torch.Generator().manual_seed(1)
    copies = []
    for _ in range(3):
        permuted = spec.apply(sd, {k: torch.randperm(n, generator=g) for k, n in spec.groups.items()})
        copies.append({k: v + noise * v.abs().mean() * torch.randn(v.shape, generator=g)
                       if torch.is_floating_point(v) else v for k, v in permuted.items()})
    t0 = time.perf_counter()
    viewed = [spec.view(c) for c in copies]
    result = matching.match(state_dicts=viewed, spec=spec.perm_spec, config=AlignConfig(device="cpu"))
    seconds = time.perf_counter() - t0
    universe = [spec.unview(apply_perms(v, spec.perm_spec, p)) for v, p in zip(viewed, result.perms)]
    merged = {k: torch.stack([u[k].double() for u in universe]).mean(0).to(v.dtype) if torch.is_floating_point(v)
              else v for k, v in sd.items()}
    work = copy.deepcopy(model)
    work.load_state_dict(merged)
    with torch.no_grad():
        base, out = model(x), work(x)
    return {"seconds": seconds, "iterations": result.report.iterations,
            "change": ((out - base).abs().max() / base.abs().max()).item()}


def table(rows: list[dict]) -> str:
    lines = ["| model | input | result | groups | permuted channels | block-structured tensors | stat points | "
             "layer parts | derive s | verify s | max rel. change |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            first = r["refused"].splitlines()
            reason = " ".join(first[:2]).replace("|", "\\|")
            lines.append(f"| {r['model']} | {r['input']} | refused: {reason} | | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['input']} | derived + verified | {r['groups']} | {r['channels']} | "
                     f"{r['composite']} | {r['stat_points']} | {r['parts']} | {r['derive']:.2f} | {r['verify']:.2f} "
                     f"| {r['change']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=64, help="image side for the CNNs (ViT always uses 224)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-planted", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "spec_torchvision.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows.append(derive_row(name, args.size, opaque=False))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if opaque_for(name, getattr(torchvision.models, name)(weights=None)):
            rows.append(derive_row(name, args.size, opaque=True))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = [f"# Derived permutation specs for torchvision models\n",
            f"{datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"{platform.processor() or platform.machine()}, {args.threads} thread(s); `python {' '.join(sys.argv)}`\n",
            "Input 1x3xSxS random; weights=None. *derive s*: trace + shape propagation + rules + build; *verify s*: "
            "the float64 random-permutation check; *max rel. change*: of the logits under it. *block-structured "
            "tensors*: state entries with a cat- or flatten-structured axis (matched through `DerivedSpec.view`).\n",
            table(rows), ""]
    refused = [r for r in rows if "refused" in r]
    for r in refused:
        text += [f"\n## Refusal message for {r['model']}\n", "```", r["refused"], "```"]
    if not args.no_planted:
        p = planted_resnet18(args.size)
        line = (f"Planted permutations, resnet18 at {args.size}px: 3 randomly permuted copies + 1e-4 relative noise, "
                f"re-aligned by C2M3 (default AlignConfig, CPU) in {p['seconds']:.1f} s / {p['iterations']} "
                f"iterations; merged logits vs original: max relative change {p['change']:.1e}.")
        print(line)
        text += ["", line]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(text) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
