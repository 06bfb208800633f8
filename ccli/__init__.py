"""ccli: conditional computation for transformer models: convert, profile, benchmark.

Python API (the CLI is a thin layer over these):
    model, tokenizer = ccli.load("minilm")
    ccli.profile("minilm")        -> list of profile records
    ccli.bench("minilm")          -> list of bench records
    ccli.compare(["DIR"], baselines=True) -> one record per row, Pareto frontier marked
"""

from __future__ import annotations

from ._version import __version__

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


def convert(*args, **kwargs):
    from .conversion import convert as _convert

    return _convert(*args, **kwargs)


def evaluate(*args, **kwargs):
    from .conversion import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def compare(*args, **kwargs):
    from .frontier import compare_models

    return compare_models(*args, **kwargs)


convert.__doc__ = "Convert a model's FFNs into a conditional-compute variant by distillation (see ccli.conversion.convert)."
evaluate.__doc__ = "Fidelity of a converted model directory to its base model (see ccli.conversion.evaluate)."
profile.__doc__ = "Parameters, FLOPs per token by component and active neurons per token (see ccli.api.profile)."
compare.__doc__ = ("Fidelity, FLOPs, weights and interleaved latency of models and baselines against one base model, "
                   "with the Pareto frontier marked (see ccli.frontier.compare_models).")
bench.__doc__ = "End-to-end latency, tokens/s and peak memory against int8 and the FFN-removed floor (see ccli.api.bench)."

__all__ = ["CcliError", "load", "profile", "bench", "convert", "evaluate", "compare", "__version__"]
