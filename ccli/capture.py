"""Capturing a unit's real inputs from a model's forward passes, for distillation and measurement.

Two kinds, one interface (`draw` a training batch, `run` a module on some or all of it, `targets`,
and `error`, the distillation loss that suits the rows):
- `TokenRows`: the real (non-padding) token rows (tokens, features) reaching a module: FFN and
  linear units, which act on every token alike;
- `BlockCalls`: whole calls of a block: its hidden states (batch, seq, H), the real-token mask and
  every keyword argument the model passed (attention mask, position embeddings, ...), for units
  whose output depends on the whole sequence.

A forward pass stops as soon as the wanted module has its input (the rest of the model is not run).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch import nn

from .measure.errors import relative_error, token_relative_error


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted activations are captured."""


def _run_until(model: nn.Module, path: str, batches: list[dict], hook, enough) -> None:
    """Run `batches` through `model` until `enough()`, with `hook(batch, args, kwargs)` called at the
    input of the module at `path` (which ends each pass)."""
    current: dict = {}

    def pre_hook(module, args, kwargs):
        hook(current["batch"], args, kwargs)
        raise _Stop

    handle = model.get_submodule(path).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                current["batch"] = batch
                try:
                    model(**batch)
                except _Stop:
                    pass
                if enough():
                    break
    finally:
        handle.remove()


# While a routed block (ccli.variants.mod) runs its parts on the gathered sequence of its routed
# tokens, the (batch, k) bool mask of the gathered slots that hold a real routed token (the others
# are filler, computed and dropped). A module inside the block sees those rows, not the batch's.
_GATHERED: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("gathered_rows", default=None)


@contextlib.contextmanager
def gathered_rows(valid: torch.Tensor):
    """Within this block, modules run on a gathered sequence whose real slots are `valid` (batch, k)."""
    token = _GATHERED.set(valid)
    try:
        yield
    finally:
        _GATHERED.reset(token)


def real_rows(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Which rows of `x` (..., features), the input of some module, are real tokens: the batch's
    attention mask, or inside a routed block the gathered slots that hold routed tokens."""
    gathered = _GATHERED.get()
    if gathered is not None and tuple(x.shape[:-1]) == tuple(gathered.shape):
        return gathered.reshape(-1)
    return attention_mask.reshape(-1).bool()


def collect_inputs(model: nn.Module, path: str, batches: list[dict], tokens: int) -> torch.Tensor:
    """Up to `tokens` real (non-padding) inputs of the module at `path`: (tokens, features)."""
    captured: list[torch.Tensor] = []

    def hook(batch, args, kwargs):
        x = args[0]
        real = real_rows(x, batch["attention_mask"])
        captured.append(x.detach().reshape(-1, x.shape[-1])[real].float())

    _run_until(model, path, batches, hook, lambda: sum(len(c) for c in captured) >= tokens)
    return torch.cat(captured)[:tokens]


def collect_ffn_inputs(model: nn.Module, arch, layer: int, batches: list[dict], tokens: int) -> torch.Tensor:
    """Up to `tokens` real (non-padding) inputs of block `layer`'s FFN: (tokens, H)."""
    return collect_inputs(model, arch.blocks[layer].ffn.paths[0], batches, tokens)


@dataclass
class BlockCall:
    hidden: torch.Tensor  # (batch, seq, H)
    kwargs: dict  # everything else the model passed to the block (tensors detached)
    real: torch.Tensor  # (batch, seq) bool: the real (non-padding) tokens


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


def _is_cache(value) -> bool:
    """A decoder's KV cache object (the model's own, filled by the forward pass that was captured)."""
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


class TokenRows:
    """Token rows (tokens, features): a batch is `batch_tokens` rows drawn with replacement."""

    def __init__(self, x: torch.Tensor):
        self.data = x

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def tokens(self) -> int:
        return len(self)

    def draw(self, generator: torch.Generator, batch_tokens: int) -> torch.Tensor:
        return torch.randint(0, len(self), (min(batch_tokens, len(self)),), generator=generator)

    def run(self, module, index: torch.Tensor | None = None) -> torch.Tensor:
        if index is not None:
            return module(self.data[index])
        return torch.cat([module(chunk) for chunk in self.data.split(4096)])

    def targets(self, y: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        return y if index is None else y[index]

    # a unit's output rows (an FFN's, a linear's): squared errors pooled over tokens
    error = staticmethod(relative_error)


class BlockCalls:
    """Whole calls of a block: a batch is one captured call (a padded batch of sequences); outputs
    and targets are the real tokens' rows (tokens, H)."""

    def __init__(self, calls: list[BlockCall]):
        self.data = calls

    def __len__(self) -> int:
        return len(self.data)

    @property
    def tokens(self) -> int:
        return int(sum(c.real.sum() for c in self.data))

    def draw(self, generator: torch.Generator, batch_tokens: int) -> list[int]:
        return [int(torch.randint(0, len(self), (1,), generator=generator))]

    def _call(self, module, call: BlockCall) -> torch.Tensor:
        out = module(call.hidden, **call.kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out[call.real]

    def run(self, module, index: list[int] | None = None) -> torch.Tensor:
        picked = self.data if index is None else [self.data[i] for i in index]
        return torch.cat([self._call(module, c) for c in picked])

    def targets(self, y: torch.Tensor, index: list[int] | None = None) -> torch.Tensor:
        if index is None:
            return y
        starts = [0]
        for c in self.data:
            starts.append(starts[-1] + int(c.real.sum()))
        return torch.cat([y[starts[i]:starts[i + 1]] for i in index])

    # a block's output rows are residual-stream states, rescaled per token by the next norm: each
    # token's own relative error, averaged (a pooled error would weigh only the massive tokens)
    error = staticmethod(token_relative_error)


def collect_block_calls(model: nn.Module, path: str, batches: list[dict], tokens: int) -> BlockCalls:
    """Whole calls of the block at `path` until at least `tokens` real tokens are captured."""
    calls: list[BlockCall] = []

    def hook(batch, args, kwargs):
        hidden, rest = args[0], args[1:]
        if rest:  # positional arguments after the hidden states: keep them by name
            import inspect

            names = list(inspect.signature(model.get_submodule(path).forward).parameters)[1:]
            kwargs = {**dict(zip(names, rest)), **kwargs}
        kept = {k: _detach(v) for k, v in kwargs.items() if not _is_cache(v)}
        if "use_cache" in kept:  # a replayed call must not fill a cache: each call starts from nothing
            kept["use_cache"] = False
        calls.append(BlockCall(hidden.detach().float(), kept, batch["attention_mask"].bool()))

    _run_until(model, path, batches, hook, lambda: sum(int(c.real.sum()) for c in calls) >= tokens)
    return BlockCalls(calls)


def capture(model: nn.Module, unit, batches: list[dict], tokens: int):
    """A unit's real inputs: `BlockCalls` for block units, `TokenRows` otherwise."""
    if unit.captures_sequences:
        return collect_block_calls(model, unit.capture_path, batches, tokens)
    return TokenRows(collect_inputs(model, unit.capture_path, batches, tokens))
