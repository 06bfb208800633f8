"""Triton kernel for mixtures of experts: the grouped expert computation of `ccli::moe` (contract:
ccli/kernels/moe.py).

A grouped matrix product: the (token, expert) pairs come grouped by expert, and each program takes
one tile of up to BLOCK_T pairs of one expert (the tiles are laid out on the host from the offsets,
so no program ever touches an expert its tokens did not pick). Per tile and per BLOCK_W of the
expert's neurons it forms Z = X_tile W_in^T (and the gate side for gated experts) over H in BLOCK_K
steps with tl.dot, applies the activation (and the pair's gate), then adds Z W_out to the tokens'
output rows with atomic adds (a token's several experts land in the same row). Accumulation in
fp32, IEEE products (no TF32), so results match the reference to fp32 rounding.

How triton is imported and kernels built (and run on CPU tensors in the interpreter): see
ccli.kernels.triton_support.
"""

from __future__ import annotations

import torch

from ccli.kernels.fff_triton import _act_src
from ccli.kernels.triton_support import LazyKernel, next_pow2, require_triton


def _moe_kernel_src(
    x_ptr,
    tok_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    tile_end_ptr,
    w_in_ptr,
    b_in_ptr,
    w_gate_ptr,
    w_out_ptr,
    gates_ptr,
    y_ptr,
    H,
    W,
    stride_x,
    stride_y,
    ACT: tl.constexpr,  # noqa: F821
    HAS_B_IN: tl.constexpr,  # noqa: F821
    GATED: tl.constexpr,  # noqa: F821
    HAS_GATES: tl.constexpr,  # noqa: F821
    BLOCK_T: tl.constexpr,  # noqa: F821
    BLOCK_W: tl.constexpr,  # noqa: F821
    BLOCK_K: tl.constexpr,  # noqa: F821
):
    pid = tl.program_id(0)  # noqa: F821
    expert = tl.load(tile_expert_ptr + pid).to(tl.int64)  # noqa: F821
    start = tl.load(tile_start_ptr + pid).to(tl.int64)  # noqa: F821
    end = tl.load(tile_end_ptr + pid).to(tl.int64)  # noqa: F821
    offs_t = start + tl.arange(0, BLOCK_T)  # noqa: F821
    mask_t = offs_t < end
    tok = tl.load(tok_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)  # noqa: F821
    if HAS_GATES:
        g = tl.load(gates_ptr + offs_t, mask=mask_t, other=0.0).to(tl.float32)  # noqa: F821
    else:
        g = tl.where(mask_t, 1.0, 0.0)  # noqa: F821
    offs_k = tl.arange(0, BLOCK_K)  # noqa: F821
    offs_w = tl.arange(0, BLOCK_W)  # noqa: F821
    for j in range(0, W, BLOCK_W):
        rw = j + offs_w
        mask_w = rw < W
        rows = expert * W + rw
        z = tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32)  # noqa: F821
        zg = tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32)  # noqa: F821
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < H
            xt = tl.load(x_ptr + tok[:, None] * stride_x + kk[None, :], mask=mask_t[:, None] & mask_k[None, :],  # noqa: F821
                         other=0.0).to(tl.float32)  # noqa: F821
            w_offs = (expert * H + kk[:, None]) * W + rw[None, :]  # w_in[expert] is H x W
            w_mask = mask_k[:, None] & mask_w[None, :]
            wt = tl.load(w_in_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)  # noqa: F821
            z += tl.dot(xt, wt, input_precision="ieee")  # noqa: F821
            if GATED:
                wg = tl.load(w_gate_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)  # noqa: F821
                zg += tl.dot(xt, wg, input_precision="ieee")  # noqa: F821
        if HAS_B_IN:
            z += tl.load(b_in_ptr + rows, mask=mask_w, other=0.0).to(tl.float32)[None, :]  # noqa: F821
        if GATED:
            a = _act(zg, ACT) * z  # noqa: F821
        else:
            a = _act(z, ACT)  # noqa: F821
        a = tl.where(mask_w[None, :], a, 0.0) * g[:, None]  # noqa: F821
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < H
            wo = tl.load(w_out_ptr + rows[:, None] * H + kk[None, :], mask=mask_w[:, None] & mask_k[None, :],  # noqa: F821
                         other=0.0).to(tl.float32)  # noqa: F821
            out = tl.dot(a, wo, input_precision="ieee")  # noqa: F821
            tl.atomic_add(y_ptr + tok[:, None] * stride_y + kk[None, :], out,  # noqa: F821
                          mask=mask_t[:, None] & mask_k[None, :])


_KERNEL = LazyKernel(_moe_kernel_src, {"_act": _act_src})


def moe_triton(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate=None, gates=None, b_out=None):
    """The `ccli::moe` op with the Triton kernel; x is (N, H). Arguments are validated by the caller."""
    require_triton()
    n_tokens, hidden = x.shape
    experts = offsets.shape[0] - 1
    width = w_in.shape[2]
    # fp32 accumulation through atomic adds; the result is cast back at the end
    y = torch.zeros((n_tokens, hidden), dtype=torch.float32, device=x.device)
    if b_out is not None:
        y += b_out.float()
    if n_tokens == 0 or hidden == 0 or tokens.numel() == 0:
        return y.to(x.dtype)
    block_t = 16
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + block_t - 1) // block_t
    tile_expert = torch.repeat_interleave(torch.arange(experts, device=x.device), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    tile_start = offsets[:-1][tile_expert] + (torch.arange(tile_expert.numel(), device=x.device)
                                              - first_tile[tile_expert]) * block_t
    tile_end = offsets[1:][tile_expert]
    if tile_expert.numel() == 0:
        return y.to(x.dtype)
    x = x.contiguous()
    w_in, w_out = w_in.contiguous(), w_out.contiguous()
    b_in_arg = b_in.contiguous() if b_in is not None else x  # any pointer: never read without HAS_B_IN
    w_gate_arg = w_gate.contiguous() if w_gate is not None else x
    gates_arg = gates.contiguous() if gates is not None else x
    _KERNEL.get()[(tile_expert.numel(),)](
        x,
        tokens.contiguous(),
        tile_expert,
        tile_start,
        tile_end,
        w_in,
        b_in_arg,
        w_gate_arg,
        w_out,
        gates_arg,
        y,
        hidden,
        width,
        x.stride(0),
        y.stride(0),
        ACT=activation,
        HAS_B_IN=b_in is not None,
        GATED=w_gate is not None,
        HAS_GATES=gates is not None,
        BLOCK_T=block_t,
        BLOCK_W=max(16, min(64, next_pow2(width))),
        BLOCK_K=max(16, min(64, next_pow2(hidden))),
        num_warps=4,
        enable_fp_fusion=True,
    )
    return y.to(x.dtype)
