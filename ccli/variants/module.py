"""What every module a variant family puts into a model provides: `ConvertedModule`, the one
protocol the engine, the measurements and reload rely on (see ccli.variants.base for the rest of a
family). It imports nothing of ccli, so the architecture view can use it too."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class ConvertedModule(nn.Module):
    """What every module a variant puts into a model provides (defaults: nothing to do, no work).

    - `unit_kind`: "ffn" (stands for a whole FFN: maps (..., H) to (..., H)), "linear" (stands for
      one linear layer: `in_features`, `out_features`, `bias` and `dense_weight()`, the effective
      (out, in) weight), or "block" (a whole block that keeps the block's own parts at their paths:
      build it with `wrap_block`, so that profile, bench and reload still find its attention and FFN);
    - `finalize()`: drop what only training needed (called once conversion is done);
    - `prepare_for_end_to_end()`: re-express the trainable state before end-to-end training, without
      changing what the module computes;
    - work per token: `neuron_counts(x)` -> (computed, positive) neurons per token or None,
      `total_neurons` (neurons held), `adds_per_token` (additions standing for multiplications);
    - `routing()`: for a block that routes tokens around itself, what its last forward did
      ({"capacity", "tokens" processed, "real_tokens" it was given}), else None;
    - `auxiliary_loss()`: a loss of the module's own from its last training forward pass (a router's
      regression target, ...), which the distillation engine adds to the distillation loss, or None;
    - `init_record`: numbers the family's initialisation measured on the calibration tokens (name ->
      float, e.g. how well a router's fit ranks tokens), reported with the layer, or None.
    """

    unit_kind: ClassVar[str] = ""
    init_record: dict | None = None

    def finalize(self) -> None:
        pass

    def prepare_for_end_to_end(self) -> None:
        pass

    def neuron_counts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def routing(self) -> dict | None:
        return None

    def auxiliary_loss(self) -> torch.Tensor | None:
        return None

    @property
    def total_neurons(self) -> int:
        return 0

    @property
    def adds_per_token(self) -> int:
        return 0


class LatentWeightLinear(ConvertedModule):
    """A linear unit kept as quantised buffers, with a float *latent* weight during conversion.

    While `weight` (the latent, an (out, in) Parameter) exists, `_sync()` re-quantises it into the
    buffers whenever it changed (keyed on its storage and version counter), so the eval-mode forward
    runs the kernel on exactly what training left; `finalize()` drops it, and what remains is what is
    saved. A progress checkpoint taken mid-conversion holds the latent too, and loading one brings it
    back. Subclasses call `_init_latent(in, out)` in `__init__` and define `_quantize_latent()`, which
    writes their buffers from `self.weight` (`_sync` calls it under no_grad)."""

    unit_kind = "linear"

    def _init_latent(self, in_features: int, out_features: int) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("weight", None)
        self._quantized_version: tuple | None = None

    def start_from(self, weight: torch.Tensor, bias: torch.Tensor | None) -> "LatentWeightLinear":
        """Start from a dense (out, in) float weight and bias: the weight becomes the trainable latent,
        quantised into the buffers at once. Returns self."""
        self.weight = nn.Parameter(weight.detach().float().clone())
        if bias is not None:
            self.bias.data.copy_(bias.detach().float())
        self._sync()
        return self

    def _sync(self) -> None:
        """Re-quantise the latent weight into the buffers if it changed since the last time."""
        if self.weight is None:
            return
        key = (self.weight.data_ptr(), self.weight._version)
        if key == self._quantized_version:
            return
        with torch.no_grad():
            self._quantize_latent()
        self._quantized_version = key

    def finalize(self) -> None:
        """Drop the latent weight: from now on the layer is its quantised buffers and bias."""
        self._sync()
        self.weight = None
        self._quantized_version = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight" in state_dict and self.weight is None:  # a mid-conversion checkpoint
            self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
            self._quantized_version = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def is_converted(module: nn.Module, kind: str | None = None) -> bool:
    return isinstance(module, ConvertedModule) and (kind is None or module.unit_kind == kind)


def converted_modules(model: nn.Module) -> list[ConvertedModule]:
    """Every module a variant put into `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, ConvertedModule)]


_WRAPPED_CLASSES: dict[tuple[type, type], type] = {}


def wrap_block(wrapper: type, block: nn.Module) -> nn.Module:
    """`block` turned into a `wrapper` (a ConvertedModule of unit_kind "block") in place: its class
    becomes a subclass of both, so it keeps its parts at the same paths, `super().forward` inside the
    wrapper runs the original block, and transformers still records its output as the block's hidden
    state (it hooks blocks by their class). The caller adds the wrapper's own parameters."""
    key = (wrapper, type(block))
    if key not in _WRAPPED_CLASSES:
        _WRAPPED_CLASSES[key] = type(f"{wrapper.__name__}[{type(block).__name__}]", (wrapper, type(block)), {})
    block.__class__ = _WRAPPED_CLASSES[key]
    return block
