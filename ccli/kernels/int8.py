"""int8 linear layers with per-token activation scales (W8A8): the `ccli::int8_linear` op.

Weights. `weight` is an int8 (out, in) tensor and `scale` a float32 (out,) tensor, one scale per output
channel: `quantize_weights(w)` gives scale = max(max|w_i| / 127, WEIGHT_EPS) per row i and
weight = clamp(round(w / scale), -127, 127); `fake_quantize_weights` returns weight * scale as floats
(for straight-through training).

Activations are quantised per token to int8 with an absmax scale, exactly as the ternary family's
(`quantize_activations`, ccli.kernels.ternary_format): sx = max(max|x| / 127, ACT_EPS) and
q = clamp(round(x / sx), -127, 127). One scale per token is what sets this apart from torch's dynamic
quantisation, whose one scale per call is shared by every token of every sequence in it: a token with
a large activation then leaves the others a few levels each (why torch's int8 keeps a pooled cosine of
0.93-0.95 on all-MiniLM-L6-v2 where this keeps 0.997, docs/int8.md).

The op. int8_linear(x (N, in) float32, weight, scale, bias?): acc[n, i] = sum_j q[n, j] * weight[i, j],
exact in int32, then y[n, i] = acc[n, i] * sx[n] * scale[i] (+ bias[i]). `int8_linear` accepts x of
shape (..., in) and returns (..., out) in x's dtype.

Backends: "reference" (PyTorch, any device: the integer product in float64, exact for any layer this
size), "native" (CPU float32: C++ quantisation and epilogue around torch's own int8 matrix product,
`torch._int_mm`, which is oneDNN's AMX / VNNI kernel on x86; see int8_cpu.cpp), "triton" (CUDA; CPU only
under TRITON_INTERPRET=1, see int8_triton.py). "auto" uses native on CPU and triton on CUDA when
available, else the reference. The integer accumulators are identical in every backend; the float
epilogue is computed in the same order and agrees to float rounding.

Work accounting: N * in * out multiply-accumulates (integer ones: both FLOP counters count them, so a
profile shows the same count as the dense layer, as it does for torch's int8; the speed is in the
narrower arithmetic, not in fewer operations).
"""

from __future__ import annotations

import torch

from ccli.kernels import native
from ccli.kernels.registry import KernelOp, register_op
from ccli.kernels.ternary_format import quantize_activations  # the ternary family's per-token quantiser

__all__ = [
    "WEIGHT_EPS",
    "fake_quantize_activations",
    "fake_quantize_weights",
    "int8_linear",
    "int8_linear_native",
    "int8_linear_reference",
    "quantize_weights",
]

WEIGHT_EPS = 1e-8  # lower bound of a row's scale, so an all-zero row gives weight 0

_native = native.INT8


def quantize_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight int8 (out, in), scale float32 (out,)) of a float weight (out, in): per-row absmax."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(WEIGHT_EPS)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def fake_quantize_weights(w: torch.Tensor) -> torch.Tensor:
    """The float weight the int8 weight and its scales stand for."""
    q, scale = quantize_weights(w)
    return q.float() * scale[:, None]


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x (..., in) as the kernel sees it: quantised per token and scaled back to float."""
    q, sx = quantize_activations(x.reshape(-1, x.shape[-1]))
    return (q.float() * sx).view_as(x).to(x.dtype)


def _check_args(x, weight, scale, bias) -> None:
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"int8_linear: x must be 2-D (tokens, in) with in > 0, got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.dtype is not torch.int8 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"int8_linear: weight must be int8 (out, {x.shape[1]}), got {weight.dtype} {tuple(weight.shape)}")
    if scale.numel() != weight.shape[0]:
        raise ValueError(f"int8_linear: scale must have one value per output ({weight.shape[0]}), got {tuple(scale.shape)}")
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"int8_linear: bias must have one value per output ({weight.shape[0]}), got {tuple(bias.shape)}")


def int8_int_matmul_reference(q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int32 (N, out) accumulators of int8 q (N, in) and weight (out, in). The product runs in float64,
    where every partial sum (at most 127 * 127 * in) is an exact integer for in < 2^39."""
    return (q.double() @ weight.double().T).to(torch.int32)


def int8_linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    _check_args(x, weight, scale, bias)
    q, sx = quantize_activations(x)
    y = int8_int_matmul_reference(q, weight).float() * sx * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _native_impl(x, weight, scale, bias):
    # The extension is loaded by the backend selection; other dtypes use the reference.
    ext = _native.ext
    if ext is not None and x.dtype is torch.float32 and scale.dtype is torch.float32 and (
            bias is None or bias.dtype is torch.float32):
        return ext.int8_linear(x, weight, scale, bias)
    return int8_linear_reference(x, weight, scale, bias)


def int8_linear_native(x, weight, scale, bias=None):
    """The native kernel without the dispatcher (float32 CPU tensors). Raises if it is unavailable."""
    ext = _native.load()
    if ext is None:
        raise RuntimeError(f"native int8 kernel unavailable: {_native.failure_reason()}")
    return ext.int8_linear(x, weight, scale, bias)


def _triton_impl(x, weight, scale, bias):
    from ccli.kernels.int8_triton import int8_linear_triton

    _check_args(x, weight, scale, bias)
    return int8_linear_triton(x, weight, scale, bias)


def _fake(x, weight, scale, bias=None):
    _check_args(x, weight, scale, bias)
    return x.new_empty((x.shape[0], weight.shape[0]))


def _macs(x_shape, weight_shape, scale_shape, bias_shape=None) -> int:
    return x_shape[0] * weight_shape[0] * weight_shape[1]


INT8_OP = register_op(KernelOp(
    name="int8_linear",
    schema="(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor",
    reference=int8_linear_reference,
    fake=_fake,
    macs=_macs,
    native=_native,
    native_impl=_native_impl,
    triton_impl=_triton_impl,
))
_backends = INT8_OP.backends
set_backend = _backends.set
get_backend = _backends.get
use_backend = _backends.use
available_backends = _backends.available


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The `ccli::int8_linear` op on x of shape (..., in); returns (..., out)."""
    return INT8_OP.over_tokens(x, weight, scale, bias)
