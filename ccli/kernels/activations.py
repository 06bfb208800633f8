"""The one activation table: transformers' activation modules -> the names ccli's kernels know."""

from __future__ import annotations

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
