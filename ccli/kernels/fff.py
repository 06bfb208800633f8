"""Conditional matrix multiplication for fast feedforward (FFF) trees: the `ccli::fff` op.

Layout. A FFF layer has K trees (`trees`) of depth D (`depth` >= 0) with leaf width W (`leaf_width`
>= 1) over hidden size H. Each tree has I = 2^D - 1 internal nodes (one neuron each) and L = 2^D
leaves (W neurons each): M = I + L*W neuron rows per tree, K*M in all. `w_in` (K*M, H) and `b_in`
(K*M,) are the input weights and biases, `w_out` (K*M, H) the output vectors (row r is neuron r's
output, i.e. linear_out.weight.T made contiguous). Tree k's rows start at base = k*M: internal node n
is row base+n, leaf j owns rows base+I+j*W ... base+I+j*W+W-1.

Per token x: y = b_out (the optional output bias (H,), else 0) plus, summed over trees, [for D
levels from node n=0: z = x.w_in[n] + b_in[n]; y += act(z) w_out[n]; n = 2n + 1 + (z >= 0)], then
the W neurons of leaf n - I likewise, except that the last R (`leaf_linear`, 0 <= R <= W, default 0)
neurons of every leaf are linear: y += z w_out[r], no activation (a rank-R linear map per leaf).
With W = 1 and R = 0 this is UltraFastBERT's FFF; D = 0 is a dense FFN of width W per tree.

Gated trees (LLaMA-family FFNs, whose neurons are act(gate) * up): with `w_up` (K*M, H), every neuron,
node or leaf, computes act(z) * (x.w_up[r]) instead of act(z), where z = x.w_in[r] + b_in[r] is its
gate pre-activation; routing still follows the sign of z. Gated trees have no linear leaf neurons
(leaf_linear must be 0).

Work per token: K*(D+W) neurons, K*(D+W)*2*H multiply-accumulates (3*H per neuron when gated).

Backends: "reference" (PyTorch, any device), "native" (C++/OpenMP, CPU float32, built on first use),
"triton" (CUDA; CPU only under TRITON_INTERPRET=1). "auto" (the default) uses native on CPU and
triton on CUDA when available, else the reference. `set_backend` / `use_backend` force one.

Importing this module registers the op, its fake (meta) impl, a FlopCounterMode formula and an fvcore
handle (ccli.measure.flops) for it, all through ccli.kernels.registry. The activations are those of
ccli.kernels.activations (`ACTIVATIONS` here is its tuple of names).

The op is for inference: it has no autograd formula (backpropagating through it makes torch warn and
gives no gradients). `fff_reference` is differentiable (hard routing) for training.

Dispatch cost: once the native extension has loaded, CPU calls go from the dispatcher straight to C++
(about 2 us over calling the kernel directly); other devices/backends go through a Python kernel.
"""

from __future__ import annotations

import torch

from ccli.kernels import activations, native
from ccli.kernels.backends import BACKENDS
from ccli.kernels.registry import KernelOp, register_op

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "MAX_DEPTH",
    "MAX_LEAVES",
    "available_backends",
    "fff",
    "fff_macs",
    "fff_reference",
    "fff_rows",
    "get_backend",
    "leaf_activations",
    "set_backend",
    "use_backend",
]

ACTIVATIONS = activations.NAMES
_ACT_FNS = activations.FUNCTIONS

# Tree size: the one depth cap (kernels, module and variant), and a cap on the leaves of a layer
# (trees x 2^depth), past which building and growing the trees runs out of memory.
MAX_DEPTH = 20
MAX_LEAVES = 2**16


def fff_rows(trees: int, depth: int, leaf_width: int) -> int:
    """Number of neuron rows of w_in / b_in / w_out: K * (2^D - 1 + 2^D * W)."""
    return trees * ((1 << depth) - 1 + (1 << depth) * leaf_width)


def fff_macs(n_tokens: int, hidden: int, trees: int, depth: int, leaf_width: int, gated: bool = False) -> int:
    """Multiply-accumulates of one call: N * K * (D + W) * H * (3 if gated else 2) (FLOPs are twice this)."""
    return n_tokens * trees * (depth + leaf_width) * (3 if gated else 2) * hidden


def _check_args(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out=None, leaf_linear=0,
                w_up=None) -> None:
    if activation not in _ACT_FNS:
        raise ValueError(f"fff: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if trees < 1 or depth < 0 or leaf_width < 1 or depth > MAX_DEPTH:
        raise ValueError(f"fff: need trees >= 1, 0 <= depth <= {MAX_DEPTH}, leaf_width >= 1 (got {trees}, {depth}, {leaf_width})")
    if not 0 <= leaf_linear <= leaf_width:
        raise ValueError(f"fff: need 0 <= leaf_linear <= leaf_width (got {leaf_linear} of {leaf_width})")
    if x.dim() != 2:
        raise ValueError(f"fff: x must be 2-D (N, H), got shape {tuple(x.shape)}")
    hidden = x.shape[1]
    rows = fff_rows(trees, depth, leaf_width)
    if tuple(w_in.shape) != (rows, hidden) or tuple(w_out.shape) != (rows, hidden):
        raise ValueError(
            f"fff: w_in and w_out must be ({rows}, {hidden}) for trees={trees} depth={depth} "
            f"leaf_width={leaf_width}, got {tuple(w_in.shape)} and {tuple(w_out.shape)}"
        )
    if tuple(b_in.shape) != (rows,):
        raise ValueError(f"fff: b_in must be ({rows},), got {tuple(b_in.shape)}")
    if b_out is not None and tuple(b_out.shape) != (hidden,):
        raise ValueError(f"fff: b_out must be ({hidden},), got {tuple(b_out.shape)}")
    if w_up is not None:
        if tuple(w_up.shape) != (rows, hidden):
            raise ValueError(f"fff: w_up must be ({rows}, {hidden}) like w_in, got {tuple(w_up.shape)}")
        if leaf_linear:
            raise ValueError(f"fff: gated trees (w_up given) have no linear leaf neurons; need leaf_linear = 0 (got {leaf_linear})")


# --- reference ----------------------------------------------------------------------------------------

_REF_CHUNK_ELEMENTS = 1 << 24  # bound on gathered leaf weights per chunk of tokens (64 MiB in fp32)


def fff_reference(
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
    """FFF forward in plain PyTorch (any device and dtype, differentiable); x is (N, H), returns (N, H).

    Vectorised over tokens: one gather + batched matmul per level, one for the leaf block (tokens are
    processed in chunks so that the gathered leaf weights stay bounded)."""
    _check_args(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out, leaf_linear, w_up)
    act = _ACT_FNS[activation]
    n_tokens, hidden = x.shape
    n_internal = (1 << depth) - 1
    rows_per_tree = n_internal + (n_internal + 1) * leaf_width
    dev = x.device
    base = torch.arange(trees, device=dev) * rows_per_tree  # (K,)
    leaf_offsets = torch.arange(leaf_width, device=dev)  # (W,)
    chunk = max(1, _REF_CHUNK_ELEMENTS // max(1, trees * leaf_width * hidden))
    outs = []
    for start in range(0, max(n_tokens, 1), chunk):
        xs = x[start : start + chunk]
        n = xs.shape[0]
        xcol = xs.unsqueeze(-1)  # (n, H, 1)
        y = None
        node = torch.zeros(n, trees, dtype=torch.long, device=dev)
        for _ in range(depth):
            rows = (node + base).reshape(-1)  # (n*K,)
            z = _rows_dot(w_in, rows, xcol, n, trees) + b_in.index_select(0, rows).view(n, trees)
            a = act(z) if w_up is None else act(z) * _rows_dot(w_up, rows, xcol, n, trees)
            term = torch.bmm(a.unsqueeze(1), w_out.index_select(0, rows).view(n, trees, hidden)).squeeze(1)
            y = term if y is None else y + term
            node = 2 * node + 1 + (z >= 0).long()
        first = base + n_internal + (node - n_internal) * leaf_width  # (n, K)
        rows = (first.unsqueeze(-1) + leaf_offsets).reshape(-1)  # (n*K*W,)
        width = trees * leaf_width
        z = (_rows_dot(w_in, rows, xcol, n, width) + b_in.index_select(0, rows).view(n, width)).view(n, trees, leaf_width)
        a = leaf_activations(z, act, leaf_linear).view(n, width)
        if w_up is not None:
            a = a * _rows_dot(w_up, rows, xcol, n, width)
        term = torch.bmm(a.unsqueeze(1), w_out.index_select(0, rows).view(n, width, hidden)).squeeze(1)
        outs.append(term if y is None else y + term)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out if b_out is None else out + b_out


def _rows_dot(weights: torch.Tensor, rows: torch.Tensor, xcol: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """x . weights[row] for `width` rows per token: (n, width) from rows (n*width,) and xcol (n, H, 1)."""
    return torch.bmm(weights.index_select(0, rows).view(n, width, xcol.shape[1]), xcol).squeeze(-1)


def leaf_activations(z: torch.Tensor, act, leaf_linear: int) -> torch.Tensor:
    """act(z) over a leaf's neurons (last dimension), except the last `leaf_linear`, which stay linear."""
    if leaf_linear == 0:
        return act(z)
    gated = z.shape[-1] - leaf_linear
    return torch.cat([act(z[..., :gated]), z[..., gated:]], -1)


# --- backends -----------------------------------------------------------------------------------------

def _native_f32(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out=None, leaf_linear=0, w_up=None):
    # The extension is loaded by the backend selection; it checks shapes itself. Other dtypes use the reference.
    ext = native.FFF.ext
    if x.dtype is torch.float32 and ext is not None:
        return ext.fff_forward(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out, leaf_linear, w_up)
    return fff_reference(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out, leaf_linear, w_up)


def _triton_impl(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out=None, leaf_linear=0, w_up=None):
    from ccli.kernels.fff_triton import fff_triton

    _check_args(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out, leaf_linear, w_up)
    return fff_triton(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out, leaf_linear, w_up)


# --- the op ---------------------------------------------------------------------------------------------


def _fff_fake(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out=None, leaf_linear=0, w_up=None):
    _check_args(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out, leaf_linear, w_up)
    return x.new_empty(x.shape)


def _op_macs(x_shape, w_in_shape, b_in_shape, w_out_shape, trees, depth, leaf_width, activation, b_out=None,
             leaf_linear=0, w_up=None) -> int:
    return fff_macs(x_shape[0], x_shape[1], trees, depth, leaf_width, gated=w_up is not None)


FFF_OP = register_op(KernelOp(
    name="fff",
    schema="(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, int trees, int depth, int leaf_width, "
           "str activation, Tensor? b_out=None, int leaf_linear=0, Tensor? w_up=None) -> Tensor",
    reference=fff_reference,
    fake=_fff_fake,
    macs=_op_macs,
    native=native.FFF,
    native_impl=_native_f32,
    triton_impl=_triton_impl,
))
_backends = FFF_OP.backends
set_backend = _backends.set
get_backend = _backends.get
use_backend = _backends.use
available_backends = _backends.available
_resolve = _backends.resolve
_over_tokens = FFF_OP.over_tokens


def fff(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    trees: int,
    depth: int,
    leaf_width: int,
    activation: str = "gelu",
    b_out: torch.Tensor | None = None,
    leaf_linear: int = 0,
    w_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """FFF forward for x of shape (..., H) through the `ccli::fff` op; returns (..., H). `b_out`, an
    optional output bias (H,), is fused: each output row starts from it. The last `leaf_linear`
    neurons of every leaf are linear (no activation); with `w_up` the trees are gated (module doc)."""
    return _over_tokens(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out, leaf_linear, w_up)
