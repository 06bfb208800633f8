"""Reference variants every bench table carries next to a model: what a user would pick instead
(torch's dynamic int8 quantization) and the physical floor for FFN-side conditional compute (every
FFN replaced by nothing)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .arch import RemovedFFN, view

BASELINES = ("int8-dynamic", "ffn-removed")


def int8_dynamic(model: nn.Module) -> nn.Module:
    """torch's dynamic int8 quantization of every nn.Linear (weights int8, activations quantized on
    the fly): the usual one-line CPU speedup. GPT-2's Conv1D layers are not nn.Linear and stay fp32."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def ffn_removed(model: nn.Module) -> nn.Module:
    """A copy of `model` whose every feed-forward block is replaced by nothing (adds zero)."""
    floor = copy.deepcopy(model)
    for ffn in view(floor).ffns():
        ffn.replace(RemovedFFN())
    return floor


def build(name: str, model: nn.Module) -> nn.Module:
    return {"int8-dynamic": int8_dynamic, "ffn-removed": ffn_removed}[name](model)
