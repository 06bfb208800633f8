"""Parameters, weight bytes, FLOPs and additions split by model component (embeddings, attention,
FFN, other, head), through the architecture view: what `profile` and `convert` report."""

from __future__ import annotations

import torch

from ..arch import ArchView
from ..variants.module import ConvertedModule


def _param_count(module: torch.nn.Module, seen: set[int]) -> int:
    """Parameters and floating-point buffers of `module` not already counted (index buffers are not weights)."""
    total = 0
    for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel()
    return total


def parameters_by_component(arch: ArchView) -> dict[str, int]:
    """Parameters (and packed weight buffers) per component, each tensor counted once."""
    model = arch.model
    seen: set[int] = set()
    counts = {"embeddings": 0, "attention": 0, "ffn": 0}
    for module in arch.embeddings.values():
        counts["embeddings"] += _param_count(module, seen)
    for block in arch.blocks:
        counts["attention"] += _param_count(block.attention.module, seen)
        for path in block.ffn.paths:
            counts["ffn"] += _param_count(model.get_submodule(path), seen)
    counts["other"] = _param_count(model, seen)  # norms, pooler, heads: whatever is left
    counts["total"] = sum(counts.values())
    return counts


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, each tensor counted once, and of the packed weights of
    torch's dynamically quantized linears (kept outside parameters and buffers)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    for module in model.modules():
        if isinstance(module, DynamicQuantizedLinear):
            total += _quantized_linear_bytes(module)
    return total


def _quantized_linear_bytes(module) -> int:
    """int8 weights, their scales and zero points, and the float bias of a dynamically quantized linear."""
    weight, bias = module.weight(), module.bias()
    total = weight.numel() * weight.element_size()
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scales, zeros = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
        total += scales.numel() * scales.element_size() + zeros.numel() * zeros.element_size()
    else:
        total += 8  # one float32 scale and one int32 zero point
    if bias is not None:
        total += bias.numel() * bias.element_size()
    return total


def additions_by_component(arch: ArchView) -> dict[str, int]:
    """Additions/subtractions per token of the add-only layers (ternary linears), by component.

    FLOP counting (fvcore) counts multiply-accumulates; a ternary linear multiplies only in its
    per-output scaling, and its weight products are additions, counted here instead. Every ternary
    linear runs once per token position, so its additions per token are in_features x out_features."""
    parts = {"attention_proj": 0, "ffn": 0, "other": 0}
    attention = [b.attention.path + "." for b in arch.blocks]
    ffn = [p + "." for b in arch.blocks for p in b.ffn.paths] + [p for b in arch.blocks for p in b.ffn.paths]
    for name, module in arch.model.named_modules():
        if not isinstance(module, ConvertedModule):
            continue
        adds = module.adds_per_token
        if any(name.startswith(p) for p in attention):
            parts["attention_proj"] += adds
        elif any(name == p or name.startswith(p) for p in ffn):
            parts["ffn"] += adds
        else:
            parts["other"] += adds
    return parts


def flops_by_component(arch: ArchView, by_module: dict[str, int]) -> dict[str, int]:
    """Split fvcore's per-module FLOPs into components (whole input, not per token)."""
    def at(path: str) -> int:
        return by_module.get(path, 0)

    parts = {"embeddings": sum(at(p) for p in arch.embeddings)}
    parts["attention_proj"] = sum(at(p) for b in arch.blocks for p in b.attention.linears)
    parts["attention_scores"] = sum(at(b.attention.path) for b in arch.blocks) - parts["attention_proj"]
    parts["ffn"] = sum(at(p) for b in arch.blocks for p in b.ffn.paths)
    in_blocks = sum(at(b.path) for b in arch.blocks)
    parts["other"] = in_blocks - parts["attention_proj"] - parts["attention_scores"] - parts["ffn"]
    parts["head"] = by_module.get("", 0) - in_blocks - parts["embeddings"]  # "" is the whole model
    return parts
