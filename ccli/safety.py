"""What ccli checks so that nothing a user had is lost and no silently wrong model is kept.

- Output directories (`--out`): checked before training (`prepare_out`): a usable path, a writable
  parent with room for the model, and, with `--overwrite`, only a directory ccli itself wrote (it
  holds a ccli manifest) that is neither the working directory, one of its parents, nor the base
  model's directory. Saves go to a hidden temporary sibling that replaces the output in one rename
  (`install_dir`); leftovers of an interrupted save are removed by the next run (`remove_leftovers`).
- Loading: a directory whose tensors were written by ccli but that lacks its manifest, a manifest
  that is not what ccli writes, a tokenizer that is not the model's own, are one-line errors;
  missing or unexpected tensors of a plain checkpoint are a warning.
- Progress checkpoints hold tensors and plain data only and are read with `weights_only=True`: no
  code runs while they load.
- Results: a model with non-finite weights or a non-finite fidelity is an error, not a saved model.

Warnings meant for the user are `CcliWarning`s; the CLI prints each on one line on stderr.
See docs/safety.md.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import re
import shutil
import stat
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from .errors import CcliError

MANIFEST = "ccli.json"


class CcliWarning(UserWarning):
    """A warning ccli wants the user to see (the CLI prints it as one line on stderr)."""


def warn(message: str) -> None:
    warnings.warn(message, CcliWarning, stacklevel=3)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# -- output directories ---------------------------------------------------------------------------

# Room asked for before training: the saved model, and next to it the progress checkpoints (the
# converted modules, their optimiser state during end-to-end training) and, when replacing, the old
# model until the new one is in place. Estimated from the base model's weight bytes.
SPACE_FACTOR = 2.0
SPACE_EXTRA_BYTES = 64 * 2**20  # config, tokenizer files, manifest


def check_out_arg(out) -> None:
    """`--out ""` (an unset variable, say) would resolve to the working directory: refuse it."""
    if out is not None and not str(out).strip():
        raise CcliError("--out is empty (an unset variable?); give the directory to save the converted model in")


def written_by_ccli(directory: Path) -> bool:
    """Whether `directory` holds a ccli manifest (a JSON object with a 'format'), i.e. ccli wrote it."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format" in manifest


def _inside(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def check_replaceable(out: str | Path, *, base: str | Path | None = None) -> None:
    """Refuse to replace `out` unless it is a directory ccli wrote (or an empty one) that is neither
    the working directory, one of its parents, nor (a parent of) the base model's directory."""
    out = Path(out).expanduser().resolve()
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise CcliError(f"--out {out} is a file, not a directory; --overwrite replaces only a directory ccli wrote")
    cwd = Path.cwd().resolve()
    if _inside(cwd, out):
        raise CcliError(f"--out {out} is the working directory or one of its parents; --overwrite will not replace it")
    if base is not None and Path(str(base)).expanduser().is_dir() and _inside(Path(str(base)).expanduser().resolve(), out):
        raise CcliError(f"--out {out} holds the base model being converted; choose another directory")
    if any(out.iterdir()) and not written_by_ccli(out):
        raise CcliError(f"--out {out} was not written by ccli (it has no {MANIFEST}); --overwrite replaces only "
                        "a directory ccli wrote: choose another directory or remove it yourself")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid < 2**22  # someone else's process, or a number no process can have
    return True


def tmp_prefix(out: Path) -> str:
    """Prefix of the hidden temporary directory a save writes to (next to `out`)."""
    return f".{out.name}.ccli-tmp{os.getpid()}."


# what a save writes into its temporary directory (a leftover of an older ccli has only these)
_SAVED_FILES = re.compile(r"(model\.safetensors|config\.json|ccli\.json|tokenizer.*|vocab.*|merges\.txt|"
                          r"special_tokens_map\.json|added_tokens\.json|spiece\.model|chat_template.*)")


def remove_leftovers(out: Path) -> list[Path]:
    """Remove what an interrupted run left next to `out`: the hidden temporary directory of a save
    (`.NAME.ccli-tmpPID.<random>`, or an older ccli's `.NAME.<8 random characters>`), half-written progress files
    (`.NAME.ccli-progress.N.pt.tmpPID`), and the old model a replacement set aside
    (`.NAME.oldPID`: removed once the new one is in place, put back when it is not). Only leftovers
    of processes that are gone are touched. Returns what was removed."""
    parent, name = out.parent, out.name
    if not parent.is_dir():
        return []
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(f".{name}."):
            continue
        rest = entry.name[len(name) + 2:]
        match = (re.fullmatch(r"ccli-tmp(\d+)\..+", rest) or re.fullmatch(r"ccli-progress\.\d+\.pt\.tmp(\d+)", rest)
                 or re.fullmatch(r"old(\d+)", rest))
        legacy = re.fullmatch(r"[a-z0-9_]{8}", rest) and entry.is_dir() and not entry.is_symlink() and all(
            p.is_file() and _SAVED_FILES.fullmatch(p.name) for p in entry.iterdir())
        if not (match and not _pid_alive(int(match.group(1)))) and not legacy:
            continue
        if rest.startswith("old"):
            if not (entry.is_dir() and written_by_ccli(entry)):
                continue
            if not out.exists():  # killed between the two renames of a replacement: put the old model back
                os.replace(entry, out)
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def check_writable(out: Path, expected_bytes: int = 0) -> None:
    """`out` can be created and written, with room for about `expected_bytes` of model (see
    SPACE_FACTOR): its nearest existing ancestor is a directory we can write a file into."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CcliError(f"--out {out}: {ancestor} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.ccli-probe", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CcliError(f"--out {out}: cannot write in {ancestor} ({exc.strerror or _one_line(exc)})") from exc
    if expected_bytes:
        needed = int(expected_bytes * SPACE_FACTOR + SPACE_EXTRA_BYTES)
        free = shutil.disk_usage(ancestor).free
        if free < needed:
            raise CcliError(f"--out {out}: only {free / 2**20:.0f} MiB free on its disk, and the converted model with its "
                            f"progress checkpoints needs about {needed / 2**20:.0f} MiB; free some space or choose another disk")


def prepare_out(out: Path | None, *, overwrite: bool = False, base: str | Path | None = None,
                expected_bytes: int = 0) -> None:
    """Everything about `--out` that can be known before training (see the module doc)."""
    if out is None:
        return
    remove_leftovers(out)
    if overwrite:
        check_replaceable(out, base=base)
    check_writable(out, expected_bytes)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def install_dir(tmp: Path, out: Path) -> None:
    """Put the complete directory `tmp` in place of `out` (which may exist, see check_replaceable):
    with the mode `mkdir` would give it, or the replaced directory's own mode. The old directory is set
    aside by a rename and removed only once the new one is in place."""
    mode = stat.S_IMODE(out.stat().st_mode) if out.is_dir() else 0o777 & ~_umask()
    os.chmod(tmp, mode)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        warn(f"could not remove the replaced directory {old}; remove it yourself")


def _write_error(target, exc: BaseException) -> CcliError:
    reason = getattr(exc, "strerror", None) or _one_line(exc) or type(exc).__name__
    return CcliError(f"cannot write {target}: {reason}")


def _write_exceptions() -> tuple:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        return (OSError,)
    return (OSError, SafetensorError)


def one_line_write_errors(function):
    """Decorator: an OSError or safetensors error raised while `function` writes its `out` becomes a
    one-line CcliError."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except _write_exceptions() as exc:
            bound = signature.bind_partial(*args, **kwargs).arguments
            raise _write_error(bound.get("out", "the output"), exc) from exc

    return wrapper


@contextmanager
def writing(target: Path, tmp: Path | None = None):
    """Around the writing of `target` (through `tmp`): any failure removes `tmp`; a write failure
    (an OSError, or torch.save's RuntimeError on a full disk) becomes a one-line CcliError."""
    try:
        yield
    except BaseException as exc:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(exc, _write_exceptions() + (RuntimeError,)):
            raise _write_error(target, exc) from exc
        raise


# -- loading -----------------------------------------------------------------------------------

# tensor names only ccli's variant modules have (FFF trees, ternary linears)
CONVERTED_TENSORS = (".linear_in.weight", ".linear_out.weight", ".output_bias", ".packed", ".outlier_rows",
                     ".outlier_values")


def looks_converted(directory: str | Path) -> bool:
    """Whether the safetensors files of `directory` were written by ccli (their metadata says so, or
    they hold ccli-variant tensors). Reads only the files' headers."""
    from safetensors import safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                if "ccli" in (f.metadata() or {}) or any(k.endswith(CONVERTED_TENSORS) for k in f.keys()):
                    return True
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the loader itself
            continue
    return False


def refuse_converted_without_manifest(directory: str | Path) -> None:
    if not (Path(directory) / MANIFEST).is_file() and looks_converted(directory):
        raise CcliError(f"'{directory}' holds a model converted by ccli but its manifest {MANIFEST} is missing, so its "
                        "converted layers cannot be rebuilt; restore the file or convert the base model again")


def report_loading_info(info: dict, where: str) -> None:
    """Warn (one line) when transformers loaded a plain checkpoint with tensors missing (left at random
    initial values) or tensors it did not use."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("position_ids"))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.endswith("position_ids"))
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys", ()))

    def some(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    if missing:
        warn(f"'{where}' lacks {len(missing)} tensors of its architecture ({some(missing)}); they have random "
             "values: this checkpoint is incomplete")
    if mismatched:
        warn(f"'{where}' has {len(mismatched)} tensors of the wrong shape ({some(mismatched)}); they have random values")
    if unexpected:
        warn(f"'{where}' has {len(unexpected)} tensors the model does not use ({some(unexpected)})")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model")


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether `directory` holds tokenizer files (without them transformers makes a stand-in tokenizer)."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


# a tokenizer with fewer entries than this share of the model's embedding rows is not the model's own
TOKENIZER_MIN_SHARE = 0.5


def check_tokenizer(tokenizer, model, where: str) -> None:
    """Refuse a tokenizer that cannot be the model's own: far fewer tokens than the model has embedding
    rows (transformers makes a 5-token tokenizer when a BERT checkpoint has no vocabulary files)."""
    if tokenizer is None:
        return
    try:
        rows = model.get_input_embeddings().num_embeddings
        size = len(tokenizer)
    except Exception:  # noqa: BLE001 - a model without token embeddings: nothing to compare
        return
    if size < TOKENIZER_MIN_SHARE * rows:
        from .arch import view

        view(model)  # an unsupported model family is the first thing to say
        raise CcliError(f"'{where}': its tokenizer has {size} tokens but the model has {rows} token embeddings; the "
                        "tokenizer files are missing or belong to another model (copy the base model's tokenizer files there)")


def check_manifest(manifest, path: Path, formats: tuple[int, ...]) -> None:
    """A ccli manifest is a JSON object of a format this ccli reads; it names its base model and its
    converted units: format 2 lists them (`units`: [{key, spec}]), format 1 mapped block indices
    (`layers`) and module paths (`linears`) to specs."""
    if not isinstance(manifest, dict):
        raise CcliError(f"{path} is not a ccli manifest (a JSON object), it holds a JSON {type(manifest).__name__}")
    if manifest.get("format") not in formats:
        raise CcliError(f"{path} has manifest format {manifest.get('format')!r}; this ccli reads formats "
                        f"{', '.join(map(str, formats))}")
    for key in ("base_model", "base_source"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise CcliError(f"{path} lacks '{key}' (where the converted model came from); the manifest is damaged")
    if manifest["format"] == 1:
        for key in ("layers", "linears"):
            specs = manifest.get(key, {})
            if not isinstance(specs, dict) or not all(isinstance(s, dict) for s in specs.values()):
                raise CcliError(f"{path}: '{key}' must map to layer specs (JSON objects); the manifest is damaged")
    else:
        units = manifest.get("units", [])
        if not isinstance(units, list) or not all(
                isinstance(u, dict) and isinstance(u.get("key"), str) and isinstance(u.get("spec"), dict) for u in units):
            raise CcliError(f"{path}: 'units' must be a list of {{key, spec}} objects; the manifest is damaged")
    steps = manifest.get("convert", [])
    if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("to"), str) for s in steps):
        raise CcliError(f"{path}: 'convert' must be a list of steps with a 'to'; the manifest is damaged")
    if Path(manifest["base_source"]).expanduser().resolve() == path.parent.resolve():
        raise CcliError(f"{path} names its own directory as its base model; the manifest is damaged")


def block_index(index, blocks: int, where) -> int:
    """A manifest's block index as an int in range."""
    try:
        value = int(index)
    except (TypeError, ValueError):
        raise CcliError(f"{where}: the manifest names block {index!r}, which is not a block index") from None
    if not 0 <= value < blocks:
        raise CcliError(f"{where}: the manifest names block {value}, but the model has blocks 0-{blocks - 1}")
    return value


# -- progress checkpoints ------------------------------------------------------------------------


def load_progress_file(path: Path) -> dict:
    """A progress checkpoint, read with `weights_only=True`: tensors and plain data only, no code runs."""
    import pickle

    import torch

    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CcliError(f"refusing the progress checkpoint {path}: it holds more than tensors and plain data "
                        "(not written by this ccli, or tampered with); delete it to start over") from exc
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint
        raise CcliError(f"cannot read the progress checkpoint {path} ({type(exc).__name__}); delete it to start over") from exc
    if not isinstance(state, dict):
        raise CcliError(f"the progress checkpoint {path} is not one ccli wrote; delete it to start over")
    return state


def plain_random_state(state: tuple) -> list:
    """random.Random.getstate() as plain lists and ints (what a weights_only checkpoint may hold)."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def random_state(plain) -> tuple:
    version, internal, gauss = plain
    return (version, tuple(internal), gauss)


# -- results ---------------------------------------------------------------------------------------

# a stage that multiplies the error by more than this is reported
EXPLOSION_FACTOR = 10.0


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def check_finite(model, fidelity: dict | None = None) -> None:
    """Refuse a model with non-finite weights, or a non-finite fidelity: nothing is saved."""
    import torch

    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CcliError(f"the converted model has non-finite weights (NaN or inf) in {len(bad)} tensors ({listed}); "
                        "nothing was saved: training diverged (try a lower --lr, or more --tokens)")
    bad_fidelity = sorted(k for k, v in _flat(fidelity or {}) if not _finite(v))
    if bad_fidelity:
        raise CcliError(f"the converted model's fidelity is not finite ({', '.join(bad_fidelity[:3])}); nothing was saved: "
                        "training diverged (try a lower --lr, or more --tokens)")


def _flat(record: dict, prefix: str = ""):
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield f"{prefix}{key}[{i}]", v
        else:
            yield f"{prefix}{key}", value


def warn_if_exploded(record: dict) -> None:
    """A warning line when a stage made the error explode: a layer whose relative error after
    training is EXPLOSION_FACTOR times what it was after initialisation, or an end-to-end loss that
    rose that much (or any non-finite error)."""
    for layer in record.get("layers", []):
        before, after = layer.get("init_rel_error"), layer.get("final_rel_error")
        what = f"layer {layer.get('layer')}" + ("" if layer.get("target", "ffn") == "ffn" else f" {layer['target']}")
        if after is not None and not _finite(after):
            warn(f"{what}: its relative error is not finite ({after}) after layer-wise training")
        elif after is not None and before is not None and _finite(before) and after > EXPLOSION_FACTOR * max(before, 1e-12):
            warn(f"{what}: layer-wise training made its relative error explode ({before:.4g} -> {after:.4g}); "
                 "try a lower --lr")
    first, last = record.get("e2e_loss_first"), record.get("e2e_loss_last")
    if first is not None and last is not None and (not _finite(last) or (_finite(first) and last > EXPLOSION_FACTOR * max(first, 1e-12))):
        warn(f"end-to-end training made its error explode ({first:.4g} -> {last:.4g}); try a lower --e2e-lr")


def json_safe(value):
    """`value` with every non-finite float replaced by None, so that it prints as valid JSON (null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# -- small validation helpers ------------------------------------------------------------------------

def check_blocks_exist(blocks: list, n_blocks: int) -> None:
    """Before training: the blocks a step converts exist (the recipe's or the command's 'layers')."""
    for i in blocks:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_blocks:
            raise CcliError(f"layers: block {i!r} is out of range: the model has blocks 0-{n_blocks - 1} "
                            "(the recipe's 'layers' key)")


MAX_MIN_TIME = 3600.0  # seconds of timed runs per row


def check_min_time(value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= MAX_MIN_TIME:
        raise CcliError(f"--min-time must be a number of seconds above 0 and at most {MAX_MIN_TIME:.0f} (got {value!r})")


def check_model_name(name) -> None:
    """An empty model name (an unset variable) is an error, not the default model (which is no name at all)."""
    if name is not None and isinstance(name, str) and not name.strip():
        raise CcliError("the model name is empty (an unset variable?); give an alias, a directory or a Hub id, "
                        "or nothing for the default minilm")


def option_name(key: str) -> str:
    """How a DistillConfig field is named to the user: its `ccli convert` option when there is one,
    else its recipe key."""
    from .cli import convert

    for parameter in inspect.signature(convert).parameters.values():
        if parameter.name == key:
            decls = getattr(parameter.default, "param_decls", None) or ()
            flags = [d for d in decls if d.startswith("--")]
            if flags:
                return flags[0]
    return f"distill.{key} (recipe key)"
