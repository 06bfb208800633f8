"""Variant families: each module says how its conditional module is built from the dense part, how
it is rebuilt empty for reloading, and what it trains on (the protocol: ccli.variants.base).
`FAMILIES` maps `--to NAME` to the family; a family joins with one `register` line below."""

from __future__ import annotations

from .base import BlockVariant, ConvertedModule, FFNVariant, LinearVariant, Variant, VariantConfig
from .fff import FFFVariant
from .int8 import Int8Variant
from .mod import MoDVariant
from .moe import MoEVariant
from .ternary import TernaryVariant

FAMILIES: dict[str, type[Variant]] = {}


def register(family: type[Variant]) -> type[Variant]:
    """Make `family` available as `--to family.name`, with its config's options and recipe keys."""
    from ..errors import CcliError

    if not family.name or family.config.family != family.name:
        raise CcliError(f"a variant family needs a name that its config's `family` repeats (got {family.name!r})")
    FAMILIES[family.name] = family
    return family


register(FFFVariant)
register(TernaryVariant)
register(MoDVariant)
register(MoEVariant)
register(Int8Variant)

__all__ = ["FAMILIES", "BlockVariant", "ConvertedModule", "FFNVariant", "LinearVariant", "Variant", "VariantConfig",
           "register"]
