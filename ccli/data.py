"""Text for measurement and (in later versions) distillation, bundled so everything runs offline."""

from __future__ import annotations

from importlib import resources


def sample_text() -> str:
    """A few paragraphs of varied English (written for ccli; same license as ccli) used as default
    profile and bench input, so activation statistics come from real text, not random token ids."""
    return resources.files("ccli").joinpath("corpus/sample.txt").read_text(encoding="utf-8")
