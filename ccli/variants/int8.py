"""int8 linear layers (W8A8) with one activation scale per token, built from dense linears.

Weights are int8 with one absmax scale per output channel; activations are quantised to int8 per
token, also by absmax, and the product accumulates exactly in int32 (ccli.kernels.int8). It is what a
user would pick instead of ccli's conditional families, torch's dynamic int8 quantisation, with one
change that decides its fidelity: torch shares one activation scale among all the tokens of a call, so
one token with a large activation (MiniLM and SmolLM2 both have them) leaves the others a few levels
each. With a scale per token, all-MiniLM-L6-v2 keeps a pooled cosine of 0.997 on every text domain
where torch's int8 keeps 0.93-0.95 (docs/int8.md).

It is also the quantised part of combination recipes: int8 attention in front of an `fff` or `moe` FFN,
or inside `mod`'s routed blocks.

An `Int8Linear` has the same two lives as a `TernaryLinear`: during conversion it keeps a float latent
weight, trained (if the recipe asks for steps) with a straight-through estimator through the
quantisation of weights and activations, and in eval mode it quantises it and runs the kernel;
`finalize()` drops the latent weight, and what remains (int8 weights, scales, bias) is what is saved.
Plain post-training quantisation (steps 0) is the default recipe: there is little to recover.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CcliError
from .base import LinearVariant, VariantConfig, option
from .module import LatentWeightLinear

TARGETS = ("ffn", "attention", "all")


def _kernels():
    from ..kernels import int8

    return int8


class Int8Linear(LatentWeightLinear):
    """y = x W^T + b with W int8 times per-channel scales and x int8 per token; see the module doc."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self._init_latent(in_features, out_features)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8Linear":
        """Post-training quantisation of a dense (out, in) weight; the latent weight stays trainable."""
        return cls(weight.shape[1], weight.shape[0], bias is not None).start_from(weight, bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"
                f"{', latent weight' if self.weight is not None else ''}")

    def _quantize_latent(self) -> None:
        q, scale = _kernels().quantize_weights(self.weight)
        self.qweight.copy_(q)
        self.scale.copy_(scale)

    def dense_weight(self) -> torch.Tensor:
        """The effective float weight (out, in): int8 values times their row's scale."""
        self._sync()
        return self.qweight.float() * self.scale[:, None]

    @property
    def weight_bytes(self) -> int:
        """Bytes of what inference keeps: int8 weights and scales (bias not included)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = _kernels()
        if self.weight is not None and self.training and torch.is_grad_enabled():
            # quantisation-aware: quantised values forward, identity gradient (STE) backward
            w_q = self.weight + (k.fake_quantize_weights(self.weight) - self.weight).detach()
            x_q = x + (k.fake_quantize_activations(x.detach()) - x).detach()
            return nn.functional.linear(x_q, w_q, self.bias)
        self._sync()
        return k.int8_linear(x, self.qweight, self.scale, self.bias)


@dataclass
class Int8Config(VariantConfig):
    family = "int8"
    targets: str = option("all", "which linears: ffn, attention or all", choices=TARGETS)
    head: bool = option(False, "also the language-model head (converted with the last block)")


def _head(arch) -> tuple[str, nn.Module] | None:
    """The model's language-model head as (path, module), if it has a dense one."""
    from ..arch import has_lm_head, is_linear

    if not has_lm_head(arch.model):
        return None
    head = arch.model.get_output_embeddings()
    path = next(name for name, module in arch.model.named_modules() if module is head)
    return (path, head) if is_linear(head) else None


class Int8Variant(LinearVariant):
    name = "int8"
    config = Int8Config
    # Post-training quantisation leaves each linear within ~0.1% of the dense one (all-MiniLM-L6-v2);
    # the engine's default 300 steps at lr 1e-3 move latent weights by more than an int8 step and
    # made the error grow tenfold on a tiny LLaMA. `--steps N --lr 1e-5` still trains, if asked.
    # Untrained, the calibration tokens only measure each linear's error, and capturing them is the
    # whole conversion's time (a forward pass per linear: SmolLM2's 210 took 12 minutes at 4096
    # tokens on 2 cores); 1024 tokens measure it well enough.
    distill_defaults = {"steps": 0, "tokens": 1024}

    @classmethod
    def skeleton(cls, hidden_size: int, spec: dict) -> Int8Linear:
        return Int8Linear(spec["in_features"], spec["out_features"], spec["bias"])

    def check_model(self, arch, blocks: list[int]) -> None:
        from ..arch import has_lm_head

        if self.params["head"] and not has_lm_head(arch.model):
            raise CcliError("int8: --head needs a model with a language-model head (this one has none)")

    def units(self, arch, block: int) -> list:
        units = super().units(arch, block)
        head = _head(arch) if self.params["head"] and block == len(arch.blocks) - 1 else None
        if head is not None:
            # a tied head (SmolLM2, GPT-2) stops sharing its weight: the embedding stays float
            units.append(self.linear_unit(arch, block, *head))
        return units

    def init_from_dense(self, linear: nn.Module, x: torch.Tensor, seed: int) -> Int8Linear:
        from ..arch import linear_weight

        weight, bias = linear_weight(linear)
        return Int8Linear.from_dense(weight, bias)
