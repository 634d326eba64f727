"""Minibatches and augmentation on in-memory tensors: no DataLoader, no per-sample PIL decode."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
                    generator: torch.Generator | None = None,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x[b], y[b])`` over one pass; shuffled by one ``randperm`` from ``generator``.

    Without shuffling the batches are views (no copy). The permutation is drawn on the generator's
    device and moved to the data's, so a CPU generator drives CUDA tensors reproducibly.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    n = len(x)
    stop = n - n % batch_size if drop_last else n
    order = None
    if shuffle:
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=device).to(x.device)
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, *, padding: int = 4) -> torch.Tensor:
    """CIFAR-style augmentation of a batch [B, C, H, W]: random crop after ``padding`` pixels of zero
    padding on every side, then a horizontal flip with probability 1/2, each drawn per sample.

    The data is already normalized, so zero padding fills with the dataset's mean colour rather than
    black; the crop keeps the image size.
    """
    b, _, h, w = x.shape
    device = generator.device if generator is not None else torch.device("cpu")
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device).to(x.device)
    flip = (torch.rand(b, generator=generator, device=device) < 0.5).to(x.device)

    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding)).permute(0, 2, 3, 1)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = ox[:, None] + torch.arange(w, device=x.device)  # [B, W]
    # a flipped sample reads its crop's columns right to left
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
