"""The distillation engine every variant family shares.

A variant family names the *units* it replaces (`Variant.units`): whole FFNs (fff, moe), single
linear layers (ternary) or whole blocks (mod). Conversion runs in two stages, the same for every family:
1. Unit by unit, in forward order. For each unit the engine captures its real inputs from the
   student as converted so far (earlier units already replaced, so each one learns to work with
   what the converted units before it really produce; ccli.capture): the first `tokens` real tokens
   of the training batches (token rows, or whole calls for block units), so the batches must come in
   random order (`data.training_text` shuffles the text). It computes the teacher's outputs on those
   inputs, builds the new module from the dense one (`unit.build`) and trains it to match (relative MSE,
   per token for block units: the captured rows' `error`, ccli.capture; plus each converted module's
   own `auxiliary_loss()`, e.g. a router's regression). A progress checkpoint is written after every
   unit, and every two minutes during stage 2.
2. Optionally end to end: all converted modules are trained together so that the student's hidden
   states match the teacher's on the same text: the final ones (`e2e_target="last"`), or every
   block's output (`"all"`, the mean of the blocks' relative errors), which keeps each block close to
   its teacher instead of letting later blocks compensate for earlier ones; or, for a language
   model, so that its next-token distributions do (`"logits"`, KL from the teacher's). Before it
   starts, every converted module's `prepare_for_end_to_end()` may re-express its trainable state
   without changing what it computes (ternary linears move their latent weights away from rounding
   thresholds).
Finally every converted module's `finalize()` drops what only training needed
(unless `finalize=False`: a recipe's earlier steps keep it, so the last step's end-to-end stage can
still train them).

Progress goes to stderr (ccli.progress: bars on a terminal, a plain line every 30 s elsewhere). `resume=True` continues
from the last checkpoint of an identical run.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .arch import has_lm_head, view
from .capture import TokenRows, capture
from .errors import CcliError
from .measure.errors import relative_error, token_kl
from .progress import Progress
from .safety import load_progress_file, option_name, plain_random_state, random_state, writing
from .variants.base import Variant, converted_modules

E2E_TARGETS = ("last", "all", "logits")


@dataclass
class DistillConfig:
    steps: int = 300  # layer-wise optimisation steps per layer
    e2e_steps: int = 0  # end-to-end steps after all layers
    lr: float = 1e-3
    e2e_lr: float = 1e-4
    seed: int = 0
    tokens: int = 32768  # calibration tokens collected per layer
    batch_tokens: int = 1024  # tokens per layer-wise step
    max_length: int = 128
    e2e_batch: int = 16  # sequences per end-to-end step
    short_spans: float = 0.0  # add this fraction of short random spans to the training text (data.with_short_spans)
    e2e_target: str = "last"  # end-to-end loss on the final hidden states ("last"), every block's output ("all")
    # or, for a language model, KL(teacher || student) of the next-token distributions ("logits")
    anchor: float = 0.0  # pull each converted module's weights toward their initialisation (`anchor_penalty`)
    layers: list[int] | None = None  # which blocks to convert (None: all)

    def validate(self) -> None:
        for key in ("steps", "e2e_steps", "tokens", "batch_tokens", "max_length", "e2e_batch"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < (0 if key in ("steps", "e2e_steps") else 1):
                raise CcliError(f"{option_name(key)} must be a {'non-negative' if 'steps' in key else 'positive'} integer (got {value!r})")
        for key in ("lr", "e2e_lr"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise CcliError(f"{option_name(key)} must be between 0 and 1 (got {value!r})")
        if not isinstance(self.anchor, (int, float)) or isinstance(self.anchor, bool) or not 0 <= self.anchor <= 100:
            raise CcliError(f"--anchor must be a number from 0 to 100 (got {self.anchor!r})")
        if not isinstance(self.short_spans, (int, float)) or isinstance(self.short_spans, bool) or not 0 <= self.short_spans <= 4:
            raise CcliError(f"--short-spans must be a number from 0 to 4 (got {self.short_spans!r})")
        if self.e2e_target not in E2E_TARGETS:
            raise CcliError(f"--e2e-target must be one of {', '.join(E2E_TARGETS)} (got {self.e2e_target!r})")


@dataclass
class LayerReport:
    layer: int  # block index
    target: str  # "ffn", or the path of the linear inside the model
    init_rel_error: float  # relative MSE of the initialised layer on its calibration tokens
    final_rel_error: float
    seconds: float
    init: dict | None = None  # what the family's initialisation measured (ConvertedModule.init_record)


@dataclass
class DistillReport:
    layers: list[LayerReport] = field(default_factory=list)
    e2e_losses: list[float] = field(default_factory=list)
    e2e_kept: bool | None = None  # False when end-to-end training was undone (it made things worse)
    seconds: float = 0.0


def tokenize(tokenizer, paragraphs: list[str], max_length: int, batch_size: int = 32) -> list[dict]:
    """Paragraphs -> padded batches of (input_ids, attention_mask)."""
    if tokenizer is None:
        raise CcliError("conversion needs the model's tokenizer, and this model has none here")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(paragraphs), batch_size):
        enc = tokenizer(paragraphs[start : start + batch_size], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def fit_layer(layer: nn.Module, x, y: torch.Tensor, cfg: DistillConfig, seed: int,
              on_step: Callable[[int, float], None] | None = None) -> tuple[float, float]:
    """Train `layer` so that its outputs on the captured inputs `x` (ccli.capture: `TokenRows`, or a
    plain (tokens, features) tensor, or `BlockCalls`) match `y`; returns (relative error before, after)."""
    x = TokenRows(x) if isinstance(x, torch.Tensor) else x
    generator = torch.Generator().manual_seed(seed)
    layer.train()
    params = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(cfg.steps, 1))
    before = _eval_error(layer, x, y)
    for step in range(cfg.steps):
        idx = x.draw(generator, cfg.batch_tokens)
        loss = x.error(x.run(layer, idx), x.targets(y, idx)) + auxiliary_loss([layer]) + anchor_penalty([layer], cfg.anchor)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step:
            on_step(step, loss.item())
    layer.eval()
    after = _eval_error(layer, x, y)
    return before, after


def auxiliary_loss(modules) -> torch.Tensor | float:
    """The sum of the converted modules' own losses from their last training forward pass (a router's
    regression loss, ...; ConvertedModule.auxiliary_loss), 0 when none has one."""
    total = 0.0
    for module in modules:
        for m in module.modules() if isinstance(module, nn.Module) else ():
            aux = m.auxiliary_loss() if hasattr(m, "auxiliary_loss") else None
            if aux is not None:
                total = total + aux
    return total


ANCHOR = "_ccli_anchor"  # attribute holding a module's initial weights ({name: tensor}); not in its state_dict


def set_anchor(module: nn.Module, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Remember `module`'s trainable weights as they are now (or `weights`) for `anchor_penalty`."""
    if weights is None:
        weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    object.__setattr__(module, ANCHOR, weights)


def anchor_penalty(modules, strength: float) -> torch.Tensor | float:
    """strength × the mean, over the modules' anchored weight tensors, of ||w - w0||² / ||w0||²: how far
    training has moved each tensor from its initialisation, relative to its size.

    A converted module starts from the dense layer's own weights (FFF leaves and MoE experts are its
    neurons; a ternary linear is its quantised weight). Distillation on a narrow corpus moves them to
    fit that corpus, and the dense weights are what worked on all text: the pull keeps the student
    near them where the training text says little."""
    if not strength:
        return 0.0
    terms = []
    for module in modules:
        anchor = getattr(module, ANCHOR, None) or {}
        for name, p in module.named_parameters():
            w0 = anchor.get(name)
            if w0 is not None and p.requires_grad and w0.shape == p.shape:
                terms.append((p - w0).pow(2).sum() / w0.pow(2).sum().clamp_min(1e-12))
    return strength * torch.stack(terms).mean() if terms else 0.0


def _eval_error(layer: nn.Module, x, y: torch.Tensor) -> float:
    was_training = layer.training
    layer.eval()
    with torch.no_grad():
        err = x.error(x.run(layer), y).item()
    layer.train(was_training)
    return err


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with writing(path, tmp):  # a failed write: one line, and no half-written file left
        torch.save(obj, tmp)
        os.replace(tmp, path)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    variant: Variant,
    train_batches: list[dict],
    cfg: DistillConfig,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    run_key: dict | None = None,
    progress: Progress | None = None,
    finalize: bool = True,
) -> tuple[dict[str, dict], DistillReport]:
    """Convert the units of `student` (a copy of `teacher`) that `variant` names, in place.
    Returns ({unit key: spec}, report). With `finalize=False` the converted modules keep what
    training needs (the latent weights without which a ternary linear's weights cannot train), for
    a later call whose end-to-end stage trains them too."""
    cfg.validate()
    if cfg.e2e_steps and cfg.e2e_target == "logits" and not has_lm_head(student):
        raise CcliError("--e2e-target logits needs a language model (a model with an LM head); use last or all")
    progress = progress or Progress(enabled=False)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    n_blocks = len(view(student).blocks)
    blocks = cfg.layers if cfg.layers is not None else list(range(n_blocks))
    bad = [i for i in blocks if not 0 <= i < n_blocks]
    if bad:
        raise CcliError(f"layers: block {bad[0]} is out of range: the model has blocks 0-{n_blocks - 1} (the recipe's 'layers' key)")
    report = DistillReport()
    specs: dict[str, dict] = {}
    state = _load_progress(checkpoint, run_key) if resume else None
    if state is None and checkpoint is not None:
        state = {"key": run_key, "modules": {}, "specs": {}, "reports": {}}
    start = time.perf_counter()
    with progress:
        for block in blocks:
            units = variant.units(view(student), block)
            if not units:
                raise CcliError(f"block {block} has nothing left for {variant.name} to convert")
            for n, unit in enumerate(units):
                if state and unit.key in state["modules"]:
                    module = type(variant).restore(view(student), unit.key, state["specs"][unit.key])
                    module.load_state_dict(state["modules"][unit.key])
                    if unit.key in state.get("anchors", {}):
                        set_anchor(module, state["anchors"][unit.key])
                    module.eval()
                    specs[unit.key] = state["specs"][unit.key]
                    report.layers.append(LayerReport(**state["reports"][unit.key]))
                    progress.log(f"{unit.label}: restored from checkpoint")
                    continue
                t0 = time.perf_counter()
                x = capture(student, unit, train_batches, cfg.tokens)
                with torch.no_grad():
                    y = x.run(unit.teacher)
                seed = cfg.seed + 1000 * block + n
                module = unit.build(x.data, seed)
                if cfg.anchor:
                    set_anchor(module)
                task = progress.task(unit.label, cfg.steps)
                before, after = fit_layer(module, x, y, cfg, seed=seed,
                                          on_step=lambda s, loss: progress.update(task, info=f"rel. error {loss:.4f}"))
                unit.install(module.eval())
                specs[unit.key] = unit.spec
                init_record = getattr(module, "init_record", None)
                unit_report = LayerReport(block, unit.kind if unit.kind != "linear" else unit.key, before, after,
                                          time.perf_counter() - t0, init_record)
                report.layers.append(unit_report)
                noted = "".join(f", {k.replace('_', ' ')} {v:.3f}" for k, v in (init_record or {}).items())
                progress.log(f"{unit.label}: relative error {before:.4f} after init -> {after:.4f} after "
                             f"{cfg.steps} steps ({unit_report.seconds:.1f}s, {x.tokens} tokens{noted})")
                if checkpoint is not None:
                    state["modules"][unit.key] = module.state_dict()
                    state["specs"][unit.key] = unit.spec
                    if cfg.anchor:
                        state.setdefault("anchors", {})[unit.key] = getattr(module, ANCHOR)
                    state["reports"][unit.key] = vars(unit_report).copy()  # plain data: checkpoints load weights_only
                    _atomic_save(state, checkpoint)
        if cfg.e2e_steps:
            saver = _E2ECheckpoint(state, checkpoint) if checkpoint is not None else None
            report.e2e_losses, report.e2e_kept = end_to_end(student, teacher, train_batches, cfg, progress, saver)
    if finalize:
        for module in converted_modules(student):
            module.finalize()
    report.seconds = time.perf_counter() - start
    return specs, report


def _load_progress(checkpoint: Path | None, run_key: dict | None):
    if checkpoint is None or not checkpoint.is_file():
        return None
    state = load_progress_file(checkpoint)  # tensors and plain data only: no code runs while it loads
    if state.get("key") != run_key:
        raise CcliError(f"the checkpoint {checkpoint} is from a run with different settings; delete it or drop --resume")
    return state


def _hidden(out) -> torch.Tensor:
    return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]


def compared_states(out, mask: torch.Tensor, target: str) -> list[torch.Tensor]:
    """What the end-to-end loss compares, on the real (non-padding) tokens: the final hidden states
    ("last"), every block's output ("all"; hidden_states[0] is the embedding output, which no block
    has touched), or the LM head's logits ("logits")."""
    real = mask.bool()
    if target == "logits":
        return [out.logits[real].float()]
    states = [_hidden(out)] if target == "last" else list(out.hidden_states[1:])
    return [h[real] for h in states]


def end_to_end_error(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor], target: str) -> torch.Tensor:
    """The end-to-end loss: for "logits" the mean per-token KL(teacher || student) of the next-token
    distributions; otherwise the mean relative error of the compared hidden states."""
    if target == "logits":
        return token_kl(torch.log_softmax(teacher_states[0], -1), torch.log_softmax(student_states[0], -1)).mean()
    return hidden_state_error(student_states, teacher_states)


def hidden_state_error(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor]) -> torch.Tensor:
    """The mean relative error of the compared hidden states."""
    return sum(relative_error(s, t) for s, t in zip(student_states, teacher_states)) / len(student_states)


class _E2ECheckpoint:
    """End-to-end progress inside the run's progress checkpoint (next to the layer-wise modules, which
    are the state to fall back on): the modules being trained, the optimiser, the schedule, the
    batch sampler and the losses so far, saved every `E2E_CHECKPOINT_SECONDS`. A resumed run goes on
    from the last save exactly as the uninterrupted run would have (bit for bit, with one thread)."""

    def __init__(self, state: dict, path: Path):
        self.state, self.path = state, path
        self.last_save = time.monotonic()

    def restored(self) -> dict | None:
        return self.state.get("e2e")

    def save_if_due(self, snapshot: Callable[[], dict], final: bool = False) -> None:
        if final or time.monotonic() - self.last_save >= E2E_CHECKPOINT_SECONDS:
            self.state["e2e"] = snapshot()
            _atomic_save(self.state, self.path)
            self.last_save = time.monotonic()


E2E_CHECKPOINT_SECONDS = 120.0


def end_to_end(student: nn.Module, teacher: nn.Module, batches: list[dict], cfg: DistillConfig,
               progress: Progress, checkpoint: _E2ECheckpoint | None = None) -> tuple[list[float], bool | None]:
    """Train every converted module together so the student's hidden states (`cfg.e2e_target`) match the teacher's.
    Returns the training losses and whether the result was kept (None: nothing to train).
    With `checkpoint`, progress is saved as it goes and a saved run is continued."""
    layers = converted_modules(student)
    # once each: a routed block's parameters include those of a converted FFN inside it
    params = list({id(p): p for m in layers for p in m.parameters()}.values())
    if not params:
        return [], None
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    student.eval()
    generator = random.Random(cfg.seed)
    pool = [(b["input_ids"][j : j + 1], b["attention_mask"][j : j + 1]) for b in batches for j in range(b["input_ids"].shape[0])]
    # A fixed probe set, scored through the inference path before and after: end-to-end training
    # that ends worse than it started is undone rather than silently kept.
    probe = [_pad([p[0] for p in chunk], [p[1] for p in chunk])
             for chunk in _chunks(random.Random(cfg.seed + 1).sample(pool, min(64, len(pool))), cfg.e2e_batch)]
    restored = checkpoint.restored() if checkpoint else None
    probe_before = restored["probe_before"] if restored else _probe_error(student, teacher, probe, cfg.e2e_target)
    saved = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in layers]
    for m in layers:  # after the snapshot: undoing restores the layer-wise result exactly
        m.prepare_for_end_to_end()
        m.train()  # each family's training path (FFF: hard-routed masked; ternary: straight-through)
    optimizer = torch.optim.Adam(params, lr=cfg.e2e_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.e2e_steps)
    losses: list[float] = []
    if restored:
        for m, module_state in zip(layers, restored["modules"]):
            m.load_state_dict(module_state)
        optimizer.load_state_dict(restored["optimizer"])
        schedule.load_state_dict(restored["schedule"])
        generator.setstate(random_state(restored["sampler"]))
        losses = list(restored["losses"])
        progress.log(f"end to end: restored from checkpoint at step {len(losses)} of {cfg.e2e_steps}")

    def snapshot() -> dict:
        return {"modules": [m.state_dict() for m in layers], "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "sampler": plain_random_state(generator.getstate()), "losses": list(losses),
                "probe_before": probe_before}

    task = progress.task("end to end", cfg.e2e_steps)
    progress.update(task, advance=len(losses))
    what = {"last": "hidden-state rel. error", "all": "mean block-output rel. error", "logits": "next-token KL"}[cfg.e2e_target]
    for step in range(len(losses), cfg.e2e_steps):
        picked = generator.sample(pool, min(cfg.e2e_batch, len(pool)))
        ids, mask = _pad([p[0] for p in picked], [p[1] for p in picked])
        kwargs = {"input_ids": ids, "attention_mask": mask}
        with torch.no_grad():
            target = compared_states(teacher(**kwargs, output_hidden_states=True), mask, cfg.e2e_target)
        loss = end_to_end_error(compared_states(student(**kwargs, output_hidden_states=True), mask, cfg.e2e_target), target,
                                cfg.e2e_target)
        aux = auxiliary_loss(layers) + anchor_penalty(layers, cfg.anchor)
        optimizer.zero_grad(set_to_none=True)
        (loss + aux).backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        progress.update(task, info=f"{what} {loss.item():.4f}")
        if checkpoint:
            checkpoint.save_if_due(snapshot, final=step == cfg.e2e_steps - 1)
    for m in layers:
        m.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    progress.log(f"end to end: {what} {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} "
                 f"over {cfg.e2e_steps} steps")
    probe_after = _probe_error(student, teacher, probe, cfg.e2e_target)
    if probe_after > probe_before:
        for m, state in zip(layers, saved):
            m.load_state_dict(state)
        progress.log(f"end to end made the probe error worse ({probe_before:.4f} -> {probe_after:.4f}); kept the "
                     "layer-wise result instead (try a lower --e2e-lr)")
        return losses, False
    return losses, True


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _probe_error(student: nn.Module, teacher: nn.Module, probe: list[tuple[torch.Tensor, torch.Tensor]], target: str) -> float:
    """The end-to-end loss of the student (inference path) on the probe batches, pooled over them.
    Next-token KL is a mean over tokens, so it is summed batch by batch: the probe's logits all at
    once would be up to 64 x 128 x vocabulary floats per model (1.6 GB for SmolLM2)."""
    preds, targets, kl_sum, tokens = [], [], 0.0, 0
    with torch.no_grad():
        for ids, mask in probe:
            s = compared_states(student(input_ids=ids, attention_mask=mask, output_hidden_states=True), mask, target)
            t = compared_states(teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True), mask, target)
            if target == "logits":
                kl_sum += end_to_end_error(s, t, target).item() * len(s[0])
                tokens += len(s[0])
            else:
                preds.append(s)
                targets.append(t)
    if target == "logits":
        return kl_sum / max(tokens, 1)
    return end_to_end_error([torch.cat(s) for s in zip(*preds)], [torch.cat(t) for t in zip(*targets)], target).item()


def _pad(ids: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(int(m.sum()) for m in masks)
    out_ids = torch.zeros(len(ids), length, dtype=ids[0].dtype)
    out_mask = torch.zeros(len(ids), length, dtype=masks[0].dtype)
    for row, (i, m) in enumerate(zip(ids, masks)):
        n = int(m.sum())
        out_ids[row, :n] = i[0, :n]
        out_mask[row, :n] = 1
    return out_ids, out_mask
