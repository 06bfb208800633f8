"""Ternary (BitNet b1.58) linear layers: the `ccli::ternary_linear` op and its building blocks.

Weights. `t` is an int8 (out, in) tensor of {-1, 0, +1}; `scale` a float32 (out, G) tensor, one scale
per row and group of `group_size` input columns, G = ceil(in / group_size) (the last group may be
short). group_size == in is one group per row; a per-tensor scale is an (out, 1) tensor of identical
values. `quantize_weights` computes them by absmean: s = mean(|w|) over the tensor / row / group
(clamped to >= WEIGHT_EPS), t = clamp(round(w / s), -1, 1); `absmean_ternarize` returns the fake-
quantised float weights t * s with the same rounding (for straight-through training).

Packing (the on-disk format, read by every backend). `pack_ternary(t)` -> uint8 (out, ceil(in / 4)):
weight j of a row is in byte j // 4 at bits 2*(j % 4) .. 2*(j % 4) + 1, code 0 = 0, 1 = +1, 2 = -1.
Code 3 is never written (readers treat it as 0); padding codes are 0. `unpack_ternary` inverts it.

Activations (act_bits=8). `quantize_activations(x)` -> (q int8 (N, in), sx float32 (N, 1)), per
token absmax: sx = max(max|x| / 127, ACT_EPS) and q = clamp(round(x / sx), -127, 127), all in float32
with a true division and round-half-to-even, which the C++ kernel reproduces bit for bit.

The op. ternary_linear(x (N, in) float32, packed, scale, bias?, in_features, group_size, act_bits):
- act_bits=8: acc[n, i, g] = sum over j in group g of t[i, j] * q[n, j], exact in int32
  (`ternary_int_matmul`), then y[n, i] = sx[n] * sum_g scale[i, g] * acc[n, i, g] (+ bias[i]);
- act_bits=16 (weight-only): y[n, i] = sum_g scale[i, g] * (sum over j in g of t[i, j] * x[n, j])
  (+ bias[i]) in float32: the inner sums only add and subtract activations.
`ternary_linear` accepts x of shape (..., in) and returns (..., out) in x's dtype.

Backends: "reference" (PyTorch, any device), "native" (C++/OpenMP on the packed 2-bit weights, CPU
float32, built on first use, see ternary_cpu.cpp), "triton" (CUDA; CPU only under TRITON_INTERPRET=1,
see ternary_triton.py). "auto" (the default) uses native on CPU and triton on CUDA when available,
else the reference. `set_backend` / `use_backend` force one. Integer accumulators are identical in
every backend (`ternary_int_matmul(..., backend=...)`); the float epilogue is computed in the same order
(per-group scale, sum over groups, times sx, plus bias) and agrees to float rounding.

The native kernel reads the packed weights through a private re-laid-out copy (same size class: about
2 bits per weight for act_bits=8, 2.7 for act_bits=16; on CPUs with AVX-512 VNNI the int8 path uses a
layout with 16 rows per vector and `vpdpbusd`, and a re-laid-out copy of the scales too, see
ternary_cpu.cpp) that it builds on first use and caches per packed (or scale) tensor; the copy is
rebuilt when the tensor's version counter changes (any in-place write) and dropped once the tensor is
freed. Tensors created under torch.inference_mode() have no version counter, so an
in-place write to one of those is not noticed: replace it, or call `native.TERNARY.ext.clear_cache()`.
Once the extension has loaded, CPU float32 calls go from the dispatcher straight to C++ (activation
quantisation included), as for ccli::fff.

Work accounting. Every weight slot is added or skipped by the kernels: `ternary_adds` =
N * in * out additions (an honest upper bound); the epilogue does `ternary_scale_macs` = N * out * G
multiplies. FLOP counting reports multiplies only: the fvcore handle (ccli.measure.flops) counts
N * out * G multiply-accumulates and the FlopCounterMode formula 2 * N * out * G FLOPs. The additions
are not FLOPs of either counter: profilers count them by walking the TernaryLinear modules
(ccli.variants.ternary, `adds_per_token`), or per call with `adds_for_call`.

Outlier weights. A layer may keep a few weights far beyond their scale in float32, outside the
ternary matrix (whose entries there are 0; why, in ccli.variants.ternary):
`ccli::ternary_outliers_(y, x, rows, cols, values)` adds, in place, y[n, rows[k]] += x[n, cols[k]] *
values[k] for each of its K outliers, on the float (unquantised) activations (in place because a copy
of y would cost more than the outliers: 275 us against 7 us for a 128 x 1536 output on one thread). It
is one multiply-accumulate per outlier and token: both FLOP counters count N * K of them.

Importing this module registers the ops, their fake (meta) impls, the FlopCounterMode formulas and the
fvcore handles, all through ccli.kernels.registry. The weight, packing and activation helpers above live
in ccli.kernels.ternary_format (so that the Triton kernel can use them) and are re-exported here. The ops are for inference: they have no autograd formula (training uses
`add_outliers_reference`, which is differentiable).
"""

from __future__ import annotations

import math

import torch

from ccli.kernels import native
from ccli.kernels.backends import BACKENDS
from ccli.kernels.registry import KernelOp, register_op
from ccli.kernels.ternary_format import (  # noqa: F401 - the format's API is this module's too
    ACT_EPS,
    GRANULARITIES,
    WEIGHT_EPS,
    _absmean_scale,
    _check_packed,
    _expand_scale,
    absmean_ternarize,
    dequantize,
    n_groups,
    pack_ternary,
    quantize_activations,
    quantize_weights,
    unpack_ternary,
)

__all__ = [
    "ACT_BITS",
    "ACT_EPS",
    "BACKENDS",
    "GRANULARITIES",
    "WEIGHT_EPS",
    "absmean_ternarize",
    "add_outliers",
    "add_outliers_reference",
    "adds_for_call",
    "available_backends",
    "get_backend",
    "n_groups",
    "pack_ternary",
    "quantize_activations",
    "quantize_weights",
    "set_backend",
    "ternary_adds",
    "ternary_int_matmul",
    "ternary_int_matmul_reference",
    "ternary_linear",
    "ternary_linear_native",
    "ternary_linear_reference",
    "ternary_scale_macs",
    "unpack_ternary",
    "use_backend",
]

ACT_BITS = (8, 16)

_native = native.TERNARY


# --- reference -----------------------------------------------------------------------------------------

_REF_CHUNK_ELEMENTS = 1 << 24  # bound on the (tokens, out, G) intermediates per chunk of tokens


def _check_args(x, packed, scale, bias, in_features, group_size, act_bits) -> None:
    if act_bits not in ACT_BITS:
        raise ValueError(f"ternary_linear: act_bits must be 8 (int8 activations) or 16 (float activations), got {act_bits!r}")
    if in_features < 1 or group_size < 1:
        raise ValueError(f"ternary_linear: need in_features >= 1 and group_size >= 1 (got {in_features}, {group_size})")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"ternary_linear: x must be (N, {in_features}), got shape {tuple(x.shape)}")
    _check_packed(packed, in_features)
    out_features = packed.shape[0]
    groups = n_groups(in_features, group_size)
    if tuple(scale.shape) != (out_features, groups):
        raise ValueError(
            f"ternary_linear: scale must be (out, G) = ({out_features}, {groups}) for in_features={in_features}, "
            f"group_size={group_size}, got {tuple(scale.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"ternary_linear: bias must be ({out_features},), got {tuple(bias.shape)}")


def _grouped(v: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """(R, in) -> (R, G, group_size), zero padded."""
    groups = n_groups(in_features, group_size)
    v = torch.nn.functional.pad(v, (0, groups * group_size - in_features))
    return v.view(v.shape[0], groups, group_size)


def ternary_int_matmul_reference(q: torch.Tensor, packed: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """acc[n, i, g] = sum over j in group g of t[i, j] * q[n, j]: int32 (N, out, G), exact (float64
    products and sums of small integers)."""
    _check_packed(packed, in_features)
    if q.dim() != 2 or q.shape[1] != in_features:
        raise ValueError(f"ternary_int_matmul: q must be (N, {in_features}), got shape {tuple(q.shape)}")
    t = _grouped(unpack_ternary(packed, in_features).double(), in_features, group_size)
    qg = _grouped(q.double(), in_features, group_size)
    return torch.einsum("ngk,ogk->nog", qg, t).round().to(torch.int32)


def _epilogue(acc: torch.Tensor, scale: torch.Tensor, sx: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """y = sx * sum_g scale * acc (+ bias), float32."""
    y = (acc * scale.float()).sum(-1)
    if sx is not None:
        y = sx * y
    if bias is not None:
        y = y + bias.float()
    return y


def ternary_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    group_size: int,
    act_bits: int,
) -> torch.Tensor:
    """The op in plain PyTorch (any device); x is (N, in), returns (N, out) in x's dtype. The integer
    (act_bits=8) or float (act_bits=16) group sums are computed in float64 (exact for the integers),
    the epilogue in float32."""
    _check_args(x, packed, scale, bias, in_features, group_size, act_bits)
    n_tokens = x.shape[0]
    out_features = packed.shape[0]
    groups = scale.shape[1]
    chunk = max(1, _REF_CHUNK_ELEMENTS // max(1, out_features * groups))
    xf = x.float()
    t = None
    outs = []
    for start in range(0, max(n_tokens, 1), chunk):
        xs = xf[start : start + chunk]
        if act_bits == 8:
            q, sx = quantize_activations(xs)
            acc = ternary_int_matmul_reference(q, packed, in_features, group_size).float()
            outs.append(_epilogue(acc, scale, sx, bias))
        else:
            if t is None:
                t = _grouped(unpack_ternary(packed, in_features).double(), in_features, group_size)
            sums = torch.einsum("ngk,ogk->nog", _grouped(xs.double(), in_features, group_size), t).float()
            outs.append(_epilogue(sums, scale, None, bias))
    y = outs[0] if len(outs) == 1 else torch.cat(outs)
    return y.to(x.dtype)


# --- backends -----------------------------------------------------------------------------------------

def _native_supported(x, packed, scale, bias) -> bool:
    return (
        x.dtype is torch.float32
        and scale.dtype is torch.float32
        and (bias is None or bias.dtype is torch.float32)
        and all(t.device.type == "cpu" for t in (x, packed, scale) + (() if bias is None else (bias,)))
    )


def _native_impl(x, packed, scale, bias, in_features, group_size, act_bits):
    # The extension is loaded by _resolve; it checks arguments itself. Other dtypes use the reference.
    ext = _native.ext
    if ext is not None and _native_supported(x, packed, scale, bias):
        return ext.ternary_linear(x, packed, scale, bias, in_features, group_size, act_bits)
    return ternary_linear_reference(x, packed, scale, bias, in_features, group_size, act_bits)


def _triton_impl(x, packed, scale, bias, in_features, group_size, act_bits):
    from ccli.kernels.ternary_triton import ternary_linear_triton

    _check_args(x, packed, scale, bias, in_features, group_size, act_bits)
    return ternary_linear_triton(x, packed, scale, bias, in_features, group_size, act_bits)


def ternary_int_matmul(
    q: torch.Tensor, packed: torch.Tensor, in_features: int, group_size: int, backend: str = "reference"
) -> torch.Tensor:
    """The exact integer part of act_bits=8: int32 (N, out, G), acc[n, i, g] = sum over j in group g of
    t[i, j] * q[n, j] for int8 q (N, in). `backend` picks the implementation ("reference", "native" or
    "triton"); all of them return identical integers."""
    if backend == "reference":
        return ternary_int_matmul_reference(q, packed, in_features, group_size)
    if backend == "native":
        ext = _native.load()
        if ext is None:
            raise RuntimeError(f"ternary: native backend unavailable: {_native.failure_reason()}")
        return ext.ternary_int_matmul(q, packed, in_features, group_size)
    if backend == "triton":
        from ccli.kernels.ternary_triton import ternary_int_matmul_triton

        _check_packed(packed, in_features)
        if q.dim() != 2 or q.shape[1] != in_features or q.dtype is not torch.int8:
            raise ValueError(f"ternary_int_matmul: q must be int8 (N, {in_features}), got {q.dtype} {tuple(q.shape)}")
        return ternary_int_matmul_triton(q, packed, in_features, group_size)
    raise ValueError(f"ternary_int_matmul: unknown backend {backend!r} (reference, native, triton)")


def ternary_linear_native(x, packed, scale, bias, in_features, group_size, act_bits) -> torch.Tensor:
    """The op with the native kernel, bypassing the dispatcher (float32 CPU tensors; x is (N, in))."""
    ext = _native.load()
    if ext is None:
        raise RuntimeError(f"ternary: native backend unavailable: {_native.failure_reason()}")
    return ext.ternary_linear(x, packed, scale, bias, in_features, group_size, act_bits)


# --- the ops --------------------------------------------------------------------------------------------


def _ternary_fake(x, packed, scale, bias, in_features, group_size, act_bits):
    _check_args(x, packed, scale, bias, in_features, group_size, act_bits)
    return x.new_empty((x.shape[0], packed.shape[0]))


def _ternary_macs(x_shape, packed_shape, scale_shape, bias, in_features, group_size, act_bits) -> int:
    """The epilogue multiply-accumulates (the additions are not counted, see the module doc)."""
    return ternary_scale_macs(math.prod(x_shape[:-1]), scale_shape[0], scale_shape[1])


def _ternary_setup_context(ctx, inputs, output):
    _, packed, scale, bias, in_features, group_size, _ = inputs
    ctx.save_for_backward(packed, scale)
    ctx.in_features, ctx.group_size, ctx.has_bias = in_features, group_size, bias is not None


def _ternary_backward(ctx, grad):
    """Gradients for the input (straight through the activation quantisation, as training does) and
    the bias; the packed weights and their scales are constants. So a finalized ternary linear (a
    saved model's, or an earlier recipe step's) still passes gradients on to what comes before it."""
    packed, scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ dequantize(packed, scale, ctx.in_features, ctx.group_size).to(grad.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.sum(0)
    return grad_x, None, None, grad_bias, None, None, None


TERNARY_LINEAR_OP = register_op(KernelOp(
    name="ternary_linear",
    schema="(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int in_features, int group_size, "
           "int act_bits) -> Tensor",
    reference=ternary_linear_reference,
    fake=_ternary_fake,
    macs=_ternary_macs,
    native=_native,
    native_impl=_native_impl,
    triton_impl=_triton_impl,
    backward=_ternary_backward,
    setup_context=_ternary_setup_context,
))
_backends = TERNARY_LINEAR_OP.backends
set_backend = _backends.set
get_backend = _backends.get
use_backend = _backends.use
available_backends = _backends.available
_resolve = _backends.resolve
_over_tokens = TERNARY_LINEAR_OP.over_tokens


def ternary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    group_size: int,
    act_bits: int = 8,
) -> torch.Tensor:
    """Ternary linear for x of shape (..., in) through the `ccli::ternary_linear` op; returns (..., out)."""
    return _over_tokens(x, packed, scale, bias, in_features, group_size, act_bits)


def add_outliers_reference(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                           values: torch.Tensor) -> torch.Tensor:
    """y (..., out) plus the float outlier weights' products: y[..., rows[k]] += x[..., cols[k]] * values[k].
    Differentiable (training uses it directly); any device."""
    y = y.clone()
    _add_outliers_inplace(y, x, rows, cols, values)
    return y


def _add_outliers_inplace(y, x, rows, cols, values) -> None:
    y.index_add_(-1, rows, x.index_select(-1, cols) * values.to(x.dtype))


def _outliers_fake(y, x, rows, cols, values):
    return None


def _outliers_macs(y_shape, x_shape, rows_shape, cols_shape, values_shape) -> int:
    """One multiply-accumulate per outlier and token."""
    return math.prod(x_shape[:-1]) * rows_shape[0]


TERNARY_OUTLIERS_OP = register_op(KernelOp(
    name="ternary_outliers_",
    schema="(Tensor(a!) y, Tensor x, Tensor rows, Tensor cols, Tensor values) -> ()",
    reference=_add_outliers_inplace,
    fake=_outliers_fake,
    macs=_outliers_macs,
))


def add_outliers(y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 values: torch.Tensor) -> torch.Tensor:
    """`add_outliers_reference` in place on y (returned) through the `ccli::ternary_outliers_` op, so
    FLOP counters see it. For inference: y must not need its old values. When a gradient is wanted the
    in-place op, which has none, gives way to the differentiable out-of-place reference."""
    if torch.is_grad_enabled() and (y.requires_grad or x.requires_grad or values.requires_grad):
        return add_outliers_reference(y, x, rows, cols, values)
    torch.ops.ccli.ternary_outliers_(y, x, rows, cols, values)
    return y


# --- work accounting ------------------------------------------------------------------------------------


def ternary_adds(n_tokens: int, in_features: int, out_features: int) -> int:
    """Additions/subtractions of (quantised) activations of one call: N * in * out (every weight slot is
    added or skipped: an upper bound)."""
    return n_tokens * in_features * out_features


def ternary_scale_macs(n_tokens: int, out_features: int, groups: int) -> int:
    """Multiplies of the epilogue (scale per group): N * out * G (FLOP counters report these only)."""
    return n_tokens * out_features * groups


def adds_for_call(x_shape, packed_shape, in_features: int) -> int:
    """`ternary_adds` of a call with x of shape (..., in) and packed weights of shape (out, in / 4)."""
    return ternary_adds(math.prod(x_shape[:-1]), in_features, packed_shape[0])
