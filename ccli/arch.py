"""Architecture adapters: one uniform view of where the parts of each model family live.

`view(model)` returns an `ArchView` with the model's embeddings and, for every block, its attention
(and the projection linears inside it) and its feed-forward block (input linear(s), activation,
output linear). Everything that measures or rewrites a model goes through this view, so adding a
model family means adding one `Family` entry here and nothing else.

A feed-forward block is swapped with `FFNView.replace(module)`, where `module` maps (..., H) to
(..., H) and stands for the whole FFN (input linears, activation and output linear). The FFN keeps
the same module paths after a swap, so profile and bench attribute its cost the same way. A whole
block is swapped with `BlockView.replace(module)`; block variants wrap the block so that its parts
keep their paths too (variants.base.wrap_block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import CcliError
from .variants.module import is_converted


def linear_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) of an nn.Linear or a GPT-2 style Conv1D (which stores (in, out))."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias
    if type(layer).__name__ == "Conv1D":
        return layer.weight.t(), layer.bias
    if is_converted(layer, "linear"):  # a converted linear (e.g. ternary): its effective weights
        return layer.dense_weight(), layer.bias
    raise TypeError(f"not a linear layer: {type(layer).__name__}")


def is_linear(layer: nn.Module) -> bool:
    """A dense linear layer (nn.Linear or GPT-2's Conv1D), not one ccli has converted."""
    return isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D"


def is_any_linear(layer: nn.Module) -> bool:
    """A linear layer, dense or converted by a linear variant (which keeps the linear's shape)."""
    return is_linear(layer) or is_converted(layer, "linear")


class RemovedFFN(nn.Module):
    """An FFN replaced by nothing: contributes zero, so only the residual path remains.

    Used for the FFN-removed floor, the physical limit of what FFN-side conditional compute can gain.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden)


@dataclass
class FFNView:
    block: nn.Module
    paths: list[str]  # module paths whose FLOPs and parameters are this FFN's
    inputs: list[nn.Module]  # [up] or, for gated FFNs, [gate, up]; empty once replaced
    act: nn.Module | None
    output: nn.Module | None
    gated: bool
    hidden_size: int
    width: int  # neurons in the FFN (the dense intermediate size, or all neurons of a converted layer)
    _install: Callable[[nn.Module], None]
    replaced: nn.Module | None = None  # the module that stands for the FFN after replace()

    def replace(self, module: nn.Module) -> None:
        self._install(module)
        self.replaced = module

    def dense_weights(self) -> dict[str, torch.Tensor | None]:
        """The dense FFN's weights in nn.Linear layout: w_in (I, H), b_in, w_out (H, I), b_out, and
        w_gate/b_gate for gated FFNs (then h = act(gate(x)) * up(x))."""
        if self.replaced is not None or self.output is None:
            raise CcliError("this feed-forward block was already converted; its dense weights are gone")
        weights: dict[str, torch.Tensor | None] = {}
        if self.gated:
            weights["w_gate"], weights["b_gate"] = linear_weight(self.inputs[0])
        weights["w_in"], weights["b_in"] = linear_weight(self.inputs[-1])
        weights["w_out"], weights["b_out"] = linear_weight(self.output)
        return weights

    @property
    def converted(self) -> bool:
        """Replaced whole by a variant, or holding linears a linear variant converted."""
        return self.replaced is not None or any(
            is_converted(m, "linear") for m in [*self.inputs, self.output] if m is not None)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN as it now is (replaced or not), through its own modules, without residual or norm."""
        if self.replaced is not None:
            return self.replaced(x)
        h = self.act(self.inputs[0](x)) * self.inputs[-1](x) if self.gated else self.act(self.inputs[-1](x))
        return self.output(h)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense FFN as a function of its input (without dropout, residual or norm)."""
        w = self.dense_weights()
        h = self.act(nn.functional.linear(x, w["w_in"], w["b_in"])) if not self.gated else (
            self.act(nn.functional.linear(x, w["w_gate"], w["b_gate"])) * nn.functional.linear(x, w["w_in"], w["b_in"])
        )
        return nn.functional.linear(h, w["w_out"], w["b_out"])


@dataclass
class AttentionView:
    module: nn.Module
    path: str
    linears: dict[str, nn.Module]  # path -> projection linear (q, k, v, out or fused qkv)


@dataclass
class BlockView:
    index: int
    module: nn.Module
    path: str
    attention: AttentionView
    ffn: FFNView
    _install: Callable[[nn.Module], None]

    @property
    def converted(self) -> bool:
        """Replaced or wrapped whole by a block-level variant."""
        return is_converted(self.module, "block")

    def replace(self, module: nn.Module) -> None:
        """Put `module` in this block's place. It must keep the block's parts at their paths (a block
        variant wraps the block, see variants.base.wrap_block). Hooks on the old block (transformers
        records each block's output as a hidden state through one) move to the new one unless it is
        the same module or already has its own."""
        old = self.module
        if module is not old:
            for name in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                         "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
                if getattr(old, name, None) and not getattr(module, name, None):
                    getattr(module, name).update(getattr(old, name))
        self._install(module)
        self.module = module

    def linears(self, targets: str = "all") -> dict[str, nn.Module]:
        """This block's dense linear layers by model path, in forward order: targets 'ffn', 'attention' or 'all'."""
        if targets not in ("ffn", "attention", "all"):
            raise CcliError(f"unknown linear targets '{targets}': choose ffn, attention or all")
        found: dict[str, nn.Module] = {}
        if targets in ("attention", "all"):
            found.update({p: m for p, m in self.attention.linears.items() if is_linear(m)})
        if targets in ("ffn", "all") and self.ffn.replaced is None:
            for path in self.ffn.paths:
                for name, mod in self.module.get_submodule(path[len(self.path) + 1 :]).named_modules():
                    if is_linear(mod):
                        found[f"{path}.{name}" if name else path] = mod
        return found


@dataclass
class ArchView:
    family: str
    model: nn.Module
    embeddings: dict[str, nn.Module]  # path -> module
    blocks: list[BlockView]

    @property
    def hidden_size(self) -> int:
        return self.blocks[0].ffn.hidden_size

    def ffns(self) -> list[FFNView]:
        return [b.ffn for b in self.blocks]

    def linears(self, targets: str = "all") -> dict[str, nn.Module]:
        """Dense linear layers by path inside blocks: targets 'ffn', 'attention' or 'all'."""
        found: dict[str, nn.Module] = {}
        for block in self.blocks:
            found.update(block.linears(targets))
        return found


@dataclass(frozen=True)
class Family:
    """Where the parts of one model family live, as attribute paths relative to the base model /
    to one block."""

    blocks: str
    embeddings: tuple[str, ...]
    attention: str
    attention_linears: tuple[str, ...]
    ffn_kind: str  # "split": BERT-style intermediate + output.dense; "module": one FFN module
    ffn: str  # "split": the intermediate module; "module": the FFN module
    ffn_inputs: tuple[str, ...]  # relative to the FFN module ("split": to the block)
    ffn_act: str
    ffn_output: str
    gated: bool = False


_BERT = Family(
    blocks="encoder.layer",
    embeddings=("embeddings",),
    attention="attention",
    attention_linears=("self.query", "self.key", "self.value", "output.dense"),
    ffn_kind="split",
    ffn="intermediate",
    ffn_inputs=("intermediate.dense",),
    ffn_act="intermediate.intermediate_act_fn",
    ffn_output="output.dense",
)
_LLAMA = Family(
    blocks="layers",
    embeddings=("embed_tokens",),
    attention="self_attn",
    attention_linears=("q_proj", "k_proj", "v_proj", "o_proj"),
    ffn_kind="module",
    ffn="mlp",
    ffn_inputs=("gate_proj", "up_proj"),
    ffn_act="act_fn",
    ffn_output="down_proj",
    gated=True,
)
FAMILIES: dict[str, Family] = {
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": Family(
        blocks="transformer.layer",
        embeddings=("embeddings",),
        attention="attention",
        attention_linears=("q_lin", "k_lin", "v_lin", "out_lin"),
        ffn_kind="module",
        ffn="ffn",
        ffn_inputs=("lin1",),
        ffn_act="activation",
        ffn_output="lin2",
    ),
    "gpt2": Family(
        blocks="h",
        embeddings=("wte", "wpe"),
        attention="attn",
        attention_linears=("c_attn", "c_proj"),
        ffn_kind="module",
        ffn="mlp",
        ffn_inputs=("c_fc",),
        ffn_act="act",
        ffn_output="c_proj",
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}


def has_lm_head(model: nn.Module) -> bool:
    """Whether `model` ends in a language-model head (transformers' output embeddings)."""
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is not None


def family_of(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise CcliError(f"unsupported model family '{model_type}': ccli supports {supported}")
    return model_type


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def view(model: nn.Module) -> ArchView:
    """The uniform view of a transformers model (a base model or one with a head)."""
    family_name = family_of(model)
    fam = FAMILIES[family_name]
    names = {id(m): n for n, m in model.named_modules()}
    base = model.base_model

    embeddings = {}
    for attr in fam.embeddings:
        module = base.get_submodule(attr)
        embeddings[names[id(module)]] = module

    blocks = []
    block_list = base.get_submodule(fam.blocks)
    for index, block in enumerate(block_list):
        block_path = names[id(block)]
        attn = block.get_submodule(fam.attention)
        attention = AttentionView(
            attn,
            _join(block_path, fam.attention),
            {_join(block_path, fam.attention, lin): attn.get_submodule(lin) for lin in fam.attention_linears},
        )
        install = lambda module, index=index: block_list.__setitem__(index, module)  # noqa: E731
        blocks.append(BlockView(index, block, block_path, attention, _ffn_view(fam, block, block_path), install))
    if not blocks:
        raise CcliError(f"the {family_name} model has no transformer blocks")
    return ArchView(family_name, model, embeddings, blocks)


def _ffn_view(fam: Family, block: nn.Module, block_path: str) -> FFNView:
    if fam.ffn_kind == "split":
        # BERT's FFN is split over `intermediate` (dense + act) and `output.dense`; `output` also
        # holds the residual add and LayerNorm, which stay. A replacement takes output.dense's place
        # and `intermediate` becomes the identity, so output.dense(intermediate(x)) = new(x).
        out_parent, out_attr = fam.ffn_output.rsplit(".", 1)
        owner = block
        paths = [_join(block_path, fam.ffn), _join(block_path, fam.ffn_output)]

        def install(module: nn.Module) -> None:
            setattr(owner, fam.ffn, nn.Identity())
            setattr(owner.get_submodule(out_parent), out_attr, module)

        current = block.get_submodule(fam.ffn_output)
        replaced = isinstance(block.get_submodule(fam.ffn), nn.Identity)
        host = block
    else:
        host = block.get_submodule(fam.ffn)
        paths = [_join(block_path, fam.ffn)]
        parent, _, attr = fam.ffn.rpartition(".")
        owner = block.get_submodule(parent) if parent else block

        def install(module: nn.Module) -> None:
            setattr(owner, attr, module)

        current = host
        replaced = not any(is_any_linear(m) for m in host.modules()) or is_converted(host, "ffn")

    if replaced:
        hidden = getattr(current, "hidden_size", None) or _hidden_of(block)
        return FFNView(block, paths, [], None, None, fam.gated, hidden, getattr(current, "total_neurons", 0), install, current)
    inputs = [host.get_submodule(p) for p in fam.ffn_inputs]
    output = block.get_submodule(fam.ffn_output) if fam.ffn_kind == "split" else host.get_submodule(fam.ffn_output)
    act = block.get_submodule(fam.ffn_act) if fam.ffn_kind == "split" else host.get_submodule(fam.ffn_act)
    w_in, _ = linear_weight(inputs[-1])
    return FFNView(block, paths, inputs, act, output, fam.gated, w_in.shape[1], w_in.shape[0], install)


def _hidden_of(block: nn.Module) -> int:
    for module in block.modules():
        if is_linear(module):
            return linear_weight(module)[0].shape[1]
    raise CcliError("cannot tell the hidden size of a block with no linear layers")
