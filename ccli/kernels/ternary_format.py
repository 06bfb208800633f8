"""The ternary format (what ccli.kernels.ternary's module doc calls Weights, Packing and Activations):
absmean weight quantisation, 2-bit packing, per-token int8 activation quantisation.

Everything here is re-exported by ccli.kernels.ternary, the module to import. It lives apart so that
the Triton kernel (ccli.kernels.ternary_triton) quantises activations with the very code the other
backends use without importing the op module that imports it.
"""

from __future__ import annotations

import torch

from ccli.kernels import native

GRANULARITIES = ("tensor", "channel", "group")
WEIGHT_EPS = 1e-8  # lower bound of an absmean weight scale
ACT_EPS = 1e-8  # lower bound of sx = absmax / 127 (as float32), so an all-zero token gives q = 0

_native = native.TERNARY


# --- weights ------------------------------------------------------------------------------------------


def n_groups(in_features: int, group_size: int) -> int:
    """G = ceil(in_features / group_size)."""
    return -(-in_features // group_size)


def _absmean_scale(w: torch.Tensor, granularity: str, group_size: int) -> tuple[torch.Tensor, int]:
    """float32 (out, G) absmean scales and the group size used."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"ternary: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if w.dim() != 2:
        raise ValueError(f"ternary: weights must be 2-D (out, in), got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    a = w.detach().float().abs()
    if granularity == "tensor":
        s = a.mean().clamp_min(WEIGHT_EPS).expand(out_features, 1).contiguous()
        return s, in_features
    if granularity == "channel":
        return a.mean(dim=1, keepdim=True).clamp_min(WEIGHT_EPS), in_features
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"ternary: group_size must be a positive integer, got {group_size!r}")
    groups = n_groups(in_features, group_size)
    padded = torch.nn.functional.pad(a, (0, groups * group_size - in_features))
    sums = padded.view(out_features, groups, group_size).sum(-1)
    counts = torch.full((groups,), float(group_size), device=w.device)
    counts[-1] = in_features - (groups - 1) * group_size
    return (sums / counts).clamp_min(WEIGHT_EPS), group_size


def _expand_scale(scale: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """(out, G) -> (out, in): each column's scale."""
    return scale.repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize_weights(
    w: torch.Tensor, granularity: str = "tensor", group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Absmean ternarisation of float weights (out, in): (t int8 (out, in) in {-1, 0, 1}, scale float32
    (out, G), group size used). "tensor" and "channel" use group size `in` (G = 1)."""
    s, gs = _absmean_scale(w, granularity, group_size)
    wf = w.detach().float()
    t = torch.round(wf / _expand_scale(s, wf.shape[1], gs)).clamp_(-1, 1).to(torch.int8)
    return t, s, gs


def absmean_ternarize(w: torch.Tensor, granularity: str = "tensor", group_size: int = 128) -> torch.Tensor:
    """The fake-quantised weights t * s of `quantize_weights` (same rounding), in w's dtype. Not
    differentiable through the rounding: use it as w + (absmean_ternarize(w) - w).detach()."""
    s, gs = _absmean_scale(w, granularity, group_size)
    s_full = _expand_scale(s, w.shape[1], gs)
    wf = w.detach().float()
    t = torch.round(wf / s_full).clamp_(-1, 1)
    return (t * s_full).to(w.dtype)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) of {-1, 0, 1} -> uint8 (out, ceil(in / 4)), 4 weights per byte (module doc)."""
    if t.dim() != 2:
        raise ValueError(f"pack_ternary: expected a 2-D (out, in) tensor, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError("pack_ternary: weights must be in {-1, 0, 1}")
    ti = t.to(torch.int8)
    if t.numel() and (((ti > 1) | (ti < -1)).any() or not torch.equal(ti.to(t.dtype), t)):
        raise ValueError("pack_ternary: weights must be in {-1, 0, 1}")
    out_features, in_features = ti.shape
    n_bytes = -(-in_features // 4)
    codes = torch.where(ti > 0, 1, torch.where(ti < 0, 2, 0)).to(torch.uint8)
    codes = torch.nn.functional.pad(codes, (0, n_bytes * 4 - in_features)).view(out_features, n_bytes, 4)
    return codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)


def unpack_ternary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 (out, ceil(in / 4)) -> int8 (out, in) of {-1, 0, 1}: the inverse of `pack_ternary`."""
    _check_packed(packed, in_features)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3  # (out, bytes, 4)
    lut = torch.tensor([0, 1, -1, 0], dtype=torch.int8, device=packed.device)
    return lut[codes.long()].reshape(packed.shape[0], packed.shape[1] * 4)[:, :in_features]


def dequantize(packed: torch.Tensor, scale: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """The float32 weight (out, in) that packed ternary values and their scales stand for."""
    return unpack_ternary(packed, in_features).float() * _expand_scale(scale, in_features, group_size).float()


def _check_packed(packed: torch.Tensor, in_features: int) -> None:
    if packed.dtype is not torch.uint8 or packed.dim() != 2:
        raise ValueError(f"ternary: packed weights must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if in_features < 1 or packed.shape[1] != -(-in_features // 4):
        raise ValueError(
            f"ternary: packed weights must be (out, ceil(in_features / 4)) = (out, {-(-in_features // 4)}) "
            f"for in_features={in_features}, got {tuple(packed.shape)}"
        )


# --- activations -------------------------------------------------------------------------------------


def quantize_activations(x: torch.Tensor, backend: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantisation of x (N, in): (q int8 (N, in), sx float32 (N, 1)), see the
    module doc. backend "native" runs the C++ code the native kernel uses (identical results)."""
    if backend == "native":
        ext = _native.load()
        if ext is None:
            raise RuntimeError(f"ternary: native backend unavailable: {_native.failure_reason()}")
        return ext.quantize_activations(x)
    if backend != "reference":
        raise ValueError(f"quantize_activations: backend must be 'reference' or 'native', got {backend!r}")
    xf = x.float()
    sx = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(ACT_EPS)
    q = torch.round(xf / sx).clamp_(-127, 127).to(torch.int8)
    return q, sx
