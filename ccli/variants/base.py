"""The family protocol: what every variant family provides to the shared engine.

A family is three things, all declared here and written in its own `variants/<name>.py`:

- a **config**, a dataclass of `VariantConfig` whose fields (declared with `option`) are the family's
  CLI options and recipe keys, validated once, with one-line errors;
- a **`Variant`**, which names the *units* it replaces in a block, in forward order: whole FFNs
  (`FFNVariant`), single linears (`LinearVariant`) or whole blocks (`BlockVariant`); how each unit's
  inputs are captured (token rows for FFNs and linears; whole sequences with the attention mask and
  the block's keyword arguments for blocks, see ccli.capture); how the new module is built from the
  dense one; and how it is rebuilt empty on reload (`restore`);
- the **module** it puts into the model, a `ConvertedModule` (ccli.variants.module): one protocol
  for finalize, preparation for end-to-end training, and the work it does per token.

`ccli.variants.register(MyVariant)` (one line in `variants/__init__.py`) makes `--to NAME`, its
options, its recipe keys and its reload work everywhere.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import CcliError
from ..safety import block_index
from ..kernels.activations import ACTIVATIONS, activation_name, apply_activation  # noqa: F401  (re-exported)
from .module import ConvertedModule, converted_modules, is_converted, wrap_block  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from ..arch import ArchView

UNIT_KINDS = ("ffn", "linear", "block")


# -- the config ------------------------------------------------------------------------------------


def option(default: Any, help: str, *, low: float | None = None, high: float | None = None,
           choices: tuple | None = None) -> Any:
    """A config field that is also a CLI option (`--name-with-dashes`) and a recipe key."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices})


@dataclass
class VariantConfig:
    """Base of every family's config. Fields come from `option`; `check` adds cross-field rules."""

    family: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value, meta, flag = getattr(self, f.name), f.metadata, f"{self.family}: --{f.name.replace('_', '-')}"
            kind = type(f.default) if f.default is not MISSING else str
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
                what = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, kind.__name__)
                raise CcliError(f"{flag} must be {what} (got {value!r})")
            if meta.get("choices") and value not in meta["choices"]:
                raise CcliError(f"{flag} must be one of {', '.join(map(str, meta['choices']))} (got {value!r})")
            low, high = meta.get("low"), meta.get("high")
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"from {low} to {high}" if low is not None and high is not None else (
                    f">= {low}" if low is not None else f"<= {high}")
                raise CcliError(f"{flag} must be {bounds} (got {value!r})")
        self.check()

    def check(self) -> None:
        """Rules between fields; raise CcliError with one line."""

    @classmethod
    def options(cls) -> list:
        return list(fields(cls))

    @classmethod
    def from_params(cls, params: dict) -> "VariantConfig":
        known = {f.name for f in fields(cls)}
        for key in params:
            if key not in known:
                allowed = ", ".join("--" + k.replace("_", "-") for k in known)
                raise CcliError(f"--{key.replace('_', '-')} does not apply to {cls.family} (its options: {allowed})")
        return cls(**params)


# -- units and variants ----------------------------------------------------------------------------


@dataclass
class Unit:
    """One part of a model that a variant replaces: a whole FFN, one linear layer or a whole block.

    The distillation engine handles every unit the same way: it captures the unit's real inputs (of
    the module at `capture_path`: token rows for FFNs and linears, whole calls for blocks), computes
    the `teacher`'s outputs on them, builds the new module from them (`build(inputs, seed)`), trains
    it to match, and swaps it in (`install`)."""

    key: str  # manifest key: the block index for an FFN or a block, the module path for a linear
    block: int
    kind: str  # one of UNIT_KINDS
    capture_path: str
    teacher: Callable
    build: Callable[[Any, int], nn.Module]
    install: Callable[[nn.Module], None]
    spec: dict  # what the manifest records to rebuild the new module (see Variant.restore)

    @property
    def captures_sequences(self) -> bool:
        return self.kind == "block"

    @property
    def label(self) -> str:
        return {"ffn": f"layer {self.block} FFN", "block": f"block {self.block}"}.get(self.kind, self.key)


class Variant(ABC):
    """A variant family. Subclasses set `name`, `config` and `unit_kind` and implement `units`."""

    name: ClassVar[str] = ""
    config: ClassVar[type[VariantConfig]] = VariantConfig
    unit_kind: ClassVar[str] = ""
    # distillation settings (ccli.distill.DistillConfig fields) a conversion to this family alone starts
    # from, beneath a recipe's and the command line's
    distill_defaults: ClassVar[dict] = {}

    def __init__(self, **params):
        self.cfg = self.config.from_params(params)
        self.params = asdict(self.cfg)

    def spec(self) -> dict:
        """What the manifest records to rebuild a module: {'variant': name, **params}."""
        return {"variant": self.name, **self.params}

    def layers(self, n_blocks: int) -> list[int] | None:
        """The blocks this variant converts when neither the recipe step nor --layers says (None: all)."""
        return None

    @abstractmethod
    def units(self, arch: "ArchView", block: int) -> list[Unit]:
        """The parts of block `block` this variant replaces, in forward order (not yet replaced ones)."""

    def check_model(self, arch: "ArchView", blocks: list[int]) -> None:
        """Before any training: refuse, in one line, a model whose `blocks` this family cannot convert."""

    @classmethod
    @abstractmethod
    def restore(cls, arch: "ArchView", key: str, spec: dict) -> nn.Module:
        """Put an empty module of the shape `spec` describes where `key` says (to load saved tensors
        into); returns it."""


def _spec_value(spec: dict, key: str):
    try:
        return spec[key]
    except KeyError:
        raise CcliError(f"the manifest's {spec.get('variant')} entry lacks '{key}'") from None


def _block_index(arch: "ArchView", key: str) -> int:
    return block_index(key, len(arch.blocks), "ccli.json")


@dataclass
class DenseFFN:
    """A dense FFN's weights (nn.Linear layout, detached copies) and activation: the teacher of one layer.
    Gated FFNs (LLaMA family) compute act(gate(x)) * up(x) as their neurons."""

    w_in: torch.Tensor  # (I, H)
    b_in: torch.Tensor | None
    w_out: torch.Tensor  # (H, I)
    b_out: torch.Tensor | None
    activation: str
    w_gate: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None

    @classmethod
    def from_view(cls, ffn) -> "DenseFFN":
        w = ffn.dense_weights()
        copy_ = lambda t: None if t is None else t.detach().clone().float()  # noqa: E731
        return cls(copy_(w["w_in"]), copy_(w["b_in"]), copy_(w["w_out"]), copy_(w["b_out"]), activation_name(ffn.act),
                   copy_(w.get("w_gate")), copy_(w.get("b_gate")))

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    @property
    def hidden_size(self) -> int:
        return self.w_in.shape[1]

    @property
    def width(self) -> int:
        return self.w_in.shape[0]

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate = apply_activation(nn.functional.linear(x, self.w_gate, self.b_gate), self.activation)
            return gate * nn.functional.linear(x, self.w_in, self.b_in)
        return apply_activation(nn.functional.linear(x, self.w_in, self.b_in), self.activation)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.activations(x), self.w_out, self.b_out)


class FFNVariant(Variant):
    """A family that replaces whole FFNs: implement `init_from_dense` and `skeleton`."""

    unit_kind = "ffn"

    @abstractmethod
    def init_from_dense(self, dense: DenseFFN, x: torch.Tensor, seed: int) -> ConvertedModule:
        """A new layer initialised from the dense FFN and sample inputs x (tokens, H) of this layer."""

    @classmethod
    @abstractmethod
    def skeleton(cls, hidden_size: int, spec: dict) -> ConvertedModule:
        """An uninitialised module of the shape `spec` describes."""

    def check_dense(self, dense: DenseFFN) -> None:
        """Refuse an FFN this family cannot convert (one-line CcliError)."""

    def check_model(self, arch, blocks: list[int]) -> None:
        for i in blocks:
            if arch.blocks[i].ffn.replaced is None:
                self.check_dense(DenseFFN.from_view(arch.blocks[i].ffn))

    def units(self, arch, block: int) -> list[Unit]:
        ffn = arch.blocks[block].ffn
        if ffn.replaced is not None:
            return []
        dense = DenseFFN.from_view(ffn)
        self.check_dense(dense)
        return [Unit(str(block), block, "ffn", ffn.paths[0], dense,
                     lambda x, seed: self.init_from_dense(dense, x, seed), ffn.replace,
                     {**self.spec(), "activation": dense.activation, "gated": dense.gated})]

    @classmethod
    def restore(cls, arch, key: str, spec: dict) -> nn.Module:
        module = cls.skeleton(arch.hidden_size, spec)
        arch.blocks[_block_index(arch, key)].ffn.replace(module)
        return module


class LinearVariant(Variant):
    """A family that replaces linear layers inside blocks. Its config's `targets` (ffn, attention or
    all) picks which of the adapters' linears it takes."""

    unit_kind = "linear"

    @abstractmethod
    def init_from_dense(self, linear: nn.Module, x: torch.Tensor, seed: int) -> ConvertedModule:
        """A new module standing for `linear` (nn.Linear or GPT-2 Conv1D), from sample inputs x (tokens, in)."""

    @classmethod
    @abstractmethod
    def skeleton(cls, hidden_size: int, spec: dict) -> ConvertedModule:
        """An uninitialised module of the shape `spec` describes."""

    def units(self, arch, block: int) -> list[Unit]:
        units = []
        for path, linear in arch.blocks[block].linears(self.params.get("targets", "all")).items():
            units.append(self.linear_unit(arch, block, path, linear))
        return units

    def linear_unit(self, arch, block: int, path: str, linear: nn.Module) -> Unit:
        """The unit that replaces `linear` at model path `path` (counted with block `block`)."""
        from ..arch import linear_weight

        weight, bias = linear_weight(linear)
        weight = weight.detach().clone().float()
        bias = None if bias is None else bias.detach().clone().float()
        return Unit(
            path, block, "linear", path,
            lambda x, w=weight, b=bias: nn.functional.linear(x, w, b),
            lambda x, seed, linear=linear: self.init_from_dense(linear, x, seed),
            lambda module, path=path: arch.model.set_submodule(path, module),
            {**self.spec(), "in_features": weight.shape[1], "out_features": weight.shape[0], "bias": bias is not None},
        )

    @classmethod
    def restore(cls, arch, key: str, spec: dict) -> nn.Module:
        try:
            arch.model.get_submodule(key)
        except AttributeError:
            raise CcliError(f"the manifest names a linear {key} that the model does not have") from None
        module = cls.skeleton(arch.hidden_size, spec)
        arch.model.set_submodule(key, module)
        return module


class BlockVariant(Variant):
    """A family that replaces whole blocks (attention and FFN), e.g. routing tokens around them.

    Its units capture whole calls of the block: the hidden states of every sequence with the
    attention mask and the block's keyword arguments (position embeddings, ...). The teacher is the
    block as it was before (a copy). The new module must keep the block's parts at their paths:
    `wrap(block, spec)` turns the block into the family's module in place (see `wrap_block`) and adds
    the family's own parameters; `init_from_block` then initialises them from captured calls."""

    unit_kind = "block"

    @classmethod
    @abstractmethod
    def wrap(cls, block: nn.Module, spec: dict) -> ConvertedModule:
        """`block` as this family's module, its own parameters not yet initialised."""

    def init_from_block(self, module: ConvertedModule, calls, seed: int) -> None:
        """Initialise the wrapped block's own parameters from captured calls (ccli.capture.BlockCalls)."""

    def units(self, arch, block: int) -> list[Unit]:
        view = arch.blocks[block]
        if is_converted(view.module, "block"):
            return []
        teacher = copy.deepcopy(view.module)
        spec = self.spec()

        def build(calls, seed, view=view):
            module = self.wrap(copy.deepcopy(view.module), spec)
            torch.manual_seed(seed)
            self.init_from_block(module, calls, seed)
            return module

        return [Unit(str(block), block, "block", view.path, teacher, build, view.replace, spec)]

    @classmethod
    def restore(cls, arch, key: str, spec: dict) -> nn.Module:
        view = arch.blocks[_block_index(arch, key)]
        module = cls.wrap(view.module, spec)
        view.replace(module)
        return module
