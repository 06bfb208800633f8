"""Mixture-of-Depths on decoders: a causal per-token decision, and a K/V cache every token fills.

Top-k over a sequence (the encoder's rule, ccli.variants.mod) is not causal: whether token t is
among a sequence's best depends on tokens that come after it, which generation has not seen yet. A
decoder's routed block therefore decides per token, with a small **predictor** (a linear map H -> 1:
route when it scores above 0) fitted to reproduce the router's top-k choices on calibration
sequences (`ccli.variants.mod.fit_predictor`), as the paper does for sampling. The same rule runs in every forward
pass (training, prefill, decoding), so generation with the KV cache makes exactly the decisions a
full forward over the same tokens makes.

**K/V of skipped tokens.** Every token, routed or not, writes its keys and values to the routed
block's cache (the block's input norm and its K/V projections run on every token: for SmolLM2, 192
of 576 channels each with grouped K/V heads); only the routed tokens' queries, attention, output
projection and FFN run. So routed tokens attend over every earlier token, the cache of a routed
block is as long as any other (the model's causal masks and cache length stay valid), and nothing in
it is undefined. The alternative (skipped tokens leave no K/V, routed tokens attend to each other
only) is the paper's; on the encoder it had about twice the error at capacity 0.5 (docs/mod.md).

Two block layouts: LLaMA-family (`self_attn.{q,k,v,o}_proj`, rotary position embeddings, input and
post-attention norms, `mlp`) and GPT-2 (`ln_1`, `attn.c_attn` holding Q, K and V, `attn.c_proj`,
`ln_2`, `mlp`). Attention goes through transformers' own attention functions with the model's own
attention module, so grouped K/V heads, scaling and the configured implementation are the model's.
"""

from __future__ import annotations

import functools
import inspect
import sys
from abc import ABC, abstractmethod

import torch
from torch import nn

from ..capture import gathered_rows
from ..errors import CcliError


class DecoderParts(ABC):
    """Where a decoder block's attention and FFN parts are, and how each step runs on them (one
    subclass per block layout)."""

    def __init__(self, block: nn.Module):
        self.block = block

    @property
    @abstractmethod
    def attention(self) -> nn.Module:
        """The block's self-attention module (its layer_idx, scaling and config are used as they are)."""

    @abstractmethod
    def norm(self, x):
        """The block's input norm."""

    @abstractmethod
    def keys_values(self, normed, kwargs):
        """(keys, values) of every token, (batch, kv heads, seq, head dim), positions applied."""

    @abstractmethod
    def queries(self, normed_routed, index, kwargs):
        """Queries of the routed tokens (batch, heads, k, head dim), at their own positions `index`."""

    @abstractmethod
    def output(self, context):
        """The attention output projection of the routed tokens' context (batch, k, H)."""

    @abstractmethod
    def ffn(self, x):
        """x plus the block's FFN update (x is after attention's residual add)."""


class LlamaParts(DecoderParts):
    @property
    def attention(self):
        return self.block.self_attn

    def _rope(self, x, cos, sin):
        rotate = sys.modules[type(self.attention).__module__].apply_rotary_pos_emb
        return rotate(x, x, cos, sin)[0]  # the model's own rotation (the key slot's copy is dropped)

    def _split(self, y, batch, n):
        return y.view(batch, n, -1, self.attention.head_dim).transpose(1, 2)

    def norm(self, x):
        return self.block.input_layernorm(x)

    def keys_values(self, normed, kwargs):
        a, (batch, seq, _) = self.attention, normed.shape
        cos, sin = kwargs["position_embeddings"]
        keys = self._rope(self._split(a.k_proj(normed), batch, seq), cos, sin)
        return keys, self._split(a.v_proj(normed), batch, seq)

    def queries(self, normed_routed, index, kwargs):
        batch, k, _ = normed_routed.shape
        cos, sin = (_rows(t.expand(batch, *t.shape[1:]), index) for t in kwargs["position_embeddings"])
        return self._rope(self._split(self.attention.q_proj(normed_routed), batch, k), cos, sin)

    def output(self, context):
        return self.attention.o_proj(context)

    def ffn(self, x):
        return x + self.block.mlp(self.block.post_attention_layernorm(x))


class GPT2Parts(DecoderParts):
    """GPT-2: c_attn is a Conv1D (x @ W + b) whose columns are Q, K, V in that order; the K/V columns
    run on every token and the Q columns on the routed ones."""

    @property
    def attention(self):
        return self.block.attn

    def _columns(self, x, start, stop):
        c = self.attention.c_attn
        return torch.addmm(c.bias[start:stop], x.reshape(-1, x.shape[-1]), c.weight[:, start:stop]).view(
            *x.shape[:-1], stop - start)

    def _split(self, y):
        return y.view(*y.shape[:2], -1, self.attention.head_dim).transpose(1, 2)

    def norm(self, x):
        return self.block.ln_1(x)

    def keys_values(self, normed, kwargs):
        h = self.attention.split_size
        keys, values = self._columns(normed, h, 3 * h).split(h, dim=-1)
        return self._split(keys), self._split(values)

    def queries(self, normed_routed, index, kwargs):
        return self._split(self._columns(normed_routed, 0, self.attention.split_size))

    def output(self, context):
        return self.attention.resid_dropout(self.attention.c_proj(context))

    def ffn(self, x):
        return x + self.block.mlp(self.block.ln_2(x))


def decoder_parts(block: nn.Module) -> DecoderParts | None:
    """The block's parts if it is a decoder block mod can route (None for an encoder block)."""
    attn = getattr(block, "self_attn", None)
    if attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx")) \
            and hasattr(block, "input_layernorm") and hasattr(block, "post_attention_layernorm"):
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            raise CcliError(f"mod: {type(block).__name__} normalises its queries and keys, which mod does not route yet")
        return LlamaParts(block)
    attn = getattr(block, "attn", None)
    if attn is not None and hasattr(attn, "c_attn") and hasattr(block, "ln_1") and hasattr(block, "ln_2"):
        return GPT2Parts(block)
    if attn is not None or getattr(block, "self_attn", None) is not None:
        raise CcliError(f"mod: {type(block).__name__} is a decoder block of a layout mod does not route "
                        "(LLaMA-family and GPT-2 blocks are supported)")
    return None


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (batch, seq, ...) at positions index (batch, k)."""
    return x.gather(1, index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:]))


@functools.cache
def _positional_names(block_class: type) -> tuple[str, ...]:
    """The names of a block class's forward parameters after self and the hidden states (read once
    per class: every routed block's every forward binds its call)."""
    return tuple(inspect.signature(block_class.forward).parameters)[2:]


def bind_call(block: nn.Module, hidden_states, args, kwargs) -> dict:
    """The original block's keyword arguments, positional ones named (GPT-2's blocks take the cache
    and the mask by position) and the cache under one name, `cache`, whichever the version uses."""
    names = _positional_names(type(block).__bases__[-1])  # the block class wrap_block mixed in
    bound = {**dict(zip(names, args)), **kwargs}
    if "past_key_values" in bound and bound.get("cache") is None:
        bound["cache"] = bound.pop("past_key_values")
    return bound


def real_query_tokens(attention_mask, batch: int, seq: int, device) -> torch.Tensor:
    """(batch, seq) bool: which of the current tokens are real. A decoder block gets a causal mask
    (batch, 1, seq, past + seq); a real token may attend to itself (the diagonal of the current
    tokens' columns), padding may not. None: no padding."""
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    allowed = mask_allows(attention_mask)
    if allowed.dim() == 2:
        return allowed[:, -seq:]
    diag = torch.arange(seq, device=allowed.device)
    past = allowed.shape[-1] - seq
    return allowed.expand(batch, allowed.shape[1], seq, allowed.shape[-1])[:, 0, diag, past + diag]


def mask_allows(mask: torch.Tensor) -> torch.Tensor:
    """An attention or padding mask as bool, True where attending is allowed: bool masks as they
    are, 2-D padding masks where 1, additive float masks where not the dtype's minimum."""
    if mask.dtype == torch.bool:
        return mask
    if mask.dim() == 2:
        return mask > 0
    return mask > torch.finfo(mask.dtype).min / 2


def routed_query_mask(attention_mask, index, valid, past: int, kv_len: int, dtype) -> torch.Tensor:
    """The additive mask (batch, 1 or heads, k, kv_len) of the routed queries over every key: the
    rows of the model's causal mask at the routed positions, or (no mask given) causal by position.
    Unused slots may attend anywhere (their output is dropped) so that no row is empty."""
    batch, k = index.shape
    keys = torch.arange(kv_len, device=index.device)
    if attention_mask is not None and attention_mask.dim() == 4:
        allowed = mask_allows(attention_mask)
        allowed = allowed.expand(batch, allowed.shape[1], allowed.shape[2], kv_len)
        allowed = allowed.gather(2, index[:, None, :, None].expand(batch, allowed.shape[1], k, kv_len))
    else:
        allowed = keys[None, None, None, :] <= (past + index)[:, None, :, None]
        if attention_mask is not None:  # a 2-D padding mask over the keys
            allowed = allowed & mask_allows(attention_mask)[:, None, None, -kv_len:]
    allowed = allowed | ~valid[:, None, :, None]
    return torch.zeros((), dtype=dtype, device=index.device).masked_fill(~allowed, torch.finfo(dtype).min)


def routed_positions(routed: torch.Tensor):
    """(index, valid) for a (batch, seq) bool decision: each sequence's routed positions in
    increasing order, padded to the longest with position 0 (valid says which slots are used)."""
    counts = routed.sum(dim=1)
    k_max = int(counts.max()) if routed.numel() else 0
    order = torch.sort((~routed).to(torch.int8), dim=1, stable=True).indices[:, :k_max]
    valid = torch.arange(k_max, device=routed.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def run_routed(parts: DecoderParts, hidden: torch.Tensor, routed: torch.Tensor, bound: dict):
    """The block on the routed tokens with every token's K/V: (routed rows' outputs (batch, k, H),
    index, valid). K/V of every token go to the cache when there is one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = parts.attention
    batch, seq, _ = hidden.shape
    index, valid = routed_positions(routed)
    cache = bound.get("cache")
    if index.shape[1] == 0 and cache is None:
        return hidden[:, :0], index, valid
    normed = parts.norm(hidden)
    keys, values = parts.keys_values(normed, bound)
    if cache is not None:
        keys, values = cache.update(keys, values, attn.layer_idx)
    if index.shape[1] == 0:
        return hidden[:, :0], index, valid
    kv_len = keys.shape[-2]
    with gathered_rows(valid):
        queries = parts.queries(_rows(normed, index), index, bound)
    mask = routed_query_mask(bound.get("attention_mask"), index, valid, kv_len - seq, kv_len, queries.dtype)
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    context, _ = interface(attn, queries, keys, values, mask, dropout=0.0, scaling=attn.scaling)
    routed_in = _rows(hidden, index)
    with gathered_rows(valid):
        attended = routed_in + parts.output(context.reshape(batch, index.shape[1], -1).contiguous())
        return parts.ffn(attended), index, valid
