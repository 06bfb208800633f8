"""Save and reload converted models.

A converted model is saved as a directory: `model.safetensors` (every tensor of the model),
`config.json` (the base model's transformers config), the tokenizer files, and `ccli.json`, the
manifest of what was converted, where the model came from and how it was trained and measured. Its
`units` list every converted unit in the order it was converted: `key` (a block index for FFN and
block units, a module path for linears) and `spec` (the family, `variant`, and the module's shape).
`load_converted` rebuilds the base architecture from the config, lets each unit's family put an
empty module where its key says (`Variant.restore`), in the same order, and loads the tensors:
outputs are bit-identical to the model that was saved. Manifests of format 1 (`layers`: block index
-> FFN spec; `linears`: path -> linear spec) still load.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place only
when complete, so an interrupted save never leaves a half-written model or damages an old one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ._version import __version__
from .arch import view
from .errors import CcliError
from .loaded import Loaded, model_class
from .safety import (check_manifest, check_replaceable, check_tokenizer, has_tokenizer_files, install_dir,
                     one_line_write_errors, tmp_prefix)

MANIFEST = "ccli.json"
FORMAT = 2
READABLE_FORMATS = (1, 2)


@one_line_write_errors
def save_converted(model, tokenizer, out: str | Path, manifest: dict, *, overwrite: bool = False) -> Path:
    """Write `model` (with its converted layers), its tokenizer and `manifest` to `out` atomically."""
    from safetensors.torch import save_file

    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise CcliError(f"--out {out} already exists and is not empty; choose another directory or pass --overwrite")
    if overwrite:
        check_replaceable(out, base=manifest.get("base_source"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(out), dir=out.parent))
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        state = _untie(state)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "ccli": __version__})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        full = {"format": FORMAT, "ccli_version": __version__, **manifest}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        install_dir(tmp, out)  # atomic; the replaced directory's mode, or what mkdir would give
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _untie(state: dict) -> dict:
    """safetensors refuses tensors that share memory (tied embeddings): store each tensor separately."""
    seen: dict[int, str] = {}
    for key, value in state.items():
        ptr = value.data_ptr()
        if ptr in seen:
            state[key] = value.clone()
        else:
            seen[ptr] = key
    return state


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CcliError(f"cannot read the ccli manifest {path}: {exc}") from exc
    check_manifest(manifest, path, READABLE_FORMATS)
    return manifest


def manifest_units(manifest: dict) -> list[tuple[str, dict]]:
    """(key, spec) of every converted unit, in the order they were converted."""
    if manifest.get("format") == 1:  # whole FFNs first: linears may live inside them
        return [*manifest.get("layers", {}).items(), *manifest.get("linears", {}).items()]
    return [(unit["key"], unit["spec"]) for unit in manifest.get("units", [])]


def restore_unit(arch, key: str, spec: dict) -> torch.nn.Module:
    """Let the unit's family put an empty module where `key` says; returns it."""
    from .variants import FAMILIES

    family = FAMILIES.get(spec.get("variant"))
    if family is None:
        raise CcliError(f"the manifest names an unknown variant {spec.get('variant')!r}; known: {', '.join(FAMILIES)}")
    try:
        return family.restore(arch, key, spec)
    except KeyError as exc:
        raise CcliError(f"the manifest's {spec['variant']} entry lacks '{exc.args[0]}'") from exc
    except (TypeError, ValueError) as exc:
        raise CcliError(f"the manifest's {spec['variant']} entry is not a valid layer spec ({exc})") from exc


def load_converted(directory: str | Path, *, name: str | None = None, attn_implementation: str | None = None):
    """Rebuild a converted model saved by `save_converted`; returns a `hub.Loaded`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    directory = Path(directory)
    manifest = read_manifest(directory)
    config = AutoConfig.from_pretrained(directory)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = model_class(config).from_config(config, **extra)
    for key, spec in manifest_units(manifest):
        try:
            restore_unit(view(model), key, spec)
        except CcliError as exc:
            raise CcliError(f"{directory}: {exc}") from exc
    try:
        state = load_file(str(directory / "model.safetensors"))
    except Exception as exc:
        raise CcliError(f"cannot read {directory / 'model.safetensors'}: {exc}") from exc
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape than the manifest's layer spec says
        raise CcliError(f"{directory} does not match its manifest: {' '.join(str(exc).split())[:300]}") from exc
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CcliError(f"{directory} does not match its manifest: {len(missing)} missing and {len(unexpected)} unexpected tensors")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        tokenizer = None
    tokenizer = tokenizer if has_tokenizer_files(directory) else None  # saved without one: none, not a stand-in
    check_tokenizer(tokenizer, model, str(directory))
    return Loaded(model.float().eval(), tokenizer, name or str(directory), str(directory.resolve()), manifest=manifest)
