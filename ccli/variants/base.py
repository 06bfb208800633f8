"""What every variant family provides to the shared distillation engine: the units it replaces
(whole FFNs or single linears), how each is built from the dense part, and how it is rebuilt empty."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..errors import CcliError
from ..kernels.activations import ACTIVATIONS, activation_name, apply_activation  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from ..arch import ArchView

@dataclass
class DenseFFN:
    """A dense FFN's weights (nn.Linear layout, detached copies) and activation: the teacher of one layer."""

    w_in: torch.Tensor  # (I, H)
    b_in: torch.Tensor | None
    w_out: torch.Tensor  # (H, I)
    b_out: torch.Tensor | None
    activation: str

    @classmethod
    def from_view(cls, ffn) -> "DenseFFN":
        if ffn.gated:
            raise CcliError("converting gated FFNs (LLaMA family) is not supported yet: their neurons are act(gate)*up pairs")
        w = ffn.dense_weights()
        copy = lambda t: None if t is None else t.detach().clone().float()  # noqa: E731
        return cls(copy(w["w_in"]), copy(w["b_in"]), copy(w["w_out"]), copy(w["b_out"]), activation_name(ffn.act))

    @property
    def hidden_size(self) -> int:
        return self.w_in.shape[1]

    @property
    def width(self) -> int:
        return self.w_in.shape[0]

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        return apply_activation(nn.functional.linear(x, self.w_in, self.b_in), self.activation)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.activations(x), self.w_out, self.b_out)


@dataclass
class Unit:
    """One part of a model that a variant replaces: a whole FFN, or one linear layer.

    The distillation engine handles every unit the same way: it captures the unit's real inputs (the
    inputs of the module at `capture_path`), computes the dense `teacher`'s outputs on them, builds
    the new module from them (`build(x, seed)`), trains it to match, and swaps it in (`install`)."""

    key: str  # manifest key: the block index for an FFN, the module path for a linear
    block: int
    kind: str  # "ffn" or "linear"
    capture_path: str
    teacher: Callable[[torch.Tensor], torch.Tensor]
    build: Callable[[torch.Tensor, int], nn.Module]
    install: Callable[[nn.Module], None]
    spec: dict  # what the manifest records to rebuild the new module (see Variant.skeleton)


class Variant(ABC):
    """A variant family. Subclasses set `name` and `kind` and implement `units` and `skeleton`."""

    name = ""
    kind = ""  # "ffn": replaces whole FFNs (manifest key 'layers'); "linear": linears ('linears')

    def __init__(self, **params):
        self.params = params

    def spec(self) -> dict:
        """What the manifest records to rebuild a module: {'variant': name, **params}."""
        return {"variant": self.name, **self.params}

    @abstractmethod
    def units(self, arch: "ArchView", block: int) -> list[Unit]:
        """The parts of block `block` this variant replaces, in forward order (not yet replaced ones)."""

    @classmethod
    @abstractmethod
    def skeleton(cls, hidden_size: int, spec: dict) -> nn.Module:
        """An uninitialised module of the shape `spec` describes, to load saved weights into."""


class FFNVariant(Variant):
    """A family that replaces whole FFNs: implement `init_from_dense` (and `skeleton`)."""

    kind = "ffn"

    @abstractmethod
    def init_from_dense(self, dense: DenseFFN, x: torch.Tensor, seed: int) -> nn.Module:
        """A new layer initialised from the dense FFN and sample inputs x (tokens, H) of this layer."""

    def units(self, arch, block: int) -> list[Unit]:
        ffn = arch.blocks[block].ffn
        if ffn.replaced is not None:
            return []
        dense = DenseFFN.from_view(ffn)
        return [Unit(str(block), block, "ffn", ffn.paths[0], dense,
                     lambda x, seed: self.init_from_dense(dense, x, seed), ffn.replace,
                     {**self.spec(), "activation": dense.activation})]


class LinearVariant(Variant):
    """A family that replaces linear layers inside blocks. `targets` (ffn, attention or all) picks
    which of the adapters' linears it takes."""

    kind = "linear"

    @abstractmethod
    def init_from_dense(self, linear: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
        """A new module standing for `linear` (nn.Linear or GPT-2 Conv1D), from sample inputs x (tokens, in)."""

    def units(self, arch, block: int) -> list[Unit]:
        from ..arch import linear_weight

        units = []
        for path, linear in arch.blocks[block].linears(self.params.get("targets", "all")).items():
            weight, bias = linear_weight(linear)
            weight = weight.detach().clone().float()
            bias = None if bias is None else bias.detach().clone().float()
            units.append(Unit(
                path, block, "linear", path,
                lambda x, w=weight, b=bias: nn.functional.linear(x, w, b),
                lambda x, seed, linear=linear: self.init_from_dense(linear, x, seed),
                lambda module, path=path: arch.model.set_submodule(path, module),
                {**self.spec(), "in_features": weight.shape[1], "out_features": weight.shape[0], "bias": bias is not None},
            ))
        return units
