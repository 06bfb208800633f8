"""Grouped expert computation for mixtures of experts: the `ccli::moe` op.

Layout. A layer has E experts of W neurons each over hidden size H. Expert e's input weights are
`w_in[e]` (w_in is (E, H, W): column r of w_in[e] is the input row of neuron e*W + r, so an
expert's block is read in one contiguous piece and multiplies a token's x as outer products), its
biases `b_in[e*W : (e+1)*W]` (b_in (E*W,), optional) and its output vectors rows e*W ... e*W + W - 1
of `w_out` (E*W, H) (row r is neuron r's output vector, i.e. the transpose of a down projection). A
gated layer (LLaMA family) also has `w_gate` (E, H, W): its neurons are act(x.w_gate[e][:, r]) *
(x.w_in[e][:, r] + b_in[e*W + r]); otherwise they are act(x.w_in[e][:, r] + b_in[e*W + r]).
`expert_layout(weight, experts)` turns nn.Linear-layout rows (E*W, H) into (E, H, W).

Routing is given, not computed: the op receives the (token, expert) pairs to run, grouped by expert.
`tokens` (A,) int64 lists token indices, expert e's being tokens[offsets[e] : offsets[e+1]]; `offsets`
(E+1,) int64 starts at 0, never decreases and ends at A. A token may appear under any number of
experts (top-k, or a dynamic number), at most once per expert; an expert may have no tokens.
`gates` (A,), optional, scales each pair's expert output (1 when absent). Per token t:

    y[t] = b_out + sum over pairs (t, e) of gate * sum over e's neurons r of neuron_r(x[t]) * w_out[r]

Work per call: A pairs, each W neurons, W*H*(2, or 3 when gated) multiply-accumulates: the FLOP count
is exactly the experts the tokens ran (the router and any always-on part are ordinary linears,
counted as such by their callers). `group_by_expert` turns per-token expert choices into this form.

Backends: "reference" (PyTorch, any device: one pair of matrix products per expert, on its own
tokens), "native" (C++/OpenMP, CPU float32: tokens grouped by expert, experts in parallel, at one
token only the chosen experts' rows are read), "triton" (CUDA; CPU only under TRITON_INTERPRET=1).
"auto" (the default) uses native on CPU and triton on CUDA when available, else the reference.
No backend computes an expert for a token that did not pick it.

The op is for inference: it has no autograd formula. `moe_reference` is differentiable (for tests;
the module's training path is ccli.variants.moe).
"""

from __future__ import annotations

import torch

from ccli.kernels import activations, native
from ccli.kernels.backends import BACKENDS
from ccli.kernels.registry import KernelOp, register_op

__all__ = [
    "BACKENDS",
    "available_backends",
    "expert_layout",
    "get_backend",
    "group_by_expert",
    "moe",
    "moe_macs",
    "moe_reference",
    "set_backend",
    "use_backend",
]

_ACT_FNS = activations.FUNCTIONS


def moe_macs(pairs: int, hidden: int, width: int, gated: bool = False) -> int:
    """Multiply-accumulates of one call: pairs * W * H * (3 if gated else 2) (FLOPs are twice this)."""
    return pairs * width * hidden * (3 if gated else 2)


def expert_layout(rows: torch.Tensor, experts: int) -> torch.Tensor:
    """(E*W, H) neuron input rows (nn.Linear layout) -> the op's (E, H, W) expert blocks (a copy)."""
    return rows.reshape(experts, -1, rows.shape[-1]).transpose(1, 2).contiguous()


def group_by_expert(expert_idx: torch.Tensor, experts: int, keep: torch.Tensor | None = None,
                    gates: torch.Tensor | None = None):
    """(tokens, offsets, gates) for the op from per-token choices: `expert_idx` (N, k) expert indices
    (distinct within a row), `keep` (N, k) bool to drop some of them (a dynamic number per token), and
    `gates` (N, k) their output scales (or None). Tokens come out grouped by expert, ascending."""
    n, k = expert_idx.shape
    flat = expert_idx.reshape(-1)
    token = torch.arange(n, device=expert_idx.device).unsqueeze(1).expand(n, k).reshape(-1)
    flat_gates = None if gates is None else gates.reshape(-1)
    if keep is not None:
        kept = keep.reshape(-1)
        flat, token = flat[kept], token[kept]
        flat_gates = None if flat_gates is None else flat_gates[kept]
    # one sort on a key unique to each pair (expert major, token minor): the same order as a stable
    # sort by expert, at less than half its cost; then where each expert's run starts (searchsorted:
    # bincount's range checks cost more than the whole grouping at a few tokens)
    stride = n + 1  # more than any token index (and no comparison for a JIT trace to warn about)
    keys, order = torch.sort(flat * stride + token)
    bounds = torch.arange(experts + 1, device=expert_idx.device, dtype=keys.dtype) * stride
    offsets = torch.searchsorted(keys, bounds)
    return token[order], offsets, None if flat_gates is None else flat_gates[order]


def _check_args(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate=None, gates=None, b_out=None) -> None:
    if activation not in _ACT_FNS:
        raise ValueError(f"moe: unknown activation {activation!r}; expected one of {activations.NAMES}")
    if x.dim() != 2:
        raise ValueError(f"moe: x must be 2-D (N, H), got shape {tuple(x.shape)}")
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError(f"moe: offsets must be (E+1,) with E >= 1 experts, got shape {tuple(offsets.shape)}")
    if tokens.dim() != 1:
        raise ValueError(f"moe: tokens must be 1-D (pairs,), got shape {tuple(tokens.shape)}")
    if tokens.dtype != torch.long or offsets.dtype != torch.long:
        raise ValueError(f"moe: tokens and offsets must be int64, got {tokens.dtype} and {offsets.dtype}")
    experts, hidden = offsets.shape[0] - 1, x.shape[1]
    if w_in.dim() != 3 or w_in.shape[0] != experts or w_in.shape[1] != hidden or w_in.shape[2] == 0:
        raise ValueError(f"moe: w_in must be (E, H, W) = ({experts}, {hidden}, W >= 1) for E={experts} experts, "
                         f"got {tuple(w_in.shape)}")
    rows = experts * w_in.shape[2]
    if tuple(w_out.shape) != (rows, hidden):
        raise ValueError(f"moe: w_out must be ({rows}, {hidden}), got {tuple(w_out.shape)}")
    if w_gate is not None and tuple(w_gate.shape) != tuple(w_in.shape):
        raise ValueError(f"moe: w_gate must be {tuple(w_in.shape)} like w_in, got {tuple(w_gate.shape)}")
    if b_in is not None and tuple(b_in.shape) != (rows,):
        raise ValueError(f"moe: b_in must be ({rows},), got {tuple(b_in.shape)}")
    if gates is not None and tuple(gates.shape) != tuple(tokens.shape):
        raise ValueError(f"moe: gates must be {tuple(tokens.shape)} like tokens, got {tuple(gates.shape)}")
    if b_out is not None and tuple(b_out.shape) != (hidden,):
        raise ValueError(f"moe: b_out must be ({hidden},), got {tuple(b_out.shape)}")


def _check_routing(tokens: torch.Tensor, offsets: torch.Tensor, n_tokens: int) -> list[int]:
    """offsets as a list, after checking the routing against the data (not for fake tensors)."""
    offs = offsets.tolist()
    if offs[0] != 0 or offs[-1] != tokens.shape[0] or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"moe: offsets must start at 0, never decrease and end at the {tokens.shape[0]} pairs")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= n_tokens):
        raise ValueError(f"moe: tokens must index the {n_tokens} rows of x")
    return offs


# --- reference ----------------------------------------------------------------------------------------


def moe_reference(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate=None, gates=None, b_out=None):
    """The op in plain PyTorch (any device and dtype, differentiable); x is (N, H), returns (N, H).
    Each expert runs as two matrix products on its own tokens only."""
    _check_args(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate, gates, b_out)
    act = _ACT_FNS[activation]
    offs = _check_routing(tokens, offsets, x.shape[0])
    experts = len(offs) - 1
    width = w_in.shape[2]
    y = x.new_zeros(x.shape) if b_out is None else b_out.to(x.dtype).expand(x.shape).clone()
    for e in range(experts):
        lo, hi = offs[e], offs[e + 1]
        if hi == lo:
            continue
        rows = slice(e * width, (e + 1) * width)
        members = tokens[lo:hi]
        xe = x.index_select(0, members)
        z = xe @ w_in[e]
        if b_in is not None:
            z = z + b_in[rows]
        h = act(z) if w_gate is None else act(xe @ w_gate[e]) * z
        out = h @ w_out[rows]
        if gates is not None:
            out = out * gates[lo:hi].unsqueeze(1).to(out.dtype)
        y = y.index_add(0, members, out)
    return y


# --- backends -----------------------------------------------------------------------------------------


def _native_f32(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate=None, gates=None, b_out=None):
    ext = native.MOE.ext
    if x.dtype is torch.float32 and ext is not None:
        return ext.moe_forward(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate, gates, b_out)
    return moe_reference(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate, gates, b_out)


def _triton_impl(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate=None, gates=None, b_out=None):
    from ccli.kernels.moe_triton import moe_triton

    _check_args(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate, gates, b_out)
    return moe_triton(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate, gates, b_out)


def moe_native(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate=None, gates=None, b_out=None):
    """The native kernel without the dispatcher (float32 CPU tensors). Raises if it is unavailable."""
    ext = native.MOE.load()
    if ext is None:
        raise RuntimeError(f"native MoE kernel unavailable: {native.MOE.failure_reason()}")
    return ext.moe_forward(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate, gates, b_out)


# --- the op ---------------------------------------------------------------------------------------------


def _moe_fake(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate=None, gates=None, b_out=None):
    _check_args(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate, gates, b_out)
    return x.new_empty(x.shape)


def _op_macs(x_shape, tokens_shape, offsets_shape, w_in_shape, b_in_shape, w_out_shape, activation,
             w_gate=None, gates=None, b_out=None) -> int:
    return moe_macs(tokens_shape[0], x_shape[1], w_in_shape[2], w_gate is not None)


MOE_OP = register_op(KernelOp(
    name="moe",
    schema="(Tensor x, Tensor tokens, Tensor offsets, Tensor w_in, Tensor? b_in, Tensor w_out, str activation, "
           "Tensor? w_gate=None, Tensor? gates=None, Tensor? b_out=None) -> Tensor",
    reference=moe_reference,
    fake=_moe_fake,
    macs=_op_macs,
    native=native.MOE,
    native_impl=_native_f32,
    triton_impl=_triton_impl,
))
_backends = MOE_OP.backends
set_backend = _backends.set
get_backend = _backends.get
use_backend = _backends.use
available_backends = _backends.available


def moe(x, tokens, offsets, w_in, b_in, w_out, activation="gelu", w_gate=None, gates=None, b_out=None):
    """The `ccli::moe` op on x of shape (..., H), its rows numbered as x.reshape(-1, H) (see the module
    doc); returns (..., H)."""
    if x.dim() == 2:
        return MOE_OP.overload(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate, gates, b_out)
    y = MOE_OP.overload(x.reshape(-1, x.shape[-1]), tokens, offsets, w_in, b_in, w_out, activation, w_gate, gates,
                        b_out)
    return y.view(x.shape)
