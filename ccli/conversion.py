"""`convert` and `evaluate`: the conversion workflow behind `ccli convert` and `ccli eval`."""

from __future__ import annotations

import copy
from dataclasses import asdict, fields, replace
from pathlib import Path


from .arch import view
from .data import TWO_FILE_CORPUS, evaluation_sets, is_bundled, trained_domains, training_text
from .distill import DistillConfig, distill, tokenize
from .errors import CcliError
from .hub import load
from .inputs import build_inputs, fit_length
from .loaded import Loaded
from .measure.components import additions_by_component, flops_by_component, weight_bytes
from .measure.fidelity import compare_domains, ffn_fidelity
from .measure.flops import count_flops
from .progress import Progress
from .safety import check_blocks_exist, check_finite, check_out_arg, prepare_out, warn, warn_if_exploded
from .variants import FAMILIES


def _ffn_flops_per_token(loaded: Loaded, seq: int = 128) -> int:

    inputs = build_inputs(loaded, seq=seq)
    counted = count_flops(loaded.model, inputs)
    return round(flops_by_component(view(loaded.model), counted.by_module)["ffn"] / inputs["input_ids"].numel())


def _progress_path(out: Path, step: int) -> Path:
    """Where convert step `step` keeps its progress checkpoint: hidden, next to the output directory."""
    return out.parent / f".{out.name}.ccli-progress.{step}.pt"


def convert(
    model: str | None = None,
    *,
    to: str | None = None,
    params: dict | None = None,
    recipe: str | Path | None = None,
    data: str | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    evaluate_fidelity: bool = True,
    heldout_paragraphs: int = 128,
    show_progress: bool = True,
    **distill_options,
) -> dict:
    """Convert `model` into a conditional-compute variant by distillation (see ccli.distill).

    Settings come from `recipe` (a YAML file, see ccli.recipes) and are overridden by the explicit
    arguments: `to` and `params` (e.g. {'depth': 3, 'leaf_width': 48}) for the variant, and any
    DistillConfig field (steps, e2e_steps, lr, seed, tokens, ...) as keyword arguments.
    Returns a record with the per-layer training errors, FFN FLOPs before/after and fidelity on
    held-out text; with `out`, the converted model is saved there (atomically) and reloads with
    `ccli.load(out)`.

    Four stages: plan (settings merged and validated), steps (each convert step distilled in turn),
    measure (FLOPs, weights, fidelity) and save."""
    plan = _plan(model, to, params, recipe, data, distill_options)
    if resume and out is None:
        raise CcliError("--resume needs --out: progress is kept next to the output directory")
    check_out_arg(out)  # "" would resolve to the working directory
    out_path = Path(out).expanduser().resolve() if out is not None else None
    if out_path is not None and out_path.exists() and not overwrite and (not out_path.is_dir() or any(out_path.iterdir())):
        raise CcliError(f"--out {out_path} already exists and is not empty; choose another directory or pass --overwrite")

    teacher = load(plan["model"])
    if teacher.manifest is not None:
        raise CcliError(f"'{plan['model']}' is already a converted ccli model; convert its base model instead")
    arch = view(teacher.model)  # fails early on unsupported model families
    cfg = plan["distill"] = _fit_max_length(plan["distill"], teacher.model)
    _check_plan_fits(plan, arch)
    prepare_out(out_path, overwrite=overwrite, base=teacher.source, expected_bytes=weight_bytes(teacher.model))
    train = training_text(plan["data"], cfg.short_spans, cfg.seed)
    heldout = evaluation_sets(plan["data"], per_domain=heldout_paragraphs)
    batches = tokenize(teacher.tokenizer, train, cfg.max_length)
    progress = Progress(enabled=show_progress)
    student, units, reports = _run_steps(teacher, plan, batches, out_path, resume, progress)
    record = _measure(teacher, student, plan, reports)
    if evaluate_fidelity:
        progress.log("measuring fidelity on held-out text")
        record["fidelity"] = _fidelity(student, teacher, heldout, cfg.max_length)
    warn_if_exploded(record)
    check_finite(student, record.get("fidelity"))  # a diverged model is an error, never saved
    if out_path is not None:
        record["out"] = str(_save(teacher, student, plan, units, record, out_path, overwrite))
    return record


def _fit_max_length(cfg: DistillConfig, model) -> DistillConfig:
    """`cfg` with max_length at most the model's positions (`fit_length`), saying so when it cuts."""
    length = fit_length(model.config, cfg.max_length)
    if length == cfg.max_length:
        return cfg
    warn(f"max_length {cfg.max_length} is more than the model's {length} positions; using {length}")
    return replace(cfg, max_length=length)


def _check_plan_fits(plan: dict, arch) -> None:
    """Before training: every step's blocks exist, and each family accepts the parts it will convert."""
    for step in plan["convert"]:
        blocks = step.get("layers", plan["distill"].layers)
        blocks = list(range(len(arch.blocks))) if blocks is None else blocks
        check_blocks_exist(blocks, len(arch.blocks))
        FAMILIES[step["to"]](**_variant_kwargs(step)).check_model(arch, blocks)


def _run_steps(teacher: Loaded, plan: dict, batches: list[dict], out_path: Path | None, resume: bool,
               progress: Progress) -> tuple:
    """Distil every convert step into a copy of the teacher; returns (student, [(key, spec)] in
    conversion order, the steps' reports)."""
    student = copy.deepcopy(teacher.model)
    cfg = plan["distill"]
    units, reports = [], []
    for n, step in enumerate(plan["convert"]):
        variant = FAMILIES[step["to"]](**_variant_kwargs(step))
        # A step may convert only some blocks. End-to-end training runs once, after the last step, and
        # trains every step's modules, so only the last step finalizes them.
        last = n == len(plan["convert"]) - 1
        layers = step.get("layers", cfg.layers)
        if layers is None:  # the family's own default (mod: every other block)
            layers = variant.layers(len(view(student).blocks))
        step_cfg = replace(cfg, layers=layers, e2e_steps=cfg.e2e_steps if last else 0)
        run_key = {"model": teacher.source, "variant": variant.spec(), "distill": asdict(step_cfg), "data": plan["data"], "step": n}
        checkpoint = _progress_path(out_path, n) if out_path else None
        specs, report = distill(student, teacher.model, variant, batches, step_cfg, checkpoint=checkpoint,
                                resume=resume, run_key=run_key, progress=progress, finalize=last)
        units += specs.items()
        reports.append(report)
    return student.eval(), units, reports


def _measure(teacher: Loaded, student, plan: dict, reports: list) -> dict:
    """What the conversion did: training errors, FFN FLOPs and weights before and after."""
    student_loaded = Loaded(student, teacher.tokenizer, f"{teacher.name} ({_describe(plan['convert'])})", "converted")
    seq = min(128, plan["distill"].max_length)  # FLOPs per token at the usual length, within the model's positions
    record = {
        "model": teacher.name,
        "source": teacher.source,
        "convert": plan["convert"],
        "distill": asdict(plan["distill"]),
        "data": plan["data"] or "bundled",
        "layers": [vars(r) for rep in reports for r in rep.layers],
        "e2e_loss_first": reports[-1].e2e_losses[0] if reports[-1].e2e_losses else None,
        "e2e_loss_last": reports[-1].e2e_losses[-1] if reports[-1].e2e_losses else None,
        "e2e_kept": reports[-1].e2e_kept,
        "seconds": round(sum(r.seconds for r in reports), 1),
        "ffn_flops_per_token_dense": _ffn_flops_per_token(teacher, seq),
        "ffn_flops_per_token": _ffn_flops_per_token(student_loaded, seq),
    }
    record["ffn_flops_reduction"] = round(record["ffn_flops_per_token_dense"] / max(record["ffn_flops_per_token"], 1), 2)
    record["weight_bytes_dense"] = weight_bytes(teacher.model)
    record["weight_bytes"] = weight_bytes(student)
    record["adds_per_token"] = sum(additions_by_component(view(student)).values())
    return record


def _save(teacher: Loaded, student, plan: dict, units: list, record: dict, out_path: Path, overwrite: bool) -> Path:
    """Write the converted model and its manifest; drop the progress checkpoints it no longer needs."""
    from .checkpoint import save_converted

    manifest = {
        "base_model": teacher.name,
        "base_source": teacher.source,
        "family": view(teacher.model).family,
        "convert": plan["convert"],
        "units": [{"key": key, "spec": spec} for key, spec in units],  # in conversion order
        "distill": asdict(plan["distill"]),
        "data": plan["data"] or "bundled",
        "trained_domains": trained_domains(plan["data"]),
        "fidelity": record.get("fidelity"),
    }
    saved = save_converted(student, teacher.tokenizer, out_path, manifest, overwrite=overwrite)
    for n in range(len(plan["convert"])):
        _progress_path(out_path, n).unlink(missing_ok=True)
    return saved


def _variant_kwargs(step: dict) -> dict:
    """A convert step's variant parameters (without 'to' and the step's own 'layers')."""
    return {k: v for k, v in step.items() if k not in ("to", "layers")}


def _describe(convert_steps: list[dict]) -> str:
    return " + ".join(f"{s['to']} " + " ".join(f"{k}={v}" for k, v in s.items() if k != "to") for s in convert_steps)


def _plan(model, to, params, recipe, data, distill_options) -> dict:
    """Merge a recipe with explicit arguments (explicit wins) into a validated plan."""
    from .recipes import load_recipe

    base = load_recipe(recipe) if recipe else {"model": None, "data": None, "convert": [], "distill": {}}
    convert_steps = [dict(s) for s in base["convert"]]
    if to is not None:
        if to not in FAMILIES:
            raise CcliError(f"--to {to}: unknown variant family; choose one of {', '.join(FAMILIES)}")
        if convert_steps and convert_steps[0]["to"] == to:
            convert_steps[0].update({k: v for k, v in (params or {}).items() if v is not None})
        else:
            convert_steps = [{"to": to, **{k: v for k, v in (params or {}).items() if v is not None}}]
    elif params and any(v is not None for v in params.values()):
        if not convert_steps:
            raise CcliError("variant options need --to (or a --recipe that names the variant)")
        convert_steps[0].update({k: v for k, v in params.items() if v is not None})
    if not convert_steps:
        raise CcliError("say what to convert to: --to fff, or --recipe FILE")
    for step in convert_steps:  # validate the parameters early: the family's config checks them
        FAMILIES[step["to"]].config.from_params(_variant_kwargs(step))
    known = {f.name for f in fields(DistillConfig)}
    unknown = set(distill_options) - known
    if unknown:
        raise CcliError(f"unknown distillation option '{sorted(unknown)[0]}'")
    # a one-family conversion starts from that family's own defaults (int8: no training), beneath the
    # recipe's settings and the explicit ones; a combination's recipe says what its steps need
    defaults = FAMILIES[convert_steps[0]["to"]].distill_defaults if len(convert_steps) == 1 else {}
    merged = {**defaults, **base["distill"], **{k: v for k, v in distill_options.items() if v is not None}}
    cfg = DistillConfig(**merged)
    cfg.validate()
    return {"model": model if model is not None else base["model"], "data": data or base["data"], "convert": convert_steps, "distill": cfg}


def _fidelity(student, teacher, sets, max_length: int) -> dict:
    """Per-domain fidelity (`compare_domains`) and each converted FFN's error on the held-out text of
    the domains the conversion trained on."""
    fidelity = compare_domains(student, teacher.model, teacher.tokenizer, sets, max_length)
    seen = [p for s in sets if s.seen for p in s.paragraphs] or [p for s in sets for p in s.paragraphs]
    fidelity.update(ffn_fidelity(student, teacher.model, tokenize(teacher.tokenizer, seen, max_length)))
    return fidelity


def evaluate(directory: str, *, data: str | None = None, heldout_paragraphs: int = 128) -> dict:
    """Fidelity of a converted model (a directory written by convert) to its base model."""
    student = load(directory)
    if student.manifest is None:
        raise CcliError(f"'{directory}' is not a converted ccli model (no ccli.json); eval compares a conversion with its base")
    teacher = load(student.manifest["base_source"])
    trained_on = student.manifest.get("data")
    seen = student.manifest.get("trained_domains", list(TWO_FILE_CORPUS) if trained_on == "bundled" else None)
    if not is_bundled(trained_on) and not trained_on.startswith("hf:") and not Path(trained_on).expanduser().is_file():
        warn(f"the conversion's training data '{trained_on}' is not here; it is not scored as a domain")
        trained_on = None
    heldout = evaluation_sets(trained_on, data, per_domain=heldout_paragraphs, seen_domains=seen)
    max_length = student.manifest.get("distill", {}).get("max_length", 128)
    record = {"model": directory, "base_model": student.manifest["base_model"], "data": data or "bundled",
              "convert": student.manifest.get("convert")}
    record["fidelity"] = _fidelity(student.model, teacher, heldout, max_length)
    return record
