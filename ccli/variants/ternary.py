"""Ternary (1.58-bit) linear layers, after BitNet b1.58 (Ma et al. 2024), built from dense linears.

Weights are {-1, 0, +1} times an absmean scale: per tensor (the default, as in BitNet), per output
channel, or per group of input columns. Activations are quantised per token to int8 with an absmax
scale (`act_bits=8`), or kept in float (`act_bits=16`, a weight-only variant). Multiplications by
weights become additions and subtractions of (quantised) activations: see ccli.kernels.ternary.

A `TernaryLinear` has two lives:
- during conversion it keeps a float *latent* weight, trained with a straight-through estimator
  (the forward pass sees the quantised weights and activations, the gradient flows to the latent
  weight as if quantisation were the identity); in eval mode it packs the current latent weight
  and runs the kernel, exactly as the saved model will;
- `finalize()` drops the latent weight: what remains (2-bit packed weights, scales, bias) is what is
  saved, and the forward pass always runs the packed kernel.

Outlier weights (`outliers=K`, off by default): up to K weights per linear that are at least
`OUTLIER_MIN_RATIO` times their own scale (the largest first) stay float32, outside the ternary
matrix, and are added by the `ccli::ternary_outliers_` op (see ccli.kernels.ternary); a linear with
none calls no extra op. In all-MiniLM-L6-v2 a single FFN weight 332 times its row's absmean makes a
hidden dimension's "massive activation"; clipped to one scale, block 0's FFN output linear keeps a
relative error of 0.454 after layer-wise training in a minilm conversion, against 0.028 with the 4
float weights `outliers=8` keeps there.

Conversion (`TernaryVariant`) starts each layer from plain post-training ternarisation of the dense
weight and lets the shared distillation engine (ccli.distill) train the latent weights layer by
layer against the dense linear's outputs on real inputs, then end to end (after recentring the
latent weights in their quantisation bins: see `TernaryLinear.recentre_latent`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CcliError
from .base import LinearVariant, VariantConfig, option
from .module import LatentWeightLinear

GRANULARITIES = ("tensor", "channel", "group")
TARGETS = ("ffn", "attention", "all")


def _kernels():
    from ..kernels import ternary

    return ternary


class TernaryLinear(LatentWeightLinear):
    """y = x W^T + b with W ternary times scales; see the module doc."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, granularity: str = "tensor",
                 group_size: int = 128, act_bits: int = 8, outliers: int = 0):
        super().__init__()
        self._init_latent(in_features, out_features)
        if granularity not in GRANULARITIES:
            raise CcliError(f"ternary: scale granularity must be one of {', '.join(GRANULARITIES)} (got {granularity!r})")
        if act_bits not in (8, 16):
            raise CcliError(f"ternary: act-bits must be 8 or 16 (got {act_bits!r})")
        self.granularity, self.act_bits = granularity, act_bits
        # The kernel sees groups of input columns; tensor and channel scales are one group per row.
        self.group_size = group_size if granularity == "group" else in_features
        groups = math.ceil(in_features / self.group_size)
        self.register_buffer("packed", torch.zeros(out_features, math.ceil(in_features / 4), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if not isinstance(outliers, int) or not 0 <= outliers <= in_features * out_features:
            raise CcliError(f"ternary: outliers must be an integer from 0 to in x out = {in_features * out_features} "
                            f"(got {outliers!r})")
        self._set_outlier_count(outliers)

    @property
    def outliers(self) -> int:
        """How many float weights this layer keeps outside the ternary matrix (module doc)."""
        return self.outlier_rows.numel() if "outlier_rows" in self._buffers else 0

    def _set_outlier_count(self, count: int) -> None:
        """Make room for `count` float weights kept outside the ternary matrix."""
        if count == self.outliers:
            return
        for name in ("outlier_rows", "outlier_cols", "outlier_values"):
            if hasattr(self, name):
                delattr(self, name)
        if count:
            self.register_buffer("outlier_rows", torch.zeros(count, dtype=torch.long))
            self.register_buffer("outlier_cols", torch.zeros(count, dtype=torch.long))
            self.outlier_values = nn.Parameter(torch.zeros(count))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, granularity: str = "tensor",
                   group_size: int = 128, act_bits: int = 8, outliers: int = 0) -> "TernaryLinear":
        """Plain post-training ternarisation of a dense (out, in) weight; the latent weight stays trainable.
        With `outliers`, up to that many weights far beyond their scale (`select_outliers`) stay float."""
        weight = weight.detach().float()
        rows, cols = select_outliers(weight, outliers, granularity, group_size)
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, granularity, group_size, act_bits, len(rows))
        if len(rows):
            layer.outlier_rows.copy_(rows)
            layer.outlier_cols.copy_(cols)
            layer.outlier_values.data.copy_(weight[rows, cols])
        return layer.start_from(weight, bias)

    def extra_repr(self) -> str:
        scale = f"group {self.group_size}" if self.granularity == "group" else self.granularity
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, scale={scale}, "
                f"act_bits={self.act_bits}{f', outliers={self.outliers}' if self.outliers else ''}"
                f"{', latent weight' if self.weight is not None else ''}")

    # -- weights -----------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # `outliers` in a layer's spec is a most; the saved tensors say how many it kept
        saved = state_dict.get(prefix + "outlier_rows")
        self._set_outlier_count(0 if saved is None else saved.numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _ternary_latent(self) -> torch.Tensor:
        """The latent weight the ternary matrix is quantised from: zero where the outliers are (the
        gradient there is zero too, so those entries never move)."""
        if not self.outliers:
            return self.weight
        return self.weight.index_put((self.outlier_rows, self.outlier_cols), self.weight.new_zeros(()))

    def _quantize_latent(self) -> None:
        k = _kernels()
        t, scale, _ = k.quantize_weights(self._ternary_latent(), self.granularity, self.group_size)
        self.packed.copy_(k.pack_ternary(t))
        self.scale.copy_(scale)

    def recentre_latent(self) -> None:
        """Move every latent weight to the middle of its quantisation bin, keeping the quantised layer
        (ternary values and scales) exactly as it is.

        Straight-through training leaves many latent weights hovering at a rounding threshold (the
        gradient pushes them back and forth across it). End-to-end training starts a fresh optimiser
        whose first step moves every weight by about the learning rate, so those weights all flip at
        once: on the 36 linears of minilm, one step at lr 3e-4 flipped 12% of all ternary weights and
        the model collapsed (hidden-state error 0.83 -> 1.03). Recentred, no weight is nearer than half
        a scale to a threshold, and the same run trains (0.83 -> 0.56).

        Nonzero weights go to +-s/f and zeros to 0, where s is their group's scale and f the group's
        share of nonzero weights: the absmean of the group is then s again and every value rounds
        to the same ternary value."""
        if self.weight is None:
            return
        k = _kernels()
        with torch.no_grad():
            t, scale, group_size = k.quantize_weights(self._ternary_latent(), self.granularity, self.group_size)
            t = t.float()
            nonzero_share, _ = k._absmean_scale(t, self.granularity, self.group_size)
            ratio = k._expand_scale(scale / nonzero_share, self.in_features, group_size)
            self.weight.copy_(t * ratio)

    prepare_for_end_to_end = recentre_latent  # the distillation engine's hook (ccli.distill)

    def ternary_weight(self) -> torch.Tensor:
        """The weights as int8 {-1, 0, +1} (out, in)."""
        self._sync()
        return _kernels().unpack_ternary(self.packed, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """The effective float weight (out, in): ternary values times their scales, plus the outliers."""
        self._sync()
        weight = _kernels().dequantize(self.packed, self.scale, self.in_features, self.group_size)
        if self.outliers:
            weight = weight.index_put((self.outlier_rows, self.outlier_cols), self.outlier_values.detach(), accumulate=True)
        return weight

    @property
    def adds_per_token(self) -> int:
        """Additions/subtractions of (quantised) activations per token: one per weight slot."""
        return self.in_features * self.out_features

    @property
    def weight_bytes(self) -> int:
        """Bytes of what inference keeps: packed weights, scales and outliers (bias not included)."""
        kept = [self.packed, self.scale]
        if self.outliers:
            kept += [self.outlier_rows, self.outlier_cols, self.outlier_values]
        return sum(t.numel() * t.element_size() for t in kept)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.training and torch.is_grad_enabled():
            return self._forward_ste(x)
        self._sync()
        k = _kernels()
        y = k.ternary_linear(x, self.packed, self.scale, self.bias, self.in_features, self.group_size, self.act_bits)
        if self.outliers:
            y = k.add_outliers(y, x, self.outlier_rows, self.outlier_cols, self.outlier_values)
        return y

    def _forward_ste(self, x: torch.Tensor) -> torch.Tensor:
        """Quantisation-aware forward: quantised values forward, identity gradient (STE) backward."""
        k = _kernels()
        w = self._ternary_latent()
        w_q = w + (k.absmean_ternarize(w, self.granularity, self.group_size) - w).detach()
        x_q = x
        if self.act_bits == 8:
            flat = x.reshape(-1, self.in_features)
            q, sx = k.quantize_activations(flat.detach())
            x_q = x + ((q.float() * sx).view_as(x) - x).detach()
        y = nn.functional.linear(x_q, w_q, self.bias)
        if self.outliers:  # on the float activations, as at inference
            y = k.add_outliers_reference(y, x, self.outlier_rows, self.outlier_cols, self.outlier_values)
        return y


# A weight this many times its scale is an outlier: ternarisation clips anything beyond 1.5 scales, and
# in a bell-shaped row (absmean about 0.8 standard deviations) 16 scales is some 20 deviations out.
# In all-MiniLM-L6-v2 the FFN output linears of blocks 0-3 each hold one at 142-332x, and about 8 of
# their weights, and a few elsewhere, pass 16x; ordinary rows peak at 6-13x.
OUTLIER_MIN_RATIO = 16.0


def select_outliers(weight: torch.Tensor, most: int, granularity: str = "tensor",
                    group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of up to `most` weights of `weight` (out, in) at least OUTLIER_MIN_RATIO times their
    absmean scale (per tensor, channel or group, as the layer quantises), the largest first: the ones
    ternarisation clips the most. Sorted by position."""
    if most == 0:
        return weight.new_zeros(0, dtype=torch.long), weight.new_zeros(0, dtype=torch.long)
    k = _kernels()
    scale, used = k._absmean_scale(weight, granularity, group_size)
    ratio = (weight.abs() / k._expand_scale(scale, weight.shape[1], used)).flatten()
    top = ratio.topk(min(most, ratio.numel()))
    flat = top.indices[top.values >= OUTLIER_MIN_RATIO].sort().values
    return flat // weight.shape[1], flat % weight.shape[1]


def ternary_modules(model: nn.Module) -> list[TernaryLinear]:
    return [m for m in model.modules() if isinstance(m, TernaryLinear)]


@dataclass
class TernaryConfig(VariantConfig):
    family = "ternary"
    targets: str = option("all", "which linears: ffn, attention or all", choices=TARGETS)
    act_bits: int = option(8, "8 (int8 activations) or 16 (float, weight-only)", choices=(8, 16))
    scale: str = option("tensor", "weight scale per tensor, channel or group", choices=GRANULARITIES)
    group_size: int = option(128, "input columns per scale with --scale group", low=1)
    outliers: int = option(0, "weights per linear kept in float, the largest against their scale", low=0)

    def check(self) -> None:
        if self.scale != "group" and self.group_size != 128:
            raise CcliError(f"ternary: --group-size applies only with --scale group (the scale here is {self.scale!r})")


class TernaryVariant(LinearVariant):
    name = "ternary"
    config = TernaryConfig

    @classmethod
    def skeleton(cls, hidden_size: int, spec: dict) -> TernaryLinear:
        # no outliers here: spec["outliers"] is only a most, and loading the saved tensors sizes them
        return TernaryLinear(spec["in_features"], spec["out_features"], spec["bias"], spec["scale"],
                             spec["group_size"], spec["act_bits"])

    def init_from_dense(self, linear: nn.Module, x: torch.Tensor, seed: int) -> TernaryLinear:
        from ..arch import linear_weight

        weight, bias = linear_weight(linear)
        p = self.params
        return TernaryLinear.from_dense(weight, bias, p["scale"], p["group_size"], p["act_bits"], p["outliers"])
