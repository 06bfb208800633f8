"""Active neurons per token in each feed-forward block, measured from what really runs.

For a dense FFN every neuron is computed; the interesting number is how many have a positive
activation (the others contribute little or nothing: the waste that conditional compute targets).
For gated FFNs the activation measured is act(gate(x)). Converted FFNs (ccli variants) report their
own counts through `neuron_counts`, which returns (computed, positive) per token. Routed FFNs (MoE)
also report which experts each token ran (`routing_mask`): each layer's expert load.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..arch import ArchView
from ..variants.module import ConvertedModule


@contextmanager
def record_activations(arch: ArchView):
    """Yields a list with, per block, a (tokens, neurons) computed mask and positive mask filled by hooks."""
    records: list[dict] = [dict() for _ in arch.blocks]
    handles = []
    for i, block in enumerate(arch.blocks):
        ffn = block.ffn
        if ffn.replaced is not None:
            def hook(module, args, output, i=i):
                counts = module.neuron_counts(args[0]) if isinstance(module, ConvertedModule) else None
                if counts is not None:
                    computed, positive = counts
                    records[i]["computed"] = computed.reshape(-1)
                    records[i]["positive"] = positive.reshape(-1)
                if hasattr(module, "routing_mask"):
                    with torch.no_grad():
                        records[i]["routing"] = module.routing_mask(args[0].reshape(-1, args[0].shape[-1]))

            handles.append(ffn.replaced.register_forward_hook(hook))
            continue

        def act_hook(module, args, output, i=i, width=ffn.width):
            flat = output.detach().reshape(-1, output.shape[-1])
            records[i]["positive"] = (flat > 0).sum(-1)
            records[i]["computed"] = torch.full_like(records[i]["positive"], width)

        handles.append(ffn.act.register_forward_hook(act_hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def active_neurons(arch: ArchView, inputs: dict[str, torch.Tensor]) -> list[dict]:
    """Per block: width, and computed / positive neurons per (non-padding) token: mean, min, max. For
    a routed FFN also its expert load: `expert_load` (the share of the tokens each expert ran on, in
    expert order), `experts_unused` (experts no token picked) and `load_max` (the busiest expert's
    share of tokens over the mean share, 1.0 = perfectly balanced)."""
    mask = inputs.get("attention_mask")
    with torch.no_grad(), record_activations(arch) as records:
        arch.model(**inputs)
    real = mask.reshape(-1).bool() if mask is not None else None
    rows = []
    for block, rec in zip(arch.blocks, records):
        row = {"layer": block.index, "width": block.ffn.width}
        for key in ("computed", "positive"):
            values = rec.get(key)
            if values is None:
                row[key] = row[f"{key}_min"] = row[f"{key}_max"] = None
                continue
            if real is not None and values.numel() == real.numel():
                values = values[real]
            values = values.float()
            row[key] = round(values.mean().item(), 2)
            row[f"{key}_min"] = int(values.min().item())
            row[f"{key}_max"] = int(values.max().item())
        routing = rec.get("routing")
        if routing is not None:
            if real is not None and routing.shape[0] == real.numel():
                routing = routing[real]
            load = routing.float().mean(0)
            row["expert_load"] = [round(v, 4) for v in load.tolist()]
            row["experts_unused"] = int((load == 0).sum())
            row["load_max"] = round(load.max().item() / max(load.mean().item(), 1e-12), 2)
        rows.append(row)
    return rows
