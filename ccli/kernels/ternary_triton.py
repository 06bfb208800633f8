"""Triton kernel for ternary (BitNet b1.58) linear layers (see ccli/kernels/ternary.py for the contract).

One program per (BLOCK_N tokens x BLOCK_O output rows) tile. For every group it walks the group's input
columns BLOCK_K at a time: loads the packed bytes of the tile's rows, unpacks the 2-bit codes in
registers to int8 {-1, 0, +1}, and accumulates
- act_bits=8: `tl.dot` of the int8 activations (quantised by the PyTorch reference, so identical to the
  other backends) with the int8 weights into int32 (exact);
- act_bits=16: `tl.dot` of the float32 activations with the {-1, 0, +1} weights in IEEE fp32
  (input_precision="ieee": the products are exact, so this only adds and subtracts activations);
then applies the epilogue in the same order as the other backends: acc * scale[:, g] summed over groups,
times sx (act_bits=8), plus bias. The integer accumulators can be written out instead
(`ternary_int_matmul_triton`).

How triton is imported and kernels built (and run on CPU tensors in the interpreter): see
ccli.kernels.triton_support.
"""

from __future__ import annotations

import torch

from ccli.kernels.ternary_format import quantize_activations
from ccli.kernels.triton_support import LazyKernel, next_pow2, require_triton

MODE_INT = 0  # write the int32 accumulators (N, out, G)
MODE_ACT8 = 1  # int8 activations, float epilogue
MODE_ACT16 = 2  # float activations


# --- kernel source ------------------------------------------------------------------------------------
# A plain function; `LazyKernel` binds it to a namespace holding `tl` and decorates it with triton.jit.


def _ternary_kernel_src(
    a_ptr,
    packed_ptr,
    scale_ptr,
    sx_ptr,
    bias_ptr,
    out_ptr,
    N,
    OUT,
    IN,
    GS,
    SPAN,
    G,
    NB,
    stride_a,
    MODE: tl.constexpr,  # noqa: F821
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
    arange_k = tl.arange(0, BLOCK_K)  # noqa: F821
    facc = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32)  # noqa: F821
    for g in range(G):
        if MODE == 2:
            acc = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32)  # noqa: F821
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.int32)  # noqa: F821
        for kk in range(0, SPAN, BLOCK_K):
            local = kk + arange_k
            offs_k = g * GS + local
            mask_k = (local < SPAN) & (offs_k < IN)
            a = tl.load(  # noqa: F821
                a_ptr + offs_n[:, None] * stride_a + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0
            )
            byte = tl.load(  # noqa: F821
                packed_ptr + offs_o[:, None] * NB + (offs_k[None, :] >> 2), mask=mask_o[:, None] & mask_k[None, :], other=0
            ).to(tl.int32)  # noqa: F821
            code = (byte >> ((offs_k[None, :] & 3) * 2)) & 3
            w = tl.where(code == 1, 1, tl.where(code == 2, -1, 0))  # noqa: F821
            if MODE == 2:
                acc = tl.dot(a, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")  # noqa: F821
            else:
                acc = tl.dot(a, tl.trans(w.to(tl.int8)), acc)  # noqa: F821
        if MODE == 0:
            dst = out_ptr + (offs_n[:, None] * OUT + offs_o[None, :]) * G + g
            tl.store(dst, acc, mask=mask_n[:, None] & mask_o[None, :])  # noqa: F821
        else:
            s = tl.load(scale_ptr + offs_o * G + g, mask=mask_o, other=0.0)  # noqa: F821
            facc += acc.to(tl.float32) * s[None, :]  # noqa: F821
    if MODE != 0:
        y = facc
        if MODE == 1:
            sx = tl.load(sx_ptr + offs_n, mask=mask_n, other=0.0)  # noqa: F821
            y = sx[:, None] * y
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0)[None, :]  # noqa: F821
        tl.store(out_ptr + offs_n[:, None] * OUT + offs_o[None, :], y, mask=mask_n[:, None] & mask_o[None, :])  # noqa: F821


_KERNEL = LazyKernel(_ternary_kernel_src)


def _launch(a, packed, scale, sx, bias, out, in_features, group_size, mode) -> None:
    require_triton()
    n_tokens = a.shape[0]
    out_features = packed.shape[0]
    if n_tokens == 0 or out_features == 0:
        return
    groups = -(-in_features // group_size)
    block_n = max(16, min(64, next_pow2(n_tokens)))
    block_o = 64
    block_k = 64
    grid = (_cdiv(n_tokens, block_n), _cdiv(out_features, block_o))
    dummy = out  # unused pointer arguments
    _KERNEL.get()[grid](
        a,
        packed,
        scale if scale is not None else dummy,
        sx if sx is not None else dummy,
        bias if bias is not None else dummy,
        out,
        n_tokens,
        out_features,
        in_features,
        group_size,
        min(group_size, in_features),
        groups,
        packed.shape[1],
        a.stride(0),
        MODE=mode,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_O=block_o,
        BLOCK_K=block_k,
        num_warps=4,
        enable_fp_fusion=True,  # explicit (triton 3.9 warns when it is left to its default)
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ternary_int_matmul_triton(q: torch.Tensor, packed: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """int32 (N, out, G) accumulators of int8 q (N, in) (validated by the caller)."""
    groups = -(-in_features // group_size)
    acc = torch.empty((q.shape[0], packed.shape[0], groups), dtype=torch.int32, device=q.device)
    _launch(q.contiguous(), packed.contiguous(), None, None, None, acc, in_features, group_size, MODE_INT)
    return acc


def ternary_linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    group_size: int,
    act_bits: int,
) -> torch.Tensor:
    """The op with the Triton kernel; x is (N, in). Arguments are validated by the caller."""
    y = torch.empty((x.shape[0], packed.shape[0]), dtype=torch.float32, device=x.device)
    packed = packed.contiguous()
    scale = scale.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    if act_bits == 8:
        q, sx = quantize_activations(x)
        _launch(q.contiguous(), packed, scale, sx.contiguous(), bias, y, in_features, group_size, MODE_ACT8)
    else:
        _launch(x.float().contiguous(), packed, scale, None, bias, y, in_features, group_size, MODE_ACT16)
    return y.to(x.dtype)
