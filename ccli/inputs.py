"""Model inputs for profile and bench: real text through the model's tokenizer when it has one,
reproducible random token ids when it does not (e.g. a --random-init model with no tokenizer)."""

from __future__ import annotations

import torch

from .data import sample_text
from .errors import CcliError


def build_inputs(loaded, *, batch: int = 1, seq: int | None = 128, text: str | None = None, seed: int = 0) -> dict:
    """A dict of input tensors (input_ids, attention_mask) of shape (batch, seq).

    With a tokenizer: `text` (or the bundled sample text) is tokenized; when `seq` is given it is cut
    or padded to exactly `seq` tokens (the sample text is repeated so it fills `seq` with real text).
    Without a tokenizer: random token ids, which give the same FLOPs and timings but not realistic
    activation statistics.
    """
    if batch < 1:
        raise CcliError(f"--batch must be at least 1 (got {batch})")
    if seq is not None and seq < 1:
        raise CcliError(f"--seq must be at least 1 (got {seq})")
    model = loaded.model
    positions = max_positions(model.config)
    if seq is not None and positions and seq > positions:
        raise CcliError(f"--seq {seq} is longer than the model's {positions} positions")
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        if text is not None:
            raise CcliError(f"'{loaded.name}' has no tokenizer here, so --text cannot be used; drop --text")
        generator = torch.Generator().manual_seed(seed)
        length = seq or 128
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    if text is None:
        text = sample_text()
        if seq is not None:
            while len(tokenizer(text)["input_ids"]) < seq:
                text = text + "\n\n" + text
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"truncation": True, "max_length": seq, "padding": "max_length"} if seq else {"truncation": True}
    if seq is None and positions:
        kwargs["max_length"] = positions
    encoded = tokenizer([text] * batch, return_tensors="pt", **kwargs)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def fit_length(config, length: int) -> int:
    """`length` cut to the model's positions: longer sequences would index past its position embeddings."""
    positions = max_positions(config)
    return min(length, positions) if positions and positions > 0 else length


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if value:
            # RoBERTa reserves pad_token_id + 1 positions
            return value - 2 if config.model_type == "roberta" else value
    return None
