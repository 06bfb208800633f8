"""ccli: conditional computation for transformer models: convert, profile, benchmark.

Python API (the CLI is a thin layer over these):
    model, tokenizer = ccli.load("minilm")
    ccli.profile("minilm")        -> list of profile records
    ccli.bench("minilm")          -> list of bench records
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import CcliError


def load(name_or_path: str | None = None, *, random_init: bool = False):
    """Load a model by alias, local directory or Hub id; returns (model, tokenizer)."""
    from .hub import load as _load

    loaded = _load(name_or_path, random_init=random_init)
    return loaded.model, loaded.tokenizer


def profile(*args, **kwargs):
    from .api import profile as _profile

    return _profile(*args, **kwargs)


def bench(*args, **kwargs):
    from .api import bench as _bench

    return _bench(*args, **kwargs)


profile.__doc__ = "Parameters, FLOPs per token by component and active neurons per token (see ccli.api.profile)."
bench.__doc__ = "End-to-end latency, tokens/s and peak memory against int8 and the FFN-removed floor (see ccli.api.bench)."

__all__ = ["CcliError", "load", "profile", "bench", "__version__"]
