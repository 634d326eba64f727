"""Which rule handles which graph node; anything not listed is refused by name before any work."""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import batchnorm, conv, instancenorm, padding, pooling

from cyclemerge.spec import rules_layers as L
from cyclemerge.spec import rules_shape as S
from cyclemerge.spec import rules_tensor as T
from cyclemerge.spec.site import Site, Value, fix_all
from cyclemerge.spec.trace import OWN_LEAVES

Rule = Callable[[Site], Value]

ELEMENTWISE = (
    "relu relu6 elu selu celu leaky_relu gelu silu mish hardswish hardsigmoid hardtanh sigmoid tanh softplus "
    "softsign logsigmoid tanhshrink softshrink hardshrink threshold dropout dropout1d dropout2d dropout3d "
    "alpha_dropout feature_alpha_dropout softmax log_softmax softmin normalize exp exp2 expm1 log log2 log10 "
    "log1p abs neg negative sqrt rsqrt square sin cos erf erfc reciprocal sign sgn floor ceil round trunc frac "
    "clamp clip clamp_min clamp_max add sub subtract mul multiply div divide true_divide floor_divide "
    "remainder fmod pow maximum minimum fmax fmin where eq ne lt le gt ge logical_and logical_or logical_not "
    "logical_xor isnan isfinite nan_to_num lerp addcmul addcdiv atan2 hypot masked_fill"
).split()
OPERATORS = ("add sub mul truediv floordiv mod pow neg pos abs iadd isub imul itruediv eq ne lt le gt ge and_ or_ "
             "xor invert")
REDUCTIONS = "sum mean nansum nanmean amax amin prod std var logsumexp all any count_nonzero".split()
RESHAPES = "view reshape flatten unflatten squeeze unsqueeze view_as reshape_as ravel".split()
CASTS = ("to float double half bfloat16 int long bool type type_as contiguous clone detach detach_ cpu cuda "
         "requires_grad_ zeros_like ones_like full_like empty_like rand_like randn_like").split()
FACTORIES = "zeros ones full empty arange linspace logspace rand randn randint tensor eye".split()
NEW_FACTORIES = "new_zeros new_ones new_full new_empty new_tensor".split()
FIXING = ("gather index_select scatter scatter_add take take_along_dim masked_select einsum kron tile diag tril "
          "triu").split()
QUERIES = "size dim numel ndimension nelement".split()
REORDERING = "sort argsort msort topk kthvalue unique unique_consecutive searchsorted bucketize".split()

ATTENTION = ("attention internals (heads split the feature axis into head x head_dim, which a permutation group "
             "cannot express)")
SORTING = "orders entries by value, so permuting features changes which entry lands where"


def _fixing(name: str) -> Rule:
    return lambda site: fix_all(site, f"{name} is not reasoned about axis by axis")


def _functions() -> dict[object, Rule]:
    table: dict[object, Rule] = {}
    for name in ELEMENTWISE:
        for ns in (torch, F, torch.special):
            fn = getattr(ns, name, None)
            if fn is not None:
                table.setdefault(fn, T.elementwise)
            fn_ = getattr(ns, name + "_", None)
            if fn_ is not None:
                table.setdefault(fn_, T.elementwise)
    for name in OPERATORS.split():
        table[getattr(operator, name)] = T.elementwise
    for name in REDUCTIONS:
        table[getattr(torch, name)] = T.reduction
    table.update({torch.norm: T.norm_reduction, torch.linalg.vector_norm: T.norm_reduction,
                  torch.argmax: T.arg_reduction, torch.argmin: T.arg_reduction,
                  torch.max: T.max_min, torch.min: T.max_min, torch.median: T.max_min})
    for name in ("cumsum", "cumprod", "logcumsumexp", "flip", "roll"):
        table[getattr(torch, name)] = T.along_axis
    for name in ("flatten", "reshape", "squeeze", "unsqueeze", "ravel", "unflatten"):
        table[getattr(torch, name)] = S.reshape
    table.update({torch.permute: S.permute, torch.transpose: S.transpose, torch.swapaxes: S.transpose,
                  torch.swapdims: S.transpose, torch.t: S.transpose, torch.movedim: S.movedim,
                  torch.moveaxis: S.movedim, torch.broadcast_to: S.expand_rule})
    table.update({torch.cat: T.cat, torch.concat: T.cat, torch.concatenate: T.cat, torch.stack: T.stack,
                  torch.split: T.split, torch.chunk: T.split, torch.tensor_split: T.split, torch.unbind: T.split,
                  torch.narrow: T.narrow, torch.select: T.select, operator.getitem: T.getitem,
                  operator.setitem: _fixing("setitem")})
    for fn in (torch.matmul, torch.mm, torch.bmm, operator.matmul):
        table[fn] = T.matmul
    for name in FIXING:
        table[getattr(torch, name)] = _fixing(name)
    for name in FACTORIES:
        table[getattr(torch, name)] = T.factory
    for name in CASTS:
        if hasattr(torch, name):
            table[getattr(torch, name)] = T.first_operand
    for k in (1, 2, 3):
        for name in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool"):
            for fn in (getattr(F, f"{name}{k}d", None), getattr(torch, f"{name}{k}d", None)):
                if fn is not None:
                    table[fn] = T.spatial(k)
        table[getattr(F, f"conv{k}d")] = L.conv_fn(False)
        table[getattr(F, f"conv_transpose{k}d")] = L.conv_fn(True)
    table.update({F.interpolate: T.interpolate, F.upsample: T.interpolate, F.pad: S.pad,
                  F.linear: L.linear_fn, F.batch_norm: L.batch_norm_fn, F.instance_norm: L.instance_norm_fn,
                  F.layer_norm: L.layer_norm_fn, F.group_norm: L.group_norm_fn, F.prelu: L.prelu_fn,
                  F.embedding: L.embedding_fn, F.local_response_norm: L.local_response_norm,
                  F.pixel_shuffle: _fixing("pixel_shuffle"), F.pixel_unshuffle: _fixing("pixel_unshuffle"),
                  torch._assert: T.no_tensor, fx._symbolic_trace._assert_is_none: T.no_tensor,
                  builtins.getattr: _getattr})
    if hasattr(F, "rms_norm"):
        table[F.rms_norm] = L.rms_norm_fn
    return table


def _getattr(site: Site) -> Value:
    name = site.arg(1)
    if name == "T":
        return S.permute_reversed(site)
    if name == "mT":
        return S.transpose_last(site)
    if name == "data":
        return T.first_operand(site)
    return T.shape_query(site)


def _methods() -> dict[str, Rule]:
    table: dict[str, Rule] = {}
    for name in ELEMENTWISE + [f"__{n.strip('_')}__" for n in OPERATORS.split()]:
        table[name] = table[name + "_"] = T.elementwise
    table.update({n: T.reduction for n in REDUCTIONS})
    table.update({"norm": T.norm_reduction, "argmax": T.arg_reduction, "argmin": T.arg_reduction,
                  "max": T.max_min, "min": T.max_min, "median": T.max_min})
    table.update({n: T.along_axis for n in ("cumsum", "cumprod", "logcumsumexp", "flip", "roll")})
    table.update({n: S.reshape for n in RESHAPES})
    table.update({"permute": S.permute, "transpose": S.transpose, "swapaxes": S.transpose, "swapdims": S.transpose,
                  "t": S.transpose, "movedim": S.movedim, "moveaxis": S.movedim, "expand": S.expand_rule,
                  "expand_as": S.expand_rule, "broadcast_to": S.expand_rule, "repeat": S.repeat_rule})
    table.update({"split": T.split, "chunk": T.split, "tensor_split": T.split, "unbind": T.split,
                  "narrow": T.narrow, "select": T.select, "__getitem__": T.getitem,
                  "matmul": T.matmul, "mm": T.matmul, "bmm": T.matmul})
    table.update({n: _fixing(n) for n in FIXING + ["__setitem__", "index_put", "index_put_", "masked_scatter"]})
    table.update({n: T.first_operand for n in CASTS})
    table.update({n: T.factory for n in NEW_FACTORIES})
    table.update({n: T.no_tensor for n in QUERIES})
    return table


ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink,
    nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)


def _pool_dims(module: nn.Module) -> int:
    return int(type(module).__name__[-2])


def _pool(site: Site) -> Value:
    return T.spatial(_pool_dims(site.module))(site)


MODULES: list[tuple[tuple[type, ...], Rule]] = [
    ((nn.Linear,), L.linear_module),
    ((conv._ConvNd,), L.conv_module),
    ((batchnorm._BatchNorm,), L.batch_norm_module),
    ((instancenorm._InstanceNorm,), L.instance_norm_module),
    ((nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()), L.layer_norm_module),
    ((nn.GroupNorm,), L.group_norm_module),
    ((nn.LocalResponseNorm, nn.CrossMapLRN2d), L.local_response_norm),
    (OWN_LEAVES, L.channel_affine_module),
    ((nn.PReLU,), L.prelu_module),
    ((nn.Embedding,), L.embedding_module),
    (ACTIVATION_MODULES, T.elementwise),
    ((pooling._MaxPoolNd, pooling._AvgPoolNd, pooling._AdaptiveAvgPoolNd, pooling._AdaptiveMaxPoolNd,
      pooling._LPPoolNd), _pool),
    ((nn.Upsample,), T.interpolate),
    ((padding._ConstantPadNd, padding._ReflectionPadNd, padding._ReplicationPadNd, padding._CircularPadNd),
     S.pad_module),
    ((nn.Flatten, nn.Unflatten), S.reshape),
    ((nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle), _fixing("channel shuffle")),
]

REFUSED_MODULES: list[tuple[tuple[type, ...], str]] = [
    ((nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder, nn.TransformerEncoderLayer,
      nn.TransformerDecoder, nn.TransformerDecoderLayer), ATTENTION),
    ((nn.RNNBase, nn.RNNCellBase), "recurrent layer (its gates split the hidden axis into blocks)"),
]

FUNCTIONS = _functions()
METHODS = _methods()
REFUSED_FUNCTIONS: dict[object, str] = {getattr(torch, n): SORTING for n in REORDERING if hasattr(torch, n)}
REFUSED_FUNCTIONS.update({F.scaled_dot_product_attention: ATTENTION, F.multi_head_attention_forward: ATTENTION})
NAMED_FUNCTIONS = {"torchvision.ops.stochastic_depth.stochastic_depth": T.first_operand}


def target_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} module"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    fn = node.target
    name = getattr(fn, "__name__", str(fn))
    for label, ns in (("torch", torch), ("torch.nn.functional", F), ("operator", operator)):
        if getattr(ns, name, None) is fn:
            return f"{label}.{name}"
    owner = getattr(fn, "__module__", None) or ""
    return f"{owner}.{getattr(fn, '__qualname__', name)}".lstrip(".")


def lookup(node: fx.Node, gm: fx.GraphModule, opaque: frozenset[str]) -> Rule | str:
    """The rule for a call node, or the reason it is refused."""
    if node.op == "call_module":
        if node.target in opaque:
            return L.opaque_module
        module = gm.get_submodule(node.target)
        for types, why in REFUSED_MODULES:
            if isinstance(module, types):
                return why
        for types, rule in MODULES:
            if isinstance(module, types):
                return rule
        return "module type with no rule"
    if node.op == "call_method":
        if node.target in REORDERING:
            return SORTING
        return METHODS.get(node.target, "tensor method with no rule")
    fn = node.target
    if getattr(fn, "autograd_function", None) is not None:
        return "custom torch.autograd.Function: its forward is arbitrary code the spec cannot see into"
    try:
        if fn in REFUSED_FUNCTIONS:
            return REFUSED_FUNCTIONS[fn]
        if fn in FUNCTIONS:
            return FUNCTIONS[fn]
    except TypeError:
        pass
    qualified = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', '')}"
    return NAMED_FUNCTIONS.get(qualified, "function with no rule")
