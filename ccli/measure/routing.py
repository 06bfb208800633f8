"""Tokens routed through each block by the block-level families that route tokens around blocks
(mod): what `profile` shows next to the FLOPs, measured by running the model on the same inputs."""

from __future__ import annotations

import torch

from ..arch import ArchView
from ..variants.module import is_converted


def routed_blocks(arch: ArchView, inputs: dict[str, torch.Tensor]) -> list[dict]:
    """For each block that routes tokens: {"block", "capacity", "tokens" it processed, "real_tokens"
    it was given} over the whole input (all sequences); [] when no block routes."""
    routers = [b for b in arch.blocks if is_converted(b.module, "block") and hasattr(b.module, "last_routing")]
    if not routers:
        return []
    with torch.no_grad():
        arch.model(**inputs)
    return [{"block": b.index, **b.module.routing()} for b in routers if b.module.routing() is not None]
