"""What a loaded model is (`Loaded`) and which transformers class holds it: shared by hub (names,
aliases, the Hub) and checkpoint (directories ccli saved), so neither imports the other's internals."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Loaded:
    """A loaded model and what ccli knows about where it came from."""

    model: torch.nn.Module
    tokenizer: object | None
    name: str  # what the user asked for
    source: str  # directory or Hub id the weights came from ("random-init" when none)
    random_init: bool = False
    manifest: dict | None = None  # what ccli converted, when this is a converted checkpoint


def model_class(config):
    """Base model for encoders (what sentence embedders use), causal LM for decoders."""
    from transformers import AutoModel, AutoModelForCausalLM

    if getattr(config, "is_decoder", False) or config.model_type in ("gpt2", "llama", "mistral", "qwen2"):
        return AutoModelForCausalLM
    return AutoModel
