"""Rules for layers with weights, as modules and as functions (``F.conv2d(x, self.weight, ...)``).

- Linear: input features ~ weight axis 1; weight axis 0 ~ bias ~ output features (a fresh group).
- Conv (groups = 1): input channels ~ weight axis 1 (axis 0 for ConvTranspose); output channels ~ the
  other weight axis ~ bias. Depthwise (groups = in = out channels): input ~ output ~ weight axis 0.
  Any other group count only allows permutations inside groups, so its channels are fixed.
- BatchNorm / InstanceNorm: channel ~ weight ~ bias ~ running_mean ~ running_var (num_batches_tracked
  has no axis).
- LayerNorm / RMSNorm over the last k axes: mean and variance over those axes do not depend on the
  order of any of them, so every normalized axis passes through and ties to its weight/bias axis.
  Over channels alone this is the per-position LN of ConvNeXt/ViT; over (C, H, W) it still permutes C.
- GroupNorm(G, C): each group's statistics pool C/G channels, so a channel may only move within its
  group, which a permutation group cannot say: channels are FIXED, except with G = 1 (LayerNorm over
  C, H, W) or G = C (one channel per group: per-channel statistics), where they pass through.
- LocalResponseNorm mixes neighbouring channels: fixed.
"""

from __future__ import annotations

from cyclemerge.spec.axes import TensorAxes, trivial
from cyclemerge.spec.site import Site, Value, fix_all, fix_value, trivial_value


def _tie_all(site: Site, channel, tensors: list[TensorAxes | None], axis: int = 0) -> None:
    for t in tensors:
        if t is not None:
            site.graph.tie(t.axes[axis], channel, site.where)


def linear_axes(site: Site, x: TensorAxes, w: TensorAxes, b: TensorAxes | None) -> Value:
    if len(w.axes) != 2:
        return fix_all(site, "linear with a weight that is not a matrix")
    site.graph.tie(w.axes[1], x.axes[-1], site.where)
    out = site.graph.concrete(w.axes[0])
    _tie_all(site, out, [b])
    return TensorAxes(tuple(x.axes[:-1]) + (out,))


def conv_axes(site: Site, x: TensorAxes, w: TensorAxes, b: TensorAxes | None, groups: int, transposed: bool) -> Value:
    g = site.graph
    out_shape, in_shape = site.out_shape, site.shape(site.arg(0))
    ch = 1 if len(in_shape) == len(w.axes) else 0
    cin, cout = in_shape[ch], out_shape[ch]
    if groups == 1:
        w_in, w_out = (w.axes[0], w.axes[1]) if transposed else (w.axes[1], w.axes[0])
        g.tie(w_in, x.axes[ch], site.where)
        out = g.concrete(w_out)
    elif groups == cin == cout:
        g.tie(w.axes[0], x.axes[ch], site.where)
        out = x.axes[ch]
    else:
        g.fix(x.axes[ch], f"{site.where}: grouped conv (groups={groups} of {cin} channels) fixes its channels")
        fix_value(g, w, "")
        out = trivial(cout)
    _tie_all(site, out, [b])
    return TensorAxes(tuple(x.axes[:ch]) + (out,) + tuple(trivial(n) for n in out_shape[ch + 1:]))


def channel_norm_axes(site: Site, x: TensorAxes, tensors: list[TensorAxes | None], spatial_dims: int | None) -> Value:
    """Per-channel statistics (BatchNorm, InstanceNorm, per-channel affine): channel axis 1 passes through."""
    ch = 1 if spatial_dims is None or len(x.axes) == spatial_dims + 2 else 0
    _tie_all(site, x.axes[ch], tensors)
    return TensorAxes(x.axes)


def layer_norm_axes(site: Site, x: TensorAxes, count: int, tensors: list[TensorAxes | None]) -> Value:
    for t in tensors:
        if t is not None:
            for k in range(count):
                site.graph.tie(t.axes[k], x.axes[len(x.axes) - count + k], site.where)
    return TensorAxes(x.axes)


def group_norm_axes(site: Site, x: TensorAxes, groups: int, tensors: list[TensorAxes | None]) -> Value:
    channels = site.shape(site.arg(0))[1]
    if groups in (1, channels):
        return channel_norm_axes(site, x, tensors, None)
    site.graph.fix(x.axes[1], f"{site.where}: GroupNorm({groups}, {channels}) keeps its channels fixed "
                              "(a channel may only move within its group)")
    return TensorAxes(x.axes)


# --- modules ----------------------------------------------------------------------------------

def _input(site: Site) -> TensorAxes:
    return site.tensor(site.arg(0, "input"))


def linear_module(site: Site) -> Value:
    return linear_axes(site, _input(site), site.params("weight"), site.params("bias"))


def conv_module(site: Site) -> Value:
    m = site.module
    transposed = bool(getattr(m, "transposed", False))
    return conv_axes(site, _input(site), site.params("weight"), site.params("bias"), m.groups, transposed)


def batch_norm_module(site: Site) -> Value:
    names = ("weight", "bias", "running_mean", "running_var")
    return channel_norm_axes(site, _input(site), [site.params(n) for n in names], None)


def instance_norm_module(site: Site) -> Value:
    names = ("weight", "bias", "running_mean", "running_var")
    dims = int(type(site.module).__name__[-2]) if type(site.module).__name__[-2].isdigit() else None
    return channel_norm_axes(site, _input(site), [site.params(n) for n in names], dims)


def layer_norm_module(site: Site) -> Value:
    shape = site.module.normalized_shape
    count = 1 if isinstance(shape, int) else len(shape)
    return layer_norm_axes(site, _input(site), count, [site.params("weight"), site.params("bias")])


def group_norm_module(site: Site) -> Value:
    return group_norm_axes(site, _input(site), site.module.num_groups, [site.params("weight"), site.params("bias")])


def local_response_norm(site: Site) -> Value:
    x = _input(site)
    site.graph.fix(x.axes[1], f"{site.where}: LocalResponseNorm mixes neighbouring channels")
    return TensorAxes(x.axes)


def channel_affine_module(site: Site) -> Value:
    """cyclemerge's LayerNorm2d and ChannelAffine: per-channel tensors on axis 1."""
    names = ("weight", "bias", "scale", "shift")
    return channel_norm_axes(site, _input(site), [site.params(n) for n in names], None)


def prelu_module(site: Site) -> Value:
    return _prelu(site, _input(site), site.params("weight"), site.module.num_parameters)


def _prelu(site: Site, x: TensorAxes, w: TensorAxes | None, count: int) -> Value:
    """One slope per channel (axis 1, or 0 without a batch axis) ties it; a single slope is elementwise."""
    ch = 1 if len(x.axes) > 1 else 0
    if w is not None and count > 1:
        site.graph.tie(w.axes[0], x.axes[ch], site.where)
    return TensorAxes(x.axes)


def embedding_module(site: Site) -> Value:
    return _embedding(site, _input(site), site.params("weight"))


def _embedding(site: Site, ids: TensorAxes, w: TensorAxes) -> Value:
    site.graph.fix(w.axes[0], "")
    return TensorAxes(tuple(ids.axes) + (site.graph.concrete(w.axes[1]),))


def opaque_module(site: Site) -> Value:
    """Kept whole: everything entering is fixed, everything leaving is fixed, its tensors never move."""
    for a in site.tensor_args():
        fix_value(site.graph, site.value(a), f"{site.where}: opaque module, its inputs are fixed")
    return trivial_value(site.out)


# --- functions --------------------------------------------------------------------------------

def _t(site: Site, index: int, name: str) -> TensorAxes | None:
    return site.tensor(site.arg(index, name))


def linear_fn(site: Site) -> Value:
    return linear_axes(site, _t(site, 0, "input"), _t(site, 1, "weight"), _t(site, 2, "bias"))


def conv_fn(transposed: bool):
    def rule(site: Site) -> Value:
        # conv*d(input, weight, bias, stride, padding, dilation, groups) and
        # conv_transpose*d(input, weight, bias, stride, padding, output_padding, groups, dilation)
        groups = site.const(site.arg(6, "groups", 1))
        x, w, b = _t(site, 0, "input"), _t(site, 1, "weight"), _t(site, 2, "bias")
        return conv_axes(site, x, w, b, int(groups), transposed)

    return rule


def batch_norm_fn(site: Site) -> Value:
    tensors = [_t(site, 1, "running_mean"), _t(site, 2, "running_var"), _t(site, 3, "weight"), _t(site, 4, "bias")]
    return channel_norm_axes(site, _t(site, 0, "input"), tensors, None)


def instance_norm_fn(site: Site) -> Value:
    tensors = [_t(site, 1, "running_mean"), _t(site, 2, "running_var"), _t(site, 3, "weight"), _t(site, 4, "bias")]
    return channel_norm_axes(site, _t(site, 0, "input"), tensors, None)


def layer_norm_fn(site: Site) -> Value:
    shape = site.const(site.arg(1, "normalized_shape"))
    count = 1 if isinstance(shape, int) else len(shape)
    return layer_norm_axes(site, _t(site, 0, "input"), count, [_t(site, 2, "weight"), _t(site, 3, "bias")])


def rms_norm_fn(site: Site) -> Value:
    shape = site.const(site.arg(1, "normalized_shape"))
    count = 1 if isinstance(shape, int) else len(shape)
    return layer_norm_axes(site, _t(site, 0, "input"), count, [_t(site, 2, "weight")])


def group_norm_fn(site: Site) -> Value:
    groups = int(site.const(site.arg(1, "num_groups")))
    return group_norm_axes(site, _t(site, 0, "input"), groups, [_t(site, 2, "weight"), _t(site, 3, "bias")])


def prelu_fn(site: Site) -> Value:
    return _prelu(site, _t(site, 0, "input"), _t(site, 1, "weight"), site.shape(site.arg(1, "weight"))[0])


def embedding_fn(site: Site) -> Value:
    return _embedding(site, _t(site, 0, "input"), _t(site, 1, "weight"))
