"""Variant families: each module says how its conditional layer is built from the dense part, how it
is rebuilt empty for reloading, and what it trains on. `FAMILIES` maps `--to NAME` to the family."""

from __future__ import annotations

from .base import FFNVariant, LinearVariant, Variant
from .fff import FFFVariant
from .ternary import TernaryVariant

FAMILIES: dict[str, type[Variant]] = {"fff": FFFVariant, "ternary": TernaryVariant}

__all__ = ["FAMILIES", "FFNVariant", "LinearVariant", "Variant"]
