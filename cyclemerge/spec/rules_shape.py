"""Rules for ops that move axes around: reshape, permute/transpose, expand/repeat, pad.

A reshape is read off the input and output shapes alone (the arguments may be computed from sizes at
run time): axes are grouped into chunks of equal size products; in a chunk, at most one input axis
may carry permuted channels. Flattening ``[C, H, W]`` then gives that axis an ``inner`` of ``H * W``
(each channel owns H*W consecutive features of the Linear that follows), and unflattening recovers
the channel axis when the block structure allows it.
"""

from __future__ import annotations

import math

from cyclemerge.spec.axes import Layout, TensorAxes, expand, repeat, trivial
from cyclemerge.spec.site import Site, Value, fix_all


def _merge(site: Site, axes: list, sizes: list[int]) -> Layout:
    """Layout of axes flattened together: only one of them may carry permuted channels."""
    g = site.graph
    moving = [k for k, a in enumerate(axes) if not g.is_trivial(a)]
    if not moving:
        return trivial(math.prod(sizes))
    if len(moving) > 1:
        for k in moving:
            g.fix(axes[k], f"{site.where}: flattening several permuted axes together")
        return trivial(math.prod(sizes))
    k = moving[0]
    layout = expand(g.normalize(g.concrete(axes[k])), math.prod(sizes[k + 1:]))
    return repeat(layout, math.prod(sizes[:k]))


def _split(site: Site, layout: Layout, sizes: list[int]) -> list[Layout] | None:
    """Layouts of the axes one axis is reshaped into; None when no single output axis can carry it."""
    g = site.graph
    if g.is_trivial(layout) or len(sizes) == 1:
        return [layout] if len(sizes) == 1 else [trivial(n) for n in sizes]
    for t, m in enumerate(sizes):
        outer, inner = math.prod(sizes[:t]), math.prod(sizes[t + 1:])
        chunk = g.cut(layout, 0, m * inner)
        core = None if chunk is None else g.shrink(chunk, inner)
        if core is None or g.is_trivial(core):
            continue
        if g.same(repeat(expand(core, inner), outer), layout):
            return [core if k == t else trivial(n) for k, n in enumerate(sizes)]
    return None


def _chunks(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Groups of input and output axes with equal products (size-1 axes left out)."""
    s = [i for i, n in enumerate(src) if n != 1]
    d = [j for j, n in enumerate(dst) if n != 1]
    out, i, j = [], 0, 0
    while i < len(s) and j < len(d):
        si, dj = [s[i]], [d[j]]
        ps, pd = src[s[i]], dst[d[j]]
        while ps != pd:
            if ps < pd:
                i += 1
                si.append(s[i])
                ps *= src[s[i]]
            else:
                j += 1
                dj.append(d[j])
                pd *= dst[d[j]]
        out.append((si, dj))
        i, j = i + 1, j + 1
    return out


def reshape(site: Site) -> Value:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze, read off the input and output shapes alone."""
    x = site.tensor(site.arg(0))
    src, dst = site.shape(site.arg(0)), site.out_shape
    if 0 in src or math.prod(src) != math.prod(dst):
        return fix_all(site, "reshape of an empty tensor")
    out = [trivial(n) for n in dst]
    for si, dj in _chunks(src, dst):
        axes = [x.axes[k] for k in si]
        if len(si) == 1 and len(dj) == 1:
            out[dj[0]] = axes[0]
            continue
        merged = _merge(site, axes, [src[k] for k in si])
        parts = _split(site, merged, [dst[k] for k in dj])
        if parts is None:
            site.graph.fix(merged, f"{site.where}: reshape splits permuted channels over several axes")
            continue
        for k, layout in zip(dj, parts):
            out[k] = layout
    return TensorAxes(tuple(out))


def _reorder(site: Site, order: list[int]) -> Value:
    x = site.tensor(site.arg(0))
    return TensorAxes(tuple(x.axes[k] for k in order))


def permute(site: Site) -> Value:
    ndim = len(site.shape(site.arg(0)))
    dims = site.const(site.arg(1, "dims"))
    if isinstance(dims, int):
        dims = [site.const(a) for a in site.node.args[1:]]
    return _reorder(site, [int(d) % ndim for d in dims])


def transpose(site: Site) -> Value:
    ndim = len(site.shape(site.arg(0)))
    order = list(range(ndim))
    if ndim >= 2:
        a = int(site.const(site.arg(1, "dim0", 0))) % ndim
        b = int(site.const(site.arg(2, "dim1", 1))) % ndim
        order[a], order[b] = order[b], order[a]
    return _reorder(site, order)


def movedim(site: Site) -> Value:
    ndim = len(site.shape(site.arg(0)))
    src, dst = site.const(site.arg(1, "source")), site.const(site.arg(2, "destination"))
    src = [int(s) % ndim for s in ([src] if isinstance(src, int) else src)]
    dst = [int(s) % ndim for s in ([dst] if isinstance(dst, int) else dst)]
    order = [None] * ndim
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(k for k in range(ndim) if k not in src)
    return _reorder(site, [k if k is not None else next(rest) for k in order])


def expand_rule(site: Site) -> Value:
    x, src, dst = site.tensor(site.arg(0)), site.shape(site.arg(0)), site.out_shape
    lead = len(dst) - len(src)
    return TensorAxes(tuple(x.axes[i - lead] if i >= lead and src[i - lead] == n else trivial(n)
                            for i, n in enumerate(dst)))


def repeat_rule(site: Site) -> Value:
    x, src, dst = site.tensor(site.arg(0)), site.shape(site.arg(0)), site.out_shape
    lead = len(dst) - len(src)
    out = []
    for i, n in enumerate(dst):
        if i < lead:
            out.append(trivial(n))
        else:
            layout = site.graph.concrete(x.axes[i - lead])
            out.append(repeat(layout, n // src[i - lead]) if src[i - lead] else trivial(n))
    return TensorAxes(tuple(out))


def permute_reversed(site: Site) -> Value:
    """``x.T``: every axis in reverse order."""
    return _reorder(site, list(reversed(range(len(site.shape(site.arg(0)))))))


def transpose_last(site: Site) -> Value:
    """``x.mT``: the last two axes swapped."""
    order = list(range(len(site.shape(site.arg(0)))))
    order[-2:] = order[-1], order[-2]
    return _reorder(site, order)


def _pad_axes(site: Site, amounts: list[int], constant: bool, mode: str) -> Value:
    x, src = site.tensor(site.arg(0)), site.shape(site.arg(0))
    axes = list(x.axes)
    for k in range(len(amounts) // 2):
        d = len(src) - 1 - k
        lo, hi = int(amounts[2 * k]), int(amounts[2 * k + 1])
        if (lo, hi) == (0, 0):
            continue
        if not constant or lo < 0 or hi < 0:
            site.graph.fix(axes[d], f"{site.where}: {mode} padding of a permuted axis")
            axes[d] = trivial(site.out_shape[d])
            continue
        axes[d] = trivial(lo) + site.graph.concrete(axes[d]) + trivial(hi)
    return TensorAxes(tuple(axes))


def pad(site: Site) -> Value:
    """Constant padding puts fixed entries around a permuted axis; other modes mirror entries, so fix."""
    mode = site.const(site.arg(2, "mode", "constant"))
    return _pad_axes(site, list(site.const(site.arg(1, "pad"))), mode == "constant", str(mode))


def pad_module(site: Site) -> Value:
    m = site.module
    constant = hasattr(m, "value")
    return _pad_axes(site, list(m.padding), constant, "constant" if constant else type(m).__name__)
