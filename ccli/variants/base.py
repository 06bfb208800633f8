"""What every FFN-replacing variant family provides to the shared distillation engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CcliError

ACTIVATIONS = {  # activation module class name in transformers -> kernel activation name
    "GELUActivation": "gelu",
    "GELU": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "ReLU": "relu",
    "SiLU": "silu",
    "SiLUActivation": "silu",
}


def activation_name(module: nn.Module) -> str:
    name = type(module).__name__
    if name not in ACTIVATIONS:
        raise CcliError(f"unsupported FFN activation {name}: ccli handles {', '.join(sorted(set(ACTIVATIONS.values())))}")
    return ACTIVATIONS[name]


def apply_activation(z: torch.Tensor, name: str) -> torch.Tensor:
    if name == "gelu":
        return nn.functional.gelu(z)
    if name == "gelu_tanh":
        return nn.functional.gelu(z, approximate="tanh")
    if name == "relu":
        return torch.relu(z)
    if name == "silu":
        return nn.functional.silu(z)
    raise CcliError(f"unknown activation '{name}'")


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


class FFNVariant(ABC):
    """A family that replaces whole FFNs. Subclasses set `name` and implement the two methods below."""

    name = ""

    def __init__(self, **params):
        self.params = params

    def spec(self) -> dict:
        """What the manifest records to rebuild a layer: {'variant': name, **params}."""
        return {"variant": self.name, **self.params}

    @abstractmethod
    def init_from_dense(self, dense: DenseFFN, x: torch.Tensor, seed: int) -> nn.Module:
        """A new layer initialised from the dense FFN and sample inputs x (tokens, H) of this layer."""

    @classmethod
    @abstractmethod
    def skeleton(cls, hidden_size: int, spec: dict) -> nn.Module:
        """An uninitialised layer of the shape `spec` describes, to load saved weights into."""
