"""The public Python API. The CLI calls these functions and nothing else; each returns plain
records (dicts) that the CLI renders as tables or JSON."""

from __future__ import annotations

import gc
from typing import Iterable, Union

import torch

from . import baselines
from .arch import ArchView, view
from .errors import CcliError
from .hub import Loaded, load
from .inputs import build_inputs
from .measure.flops import count_flops, torch_flop_count
from .measure.neurons import active_neurons
from .measure.timing import time_call

ModelRef = Union[str, Loaded, None]

FLOP_UNIT = "FLOPs = 2 x multiply-accumulates; elementwise ops, softmax and norms not counted"
RANDOM_INIT_NOTE = "random weights: FLOPs, parameters and timings do not depend on weight values; activation statistics do"


def _as_loaded(ref: ModelRef, random_init: bool) -> Loaded:
    return ref if isinstance(ref, Loaded) else load(ref, random_init=random_init)


def _refs(models: ModelRef | Iterable[ModelRef]) -> list[ModelRef]:
    if models is None or isinstance(models, (str, Loaded)):
        return [models]
    refs = list(models)
    return refs or [None]


def _param_count(module: torch.nn.Module, seen: set[int]) -> int:
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.data_ptr() in seen or not tensor.is_floating_point() and tensor.dtype != torch.uint8:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel()
    return total


def parameters_by_component(arch: ArchView) -> dict[str, int]:
    """Parameters (and packed weight buffers) per component, each tensor counted once."""
    model = arch.model
    seen: set[int] = set()
    counts = {"embeddings": 0, "attention": 0, "ffn": 0}
    for module in arch.embeddings.values():
        counts["embeddings"] += _param_count(module, seen)
    for block in arch.blocks:
        counts["attention"] += _param_count(block.attention.module, seen)
        for path in block.ffn.paths:
            counts["ffn"] += _param_count(model.get_submodule(path), seen)
    counts["other"] = _param_count(model, seen)  # norms, pooler, heads: whatever is left
    counts["total"] = sum(counts.values())
    return counts


def weight_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def flops_by_component(arch: ArchView, by_module: dict[str, int]) -> dict[str, int]:
    """Split fvcore's per-module FLOPs into components (whole input, not per token)."""
    def at(path: str) -> int:
        return by_module.get(path, 0)

    parts = {"embeddings": sum(at(p) for p in arch.embeddings)}
    parts["attention_proj"] = sum(at(p) for b in arch.blocks for p in b.attention.linears)
    parts["attention_scores"] = sum(at(b.attention.path) for b in arch.blocks) - parts["attention_proj"]
    parts["ffn"] = sum(at(p) for b in arch.blocks for p in b.ffn.paths)
    in_blocks = sum(at(b.path) for b in arch.blocks)
    parts["other"] = in_blocks - parts["attention_proj"] - parts["attention_scores"] - parts["ffn"]
    parts["head"] = by_module.get("", 0) - in_blocks - parts["embeddings"]  # "" is the whole model
    return parts


def profile(
    models: ModelRef | Iterable[ModelRef] = None,
    *,
    seq: int | None = 128,
    batch: int = 1,
    text: str | None = None,
    random_init: bool = False,
    cross_check: bool = True,
) -> list[dict]:
    """Parameters, FLOPs per token by component and active neurons per token, for each model."""
    records = []
    for ref in _refs(models):
        loaded = _as_loaded(ref, random_init)
        arch = view(loaded.model)
        inputs = build_inputs(loaded, batch=batch, seq=seq, text=text)
        positions = inputs["input_ids"].numel()
        flops = count_flops(loaded.model, inputs)
        by_component = flops_by_component(arch, flops.by_module)
        record = {
            "model": loaded.name,
            "source": loaded.source,
            "family": arch.family,
            "random_init": loaded.random_init,
            "batch": inputs["input_ids"].shape[0],
            "seq": inputs["input_ids"].shape[1],
            "layers": len(arch.blocks),
            "hidden": arch.hidden_size,
            "params": parameters_by_component(arch),
            "weight_bytes": weight_bytes(loaded.model),
            "flops_per_token": round(flops.total / positions),
            "flops_by_component": {k: round(v / positions) for k, v in by_component.items()},
            "flops_unit": FLOP_UNIT,
            "uncounted_ops": flops.uncounted_ops,
            "unknown_ops": flops.unknown_ops,
            "active_neurons": active_neurons(arch, inputs),
        }
        if cross_check:
            record["flops_per_token_torch"] = round(torch_flop_count(loaded.model, inputs) / positions)
        if loaded.random_init:
            record["note"] = RANDOM_INIT_NOTE
        records.append(record)
    return records


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise CcliError(f"unknown device '{device}': choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise CcliError(f"--device cuda: no CUDA GPU is visible to torch {torch.__version__} ({build}); use --device cpu")


def bench(
    models: ModelRef | Iterable[ModelRef] = None,
    *,
    device: str = "cpu",
    batch: int = 1,
    seq: int = 128,
    threads: int | None = None,
    random_init: bool = False,
    with_baselines: bool = True,
    min_run_time: float = 2.0,
) -> list[dict]:
    """End-to-end forward latency, throughput and peak memory of each model, each followed by its
    reference rows (int8 dynamic quantization on CPU, and the FFN-removed floor)."""
    _check_device(device)
    threads = threads or torch.get_num_threads()
    if threads < 1:
        raise CcliError(f"--threads must be at least 1 (got {threads})")
    rows: list[dict] = []
    for ref in _refs(models):
        loaded = _as_loaded(ref, random_init)
        view(loaded.model)  # fail early on unsupported families
        inputs = build_inputs(loaded, batch=batch, seq=seq)
        variants = [("dense", lambda m: m)]
        if with_baselines:
            variants += [(name, lambda m, name=name: baselines.build(name, m)) for name in baselines.BASELINES]
        dense_ms = None
        for variant, make in variants:
            if variant == "int8-dynamic" and device != "cpu":
                continue  # torch's dynamic quantization has CPU kernels only
            model = make(loaded.model).to(device)
            device_inputs = {k: v.to(device) for k, v in inputs.items()}

            def forward(model=model, device_inputs=device_inputs):
                with torch.inference_mode():
                    model(**device_inputs)

            timing = time_call(forward, device=device, threads=threads, min_run_time=min_run_time)
            dense_ms = dense_ms or timing.median_ms
            rows.append({
                "model": loaded.name,
                "variant": variant,
                "device": device,
                "batch": batch,
                "seq": seq,
                "threads": threads,
                "median_ms": round(timing.median_ms, 3),
                "iqr_ms": round(timing.iqr_ms, 3),
                "p90_ms": round(timing.p90_ms, 3),
                "runs": timing.runs,
                "tokens_per_s": round(batch * seq / (timing.median_ms / 1e3), 1),
                "peak_mem_mb": timing.peak_mem_mb,
                "speedup": round(dense_ms / timing.median_ms, 3),
                "random_init": loaded.random_init,
            })
            if model is not loaded.model:
                del model
                gc.collect()
        loaded.model.to("cpu")
    return rows
