"""YAML recipes: a conversion written down so it can be repeated (`ccli convert --recipe FILE`).

    model: minilm                 # optional; the command line's MODEL wins when given
    data: bundled                 # optional; bundled, a .txt/.jsonl file or hf:NAME
    convert:                      # a list: variants compose in order
      - to: fff
        trees: 1
        depth: 3
        leaf_width: 48
        layers: [0, 1, 2]         # optional: this step converts only these blocks
    distill:                      # optional; any DistillConfig field
      steps: 300
      e2e_steps: 200

Every key is checked: a misspelt or misplaced key is a one-line error that names it.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from .distill import DistillConfig
from .errors import CcliError

TOP_LEVEL = {"model", "data", "convert", "distill", "description"}


def _variant_params(family) -> dict[str, type]:
    """A family's parameters (its config's fields) and their types (the type of each default value)."""
    return {f.name: type(f.default) for f in family.config.options()}


def load_recipe(path: str | Path) -> dict:
    """Parse and validate a recipe; returns {'model', 'data', 'convert': [{'to', **params}], 'distill': {...}}."""
    from .variants import FAMILIES

    path = Path(path)
    where = f"recipe {path}"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CcliError(f"{where}: no such file") from exc
    except IsADirectoryError as exc:
        raise CcliError(f"{where} is a directory; give the recipe's YAML file") from exc
    except OSError as exc:
        raise CcliError(f"{where}: cannot read it ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise CcliError(f"{where} is not UTF-8 text (a YAML recipe is)") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise CcliError(f"{where}: not valid YAML{at}") from exc
    if not isinstance(raw, dict):
        raise CcliError(f"{where}: the top level must be a mapping with keys {', '.join(sorted(TOP_LEVEL))}")
    for key in raw:
        if key not in TOP_LEVEL:
            raise CcliError(f"{where}: unknown key '{key}' (allowed: {', '.join(sorted(TOP_LEVEL))})")
    for key in ("model", "data", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise CcliError(f"{where}: '{key}' must be a string")

    steps = raw.get("convert")
    if not isinstance(steps, list) or not steps:
        raise CcliError(f"{where}: 'convert' must be a non-empty list of variants, e.g. [{{to: fff, depth: 3}}]")
    convert = []
    for n, step in enumerate(steps):
        if not isinstance(step, dict) or "to" not in step:
            raise CcliError(f"{where}: convert[{n}] must be a mapping with a 'to' key")
        if not isinstance(step["to"], str):
            raise CcliError(f"{where}: convert[{n}].to must be a variant family name ({', '.join(FAMILIES)}), "
                            f"not {type(step['to']).__name__} {step['to']!r}")
        family = FAMILIES.get(step["to"])
        if family is None:
            raise CcliError(f"{where}: convert[{n}].to '{step['to']}' is not a variant family ({', '.join(FAMILIES)})")
        allowed = _variant_params(family)
        for key, value in step.items():
            if key == "to":
                continue
            if key == "layers":  # this step converts only these blocks
                if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                    raise CcliError(f"{where}: 'convert[{n}].layers' must be a list of block indices (got {value!r})")
                continue
            if key not in allowed:
                raise CcliError(f"{where}: unknown key 'convert[{n}].{key}' for {step['to']} (allowed: {', '.join([*allowed, 'layers'])})")
            expected = allowed[key]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # `capacity: 1` means 1.0
                step[key] = value
            if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
                kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(expected, expected.__name__)
                raise CcliError(f"{where}: 'convert[{n}].{key}' must be {kind} (got {value!r})")
        convert.append(dict(step))

    distill = raw.get("distill") or {}
    if not isinstance(distill, dict):
        raise CcliError(f"{where}: 'distill' must be a mapping")
    known = {f.name: f for f in fields(DistillConfig)}
    for key, value in distill.items():
        if key not in known:
            raise CcliError(f"{where}: unknown key 'distill.{key}' (allowed: {', '.join(known)})")
        expected = {"lr": float, "e2e_lr": float, "short_spans": float, "anchor": float, "layers": list, "e2e_target": str}.get(key, int)
        if expected is float and isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
            distill[key] = value
        ok = isinstance(value, (int, float)) if expected is float else isinstance(value, expected)
        if expected is list and ok and not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise CcliError(f"{where}: 'distill.layers' must be a list of block indices (got {value!r})")
        if not ok or isinstance(value, bool):
            kind = {float: "a number", list: "a list", str: "a string"}.get(expected, "an integer")
            raise CcliError(f"{where}: 'distill.{key}' must be {kind} (got {value!r})")
    return {"model": raw.get("model"), "data": raw.get("data"), "convert": convert, "distill": distill}
