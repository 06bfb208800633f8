"""The one activation table of ccli: which activations the kernels implement, and which module of a
transformers model stands for which of them.

- `NAMES`: the kernels' activation names, "gelu" (exact, erf), "gelu_tanh", "relu" and "silu". Every
  backend of every op that takes an activation (reference, native C++, Triton) implements each of them.
- `FUNCTIONS`: name -> the PyTorch function (what the references and the training paths apply).
- `ACTIVATIONS`: activation module class name in transformers -> kernel name; `activation_name(module)`
  reads it (raises CcliError for a module ccli does not handle).
- `apply_activation(z, name)`: FUNCTIONS[name](z) (raises CcliError for an unknown name).

ccli.variants.base re-exports ACTIVATIONS, activation_name and apply_activation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ccli.errors import CcliError

__all__ = ["ACTIVATIONS", "FUNCTIONS", "NAMES", "activation_name", "apply_activation"]

FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
NAMES: tuple[str, ...] = tuple(FUNCTIONS)

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
    """The kernel activation name of a transformers activation module."""
    name = type(module).__name__
    if name not in ACTIVATIONS:
        raise CcliError(f"unsupported FFN activation {name}: ccli handles {', '.join(sorted(set(ACTIVATIONS.values())))}")
    return ACTIVATIONS[name]


def apply_activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """Activation `name` (one of NAMES) applied to z."""
    fn = FUNCTIONS.get(name)
    if fn is None:
        raise CcliError(f"unknown activation '{name}'")
    return fn(z)
