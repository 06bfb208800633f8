"""Triton kernel for fast feedforward (FFF) trees (see ccli/kernels/fff.py for the contract).

One program per token: it keeps the token's x and its output y in BLOCK_H-wide registers (masked, so
any H works), walks the `depth` internal nodes of each tree one row at a time, then evaluates the
reached leaf in tiles of BLOCK_W neurons (the last LEAF_LINEAR of them skip the activation). Gated
trees (GATED) read each neuron's w_up row next to its w_in row and multiply act(z) by x.w_up. Weights
are read in their stored dtype and accumulated in fp32.

How triton is imported and kernels built (and run on CPU tensors in the interpreter): see
ccli.kernels.triton_support.
"""

from __future__ import annotations

import torch

from ccli.kernels.triton_support import LazyKernel, next_pow2, require_triton

# --- kernel sources ---------------------------------------------------------------------------------
# Plain functions; `LazyKernel` binds them to a fresh namespace holding `tl` and the jit'd helper,
# then decorates them with triton.jit (which reads TRITON_INTERPRET at decoration time).


def _act_src(z, ACT: tl.constexpr):  # noqa: F821
    if ACT == "gelu":
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))  # noqa: F821
    elif ACT == "relu":
        out = tl.maximum(z, 0.0)  # noqa: F821
    else:
        # silu: z * sigmoid(z); gelu_tanh: 0.5 z (1 + tanh(u)) == z * sigmoid(2u). Overflow-free sigmoid.
        if ACT == "gelu_tanh":
            v = 1.5957691216057308 * (z + 0.044715 * z * z * z)
        else:
            v = z
        e = tl.exp(-tl.abs(v))  # noqa: F821
        out = z * tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # noqa: F821
    return out


def _fff_kernel_src(
    x_ptr,
    w_in_ptr,
    b_in_ptr,
    w_out_ptr,
    w_up_ptr,
    b_out_ptr,
    y_ptr,
    H,
    stride_x,
    stride_y,
    TREES,
    DEPTH,
    LEAF_WIDTH,
    LEAF_ACTIVATED,
    ROWS_PER_TREE,
    N_INTERNAL,
    ACT: tl.constexpr,  # noqa: F821
    HAS_B_OUT: tl.constexpr,  # noqa: F821
    GATED: tl.constexpr,  # noqa: F821
    BLOCK_H: tl.constexpr,  # noqa: F821
    BLOCK_W: tl.constexpr,  # noqa: F821
):
    pid = tl.program_id(0).to(tl.int64)  # noqa: F821
    offs_h = tl.arange(0, BLOCK_H)  # noqa: F821
    mask_h = offs_h < H
    offs_w = tl.arange(0, BLOCK_W)  # noqa: F821
    x = tl.load(x_ptr + pid * stride_x + offs_h, mask=mask_h, other=0.0).to(tl.float32)  # noqa: F821
    if HAS_B_OUT:
        acc = tl.load(b_out_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)  # noqa: F821
    else:
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)  # noqa: F821
    zero64 = tl.full([], 0, tl.int64)  # noqa: F821
    for k in range(0, TREES):
        base = zero64 + k * ROWS_PER_TREE
        node = zero64
        for _level in range(0, DEPTH):
            row = base + node
            w = tl.load(w_in_ptr + row * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)  # noqa: F821
            z = tl.sum(w * x, axis=0) + tl.load(b_in_ptr + row).to(tl.float32)  # noqa: F821
            a = _act(z, ACT)  # noqa: F821
            if GATED:
                wu = tl.load(w_up_ptr + row * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)  # noqa: F821
                a = a * tl.sum(wu * x, axis=0)  # noqa: F821
            wo = tl.load(w_out_ptr + row * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)  # noqa: F821
            acc += a * wo
            node = 2 * node + 1 + (z >= 0).to(tl.int64)  # noqa: F821
        row0 = base + N_INTERNAL + (node - N_INTERNAL) * LEAF_WIDTH
        for j in range(0, LEAF_WIDTH, BLOCK_W):
            rw = j + offs_w
            mask_w = rw < LEAF_WIDTH
            rows = row0 + rw
            mask = mask_w[:, None] & mask_h[None, :]
            offs = rows[:, None] * H + offs_h[None, :]
            wt = tl.load(w_in_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # noqa: F821
            bias = tl.load(b_in_ptr + rows, mask=mask_w, other=0.0).to(tl.float32)  # noqa: F821
            z = tl.sum(wt * x[None, :], axis=1) + bias  # noqa: F821
            a = tl.where(mask_w, tl.where(rw < LEAF_ACTIVATED, _act(z, ACT), z), 0.0)  # noqa: F821
            if GATED:
                wu = tl.load(w_up_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # noqa: F821
                a = a * tl.sum(wu * x[None, :], axis=1)  # noqa: F821
            wo = tl.load(w_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # noqa: F821
            acc += tl.sum(a[:, None] * wo, axis=0)  # noqa: F821
    tl.store(y_ptr + pid * stride_y + offs_h, acc.to(y_ptr.dtype.element_ty), mask=mask_h)  # noqa: F821


_KERNEL = LazyKernel(_fff_kernel_src, {"_act": _act_src})


def fff_triton(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    trees: int,
    depth: int,
    leaf_width: int,
    activation: str,
    b_out: torch.Tensor | None = None,
    leaf_linear: int = 0,
    w_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """FFF forward with the Triton kernel; x is (N, H). Arguments are validated by the caller."""
    require_triton()
    n_tokens, hidden = x.shape
    n_internal = (1 << depth) - 1
    rows_per_tree = n_internal + (n_internal + 1) * leaf_width
    y = torch.empty((n_tokens, hidden), dtype=x.dtype, device=x.device)
    if n_tokens == 0:
        return y
    if hidden == 0:
        return y
    x = x.contiguous()
    w_in = w_in.contiguous()
    b_in = b_in.contiguous()
    w_out = w_out.contiguous()
    has_b_out = b_out is not None
    b_out = b_out.contiguous() if has_b_out else x  # any pointer: the kernel never reads it without HAS_B_OUT
    gated = w_up is not None
    w_up = w_up.contiguous() if gated else w_in  # likewise without GATED
    block_h = next_pow2(hidden)
    # A BLOCK_W x BLOCK_H tile of weights lives in registers: keep it around 4K elements.
    block_w = max(1, min(next_pow2(leaf_width), max(1, 4096 // block_h)))
    num_warps = 8 if block_h >= 2048 else 4 if block_h >= 256 else 2 if block_h >= 64 else 1
    _KERNEL.get()[(n_tokens,)](
        x,
        w_in,
        b_in,
        w_out,
        w_up,
        b_out,
        y,
        hidden,
        x.stride(0),
        y.stride(0),
        trees,
        depth,
        leaf_width,
        leaf_width - leaf_linear,
        rows_per_tree,
        n_internal,
        ACT=activation,
        HAS_B_OUT=has_b_out,
        GATED=gated,
        BLOCK_H=block_h,
        BLOCK_W=block_w,
        num_warps=num_warps,
        enable_fp_fusion=True,  # explicit (triton 3.9 warns when it is left to its default)
    )
    return y
