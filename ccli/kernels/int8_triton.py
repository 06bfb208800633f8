"""Triton kernel for int8 (W8A8) linear layers (see ccli/kernels/int8.py for the contract).

One program per (BLOCK_N tokens x BLOCK_O output rows) tile: `tl.dot` of the int8 activations (quantised
per token by the PyTorch reference, so identical to the other backends) with the int8 weights into
int32 (exact), then the epilogue in the other backends' order: acc * sx * scale, plus bias.

How triton is imported and kernels built (and run on CPU tensors in the interpreter): see
ccli.kernels.triton_support.
"""

from __future__ import annotations

import torch

from ccli.kernels.ternary_format import quantize_activations
from ccli.kernels.triton_support import LazyKernel, next_pow2, require_triton


def _int8_kernel_src(
    q_ptr,
    w_ptr,
    sx_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    N,
    OUT,
    IN,
    HAS_BIAS: tl.constexpr,  # noqa: F821
    BLOCK_N: tl.constexpr,  # noqa: F821
    BLOCK_O: tl.constexpr,  # noqa: F821
    BLOCK_K: tl.constexpr,  # noqa: F821
):
    pid_n = tl.program_id(0).to(tl.int64)  # noqa: F821
    pid_o = tl.program_id(1).to(tl.int64)  # noqa: F821
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # noqa: F821
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # noqa: F821
    mask_n = offs_n < N
    mask_o = offs_o < OUT
    acc = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.int32)  # noqa: F821
    for kk in range(0, IN, BLOCK_K):
        offs_k = kk + tl.arange(0, BLOCK_K)  # noqa: F821
        mask_k = offs_k < IN
        a = tl.load(q_ptr + offs_n[:, None] * IN + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)  # noqa: F821
        w = tl.load(w_ptr + offs_o[:, None] * IN + offs_k[None, :], mask=mask_o[:, None] & mask_k[None, :], other=0)  # noqa: F821
        acc = tl.dot(a, tl.trans(w), acc)  # noqa: F821
    sx = tl.load(sx_ptr + offs_n, mask=mask_n, other=0.0)  # noqa: F821
    s = tl.load(scale_ptr + offs_o, mask=mask_o, other=0.0)  # noqa: F821
    y = acc.to(tl.float32) * sx[:, None] * s[None, :]  # noqa: F821
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0)[None, :]  # noqa: F821
    tl.store(out_ptr + offs_n[:, None] * OUT + offs_o[None, :], y, mask=mask_n[:, None] & mask_o[None, :])  # noqa: F821


_KERNEL = LazyKernel(_int8_kernel_src)


def int8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """The op with the Triton kernel; x is (N, in). Arguments are validated by the caller."""
    require_triton()
    n_tokens, out_features = x.shape[0], weight.shape[0]
    y = torch.empty((n_tokens, out_features), dtype=torch.float32, device=x.device)
    if n_tokens == 0 or out_features == 0:
        return y.to(x.dtype)
    q, sx = quantize_activations(x)
    block_n = max(16, min(64, next_pow2(n_tokens)))
    block_o = block_k = 64
    grid = (-(-n_tokens // block_n), -(-out_features // block_o))
    _KERNEL.get()[grid](
        q.contiguous(), weight.contiguous(), sx.contiguous(), scale.float().contiguous(),
        y if bias is None else bias.float().contiguous(), y,
        n_tokens, out_features, x.shape[1],
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_K=block_k,
        num_warps=4, enable_fp_fusion=True,
    )
    return y.to(x.dtype)
