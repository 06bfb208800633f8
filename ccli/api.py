"""The public Python API. The CLI calls these functions and nothing else; each returns plain
records (dicts) that the CLI renders as tables or JSON."""

from __future__ import annotations

import gc
from typing import Iterable, Union

import torch

from . import baselines
from .arch import view
from .errors import CcliError
from .hub import Loaded, load
from .inputs import build_inputs
from .measure.components import additions_by_component, flops_by_component, parameters_by_component, weight_bytes
from .measure.flops import count_flops, torch_flop_count
from .measure.generation import check_generative, generation_row, time_generation
from .measure.neurons import active_neurons
from .measure.routing import routed_blocks
from .measure.timing import time_call
from .safety import check_min_time

ModelRef = Union[str, Loaded, None]

FLOP_UNIT = ("FLOPs = 2 x multiply-accumulates; elementwise ops, softmax and norms not counted; "
             "the weight products of ternary layers are additions, counted apart")
RANDOM_INIT_NOTE = "random weights: FLOPs, parameters and timings do not depend on weight values; activation statistics do"


def _as_loaded(ref: ModelRef, random_init: bool) -> Loaded:
    return ref if isinstance(ref, Loaded) else load(ref, random_init=random_init)


def _refs(models: ModelRef | Iterable[ModelRef]) -> list[ModelRef]:
    if models is None or isinstance(models, (str, Loaded)):
        return [models]
    refs = list(models)
    return refs or [None]


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
            "adds_per_token": sum(additions_by_component(arch).values()),
            "adds_by_component": additions_by_component(arch),
            "uncounted_ops": flops.uncounted_ops,
            "unknown_ops": flops.unknown_ops,
            "active_neurons": active_neurons(arch, inputs),
            "routed_blocks": routed_blocks(arch, inputs),
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


def describe_conversion(manifest: dict) -> str:
    return " + ".join(f"{s['to']} " + " ".join(f"{k}={v}" for k, v in s.items() if k != "to") for s in manifest.get("convert", []))


def _time_forward(model, inputs, device, threads, min_run_time):
    model = model.to(device)
    device_inputs = {k: v.to(device) for k, v in inputs.items()}

    def forward():
        with torch.inference_mode():
            model(**device_inputs)

    return time_call(forward, device=device, threads=threads, min_run_time=min_run_time)


def _bench_row(loaded, variant, device, batch, seq, threads, timing) -> dict:
    return {
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
        "random_init": loaded.random_init,
    }


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
    generate: int | None = None,
) -> list[dict]:
    """End-to-end forward latency, throughput and peak memory of each model, each followed by its
    reference rows (int8 dynamic quantization on CPU, and the FFN-removed floor). Without baselines a
    converted model is timed alone (its base model is not loaded).

    With `generate=N` (decoder language models): greedy generation at batch 1 with the KV cache
    instead, a prompt of `seq` tokens of the bundled sample text then N decode steps; each row holds
    prefill ms and decode tokens/s (medians, with IQR), see ccli.measure.generation."""
    _check_device(device)
    if generate is not None and generate < 1:
        raise CcliError(f"--generate must be at least 1 (got {generate})")
    if generate is not None and batch != 1:
        raise CcliError(f"--generate times batch 1 (got --batch {batch})")
    check_min_time(min_run_time)
    threads = threads or torch.get_num_threads()
    if threads < 1:
        raise CcliError(f"--threads must be at least 1 (got {threads})")
    rows: list[dict] = []
    for ref in _refs(models):
        loaded = _as_loaded(ref, random_init)
        view(loaded.model)  # fail early on unsupported families
        if generate is not None:
            check_generative(loaded.model, loaded.name)
        # A converted model is timed beside its base model, whose dense, int8 and floor rows are the references.
        base = load(loaded.manifest["base_source"]) if loaded.manifest and with_baselines else loaded
        inputs = build_inputs(base if loaded.manifest else loaded, batch=batch, seq=seq)
        if generate is not None:
            _check_generate_fits(loaded.model, seq, generate)
        variants = [("dense", base.model)] if base is not loaded or not loaded.manifest else []
        if loaded.manifest:
            variants.append((describe_conversion(loaded.manifest), loaded.model))
        if with_baselines:
            variants += [(name, name) for name in baselines.BASELINES if name != "int8-dynamic" or device == "cpu"]
        model_rows = []
        if generate is not None:  # every row built first: their runs are interleaved (time_generation)
            models = [(baselines.build(source, base.model) if isinstance(source, str) else source).to(device)
                      for _, source in variants]
            timings = time_generation(models, inputs["input_ids"].to(device), generate, device=device,
                                      threads=threads, min_run_time=min_run_time)
            model_rows += [generation_row(loaded.name, variant, device, seq, generate, threads, timing, loaded.random_init)
                           for (variant, _), timing in zip(variants, timings)]
            del models
            gc.collect()
        else:
            for variant, source in variants:
                model = baselines.build(source, base.model) if isinstance(source, str) else source
                timing = _time_forward(model, inputs, device, threads, min_run_time)
                model_rows.append(_bench_row(loaded, variant, device, batch, seq, threads, timing))
                if isinstance(source, str):
                    del model
                    gc.collect()
        key = "decode_ms_per_token" if generate is not None else "median_ms"
        dense_ms = model_rows[0][key] if variants[0][0] == "dense" else None
        for row in model_rows:
            row["speedup"] = round(dense_ms / row[key], 3) if dense_ms else None
            if generate is not None:
                dense_prefill = model_rows[0]["prefill_ms"] if dense_ms else None
                row["prefill_speedup"] = round(dense_prefill / row["prefill_ms"], 3) if dense_prefill else None
        rows += model_rows
        loaded.model.to("cpu")
        base.model.to("cpu")
    return rows


def _check_generate_fits(model, prompt: int, new_tokens: int) -> None:
    limit = next((getattr(model.config, k) for k in ("max_position_embeddings", "n_positions") if getattr(model.config, k, None)), None)
    if limit and prompt + new_tokens + 1 > limit:
        raise CcliError(f"--seq {prompt} + --generate {new_tokens} needs {prompt + new_tokens + 1} positions; "
                        f"the model has {limit}")


def _fff_layer_case(source, hidden, width, trees, depth, leaf_width):
    """(name, FFF layer, dense FFN of the same shape, kernel module, work per token (kernel, dense))."""
    from torch import nn

    from .kernels import fff as kernels
    from .variants.fff import FFF

    if source is not None:
        name, layer, dense, width = _converted_ffn(source, FFF, "fff")
        hidden = layer.hidden_size
    else:
        if min(hidden, width, trees, leaf_width) < 1 or depth < 0:
            raise CcliError("--hidden, --width, --trees and --leaf-width must be >= 1 and --depth >= 0")
        torch.manual_seed(0)
        layer = FFF(hidden, trees, depth, leaf_width)
        dense = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, hidden))
        name = f"random fff trees={trees} depth={depth} leaf_width={leaf_width}"
    macs = kernels.fff_macs(1, hidden, layer.trees, layer.depth, layer.leaf_width, layer.gated)
    return name, hidden, layer, dense, kernels, _ffn_work(layer.neurons_per_token, macs, hidden, width, layer.gated)


def _largest_converted_linear(source, cls, family: str):
    """The largest `cls` linear of converted model `source`: (name, layer, the base model's linear there)."""
    loaded = _as_loaded(source, False)
    found = [(n, m) for n, m in loaded.model.named_modules() if isinstance(m, cls)]
    if not found:
        raise CcliError(f"'{loaded.name}' has no {family} linear to time; give a directory written by ccli convert --to {family}")
    path, layer = max(found, key=lambda item: item[1].in_features * item[1].out_features)
    return f"{loaded.name} {path}", layer, load(loaded.manifest["base_source"]).model.get_submodule(path)


def _ternary_layer_case(source, hidden, width, act_bits):
    """As _fff_layer_case, for one ternary linear (in = hidden, out = width) against nn.Linear."""
    from torch import nn

    from .kernels import ternary as kernels
    from .variants.ternary import TernaryLinear, ternary_modules

    if source is not None:
        name, layer, dense = _largest_converted_linear(source, TernaryLinear, "ternary")
    else:
        if min(hidden, width) < 1:
            raise CcliError("--hidden and --width must be >= 1")
        if act_bits not in (8, 16):
            raise CcliError(f"--act-bits must be 8 or 16 (got {act_bits})")
        torch.manual_seed(0)
        dense = nn.Linear(hidden, width)
        layer = TernaryLinear.from_dense(dense.weight, dense.bias, act_bits=act_bits)
        layer.finalize()
        name = f"random ternary linear {hidden}->{width} act_bits={act_bits}"
    assert ternary_modules(layer) == [layer]
    hidden = layer.in_features
    work = {"kernel": {"macs_per_token": layer.out_features * layer.scale.shape[1],
                       "adds_per_token": layer.in_features * layer.out_features, "weight_bytes": layer.weight_bytes},
            "dense": {"macs_per_token": layer.in_features * layer.out_features, "adds_per_token": 0,
                      "weight_bytes": layer.in_features * layer.out_features * 4}}
    return name, hidden, layer, dense, kernels, work


def _int8_layer_case(source, hidden, width):
    """As _ternary_layer_case, for one int8 (W8A8) linear against nn.Linear; the case's reference rows
    add torch's dynamic int8 quantisation of the same nn.Linear, what a user would pick instead."""
    from torch import nn

    from .baselines import int8_dynamic
    from .kernels import int8 as kernels
    from .measure.components import weight_bytes
    from .variants.int8 import Int8Linear

    if source is not None:
        name, layer, dense = _largest_converted_linear(source, Int8Linear, "int8")
    else:
        if min(hidden, width) < 1:
            raise CcliError("--hidden and --width must be >= 1")
        torch.manual_seed(0)
        dense = nn.Linear(hidden, width)
        layer = Int8Linear.from_dense(dense.weight, dense.bias)
        layer.finalize()
        name = f"random int8 linear {hidden}->{width}"
    torch_int8 = int8_dynamic(nn.Sequential(dense)) if isinstance(dense, nn.Linear) else None
    macs = layer.in_features * layer.out_features
    work = {"kernel": {"macs_per_token": macs, "adds_per_token": 0, "weight_bytes": layer.weight_bytes},
            "dense": {"macs_per_token": macs, "adds_per_token": 0, "weight_bytes": macs * 4}}
    references = []
    if torch_int8 is not None:  # GPT-2's Conv1D is not an nn.Linear: torch's int8 leaves it alone
        bias_bytes = 0 if dense.bias is None else dense.bias.numel() * dense.bias.element_size()  # not counted
        references.append(("int8-dynamic", torch_int8, {"macs_per_token": macs, "adds_per_token": 0,
                                                         "weight_bytes": weight_bytes(torch_int8) - bias_bytes}))
    return name, layer.in_features, layer, dense, kernels, work, references


class _DenseFFNModule(torch.nn.Module):
    """A model's dense FFN alone as a module, so that it can be moved and timed: `FFNView.run` on the
    view's own linears (registered here so that .to() moves them)."""

    def __init__(self, ffn):
        super().__init__()
        self.ffn, self.parts = ffn, torch.nn.ModuleList([*ffn.inputs, ffn.output])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn.run(x)


def _converted_ffn(source, cls, family: str):
    """The first FFN of converted model `source` that is a `cls` layer: (name, layer, the base model's
    dense FFN there as a module, its width)."""
    loaded = _as_loaded(source, False)
    found = [(i, b.ffn.replaced) for i, b in enumerate(view(loaded.model).blocks) if isinstance(b.ffn.replaced, cls)]
    if not found:
        raise CcliError(f"'{loaded.name}' has no {cls.__name__} layer to time; give a directory written by "
                        f"ccli convert --to {family}")
    index, layer = found[0]
    ffn = view(load(loaded.manifest["base_source"]).model).blocks[index].ffn
    return f"{loaded.name} layer {index} FFN", layer, _DenseFFNModule(ffn), ffn.width


def _ffn_work(neurons: int, macs: int, hidden: int, width: int, gated: bool) -> dict:
    """Work per token of a converted FFN layer (its neurons and multiply-accumulates) and of the dense
    FFN of `width` neurons it stands for (gate, up and down rows per neuron when gated, else in and out)."""
    return {"kernel": {"neurons_per_token": neurons, "macs_per_token": macs, "adds_per_token": 0},
            "dense": {"neurons_per_token": width, "macs_per_token": (3 if gated else 2) * hidden * width,
                      "adds_per_token": 0}}


def _moe_layer_case(source, hidden, width, experts, top_k):
    """As _fff_layer_case, for one MoE layer against the dense FFN of the same shape. Its routing is
    real: the router's top-k picks the experts, so the work per token is top_k experts plus the router."""
    from torch import nn

    from .kernels import moe as kernels
    from .variants.moe import MoE

    if source is not None:
        name, layer, dense, width = _converted_ffn(source, MoE, "moe")
        hidden = layer.hidden_size
    else:
        if min(hidden, width, experts, top_k) < 1 or top_k > experts or width % experts:
            raise CcliError("--hidden, --width, --experts and --top-k must be >= 1, --top-k at most --experts, "
                            "and --width a multiple of --experts")
        torch.manual_seed(0)
        dense = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, hidden))
        layer = MoE(hidden, experts, width // experts, top_k)
        with torch.no_grad():
            layer.w_in.copy_(dense[0].weight)
            layer.b_in.copy_(dense[0].bias)
            layer.w_out.copy_(dense[2].weight.T)
            layer.output_bias.copy_(dense[2].bias)
        name = f"random moe experts={experts} top_k={top_k}"
    # the top-k experts and the shared neurons, plus the router
    neurons = layer.top_k * layer.expert_width + layer.shared
    macs = kernels.moe_macs(1, hidden, neurons, layer.gated) + hidden * layer.experts
    return name, hidden, layer, dense, kernels, _ffn_work(neurons, macs, hidden, width, layer.gated)


def bench_layer(
    source: ModelRef = None,
    *,
    to: str = "fff",
    hidden: int = 768,
    width: int = 3072,
    trees: int = 1,
    depth: int = 11,
    leaf_width: int = 1,
    act_bits: int = 8,
    experts: int = 64,
    top_k: int = 15,
    tokens: Iterable[int] = (1, 128, 1024),
    device: str = "cpu",
    threads: int | None = None,
    min_run_time: float = 1.0,
) -> list[dict]:
    """One converted layer on every kernel that runs on `device`, against its dense counterpart.

    `to="fff"`: an FFF layer against the dense FFN of the same shape (by default UltraFastBERT's 1x11
    tree at BERT-base's hidden 768 / width 3072). `to="ternary"`: a ternary linear (in = hidden,
    out = width) against the fp32 nn.Linear; `to="int8"` an int8 (W8A8) linear, against it and torch's
    dynamic int8 quantisation of it. `to="moe"`: a layer of `experts` experts (the dense
    width split evenly), `top_k` per token by its router, against the dense FFN of the same shape.
    With `source` (a converted model directory) its first FFF or MoE layer, or its largest ternary
    linear, is timed against the same part of its base model.
    Timings do not depend on weight values: every token does the same work whatever its route."""
    _check_device(device)
    check_min_time(min_run_time)
    threads = threads or torch.get_num_threads()
    references = []  # (kernel name, module, work per token): reference rows timed after dense
    if to == "fff":
        name, hidden, layer, dense, kernels, work = _fff_layer_case(source, hidden, width, trees, depth, leaf_width)
    elif to == "ternary":
        name, hidden, layer, dense, kernels, work = _ternary_layer_case(source, hidden, width, act_bits)
    elif to == "moe":
        name, hidden, layer, dense, kernels, work = _moe_layer_case(source, hidden, width, experts, top_k)
    elif to == "int8":
        name, hidden, layer, dense, kernels, work, references = _int8_layer_case(source, hidden, width)
    else:
        raise CcliError(f"--to {to}: bench --layer times fff, ternary, moe or int8 layers")
    layer, dense = layer.eval().to(device), dense.eval().to(device)
    token_counts = list(tokens)
    if not token_counts or min(token_counts) < 1:
        raise CcliError("--tokens must be positive integers")
    rows = []
    for n in token_counts:
        x = torch.randn(n, hidden, device=device)
        timings = ([("dense", None, dense, work["dense"])]
                   + [(kernel, None, module, reference_work) for kernel, module, reference_work in references
                      if device == "cpu"]  # torch's int8 is CPU only
                   + [(f"{to}-{b}", b, layer, work["kernel"]) for b in kernels.available_backends(device)])
        dense_ms = None
        for kernel, backend, module, row_work in timings:
            def forward(module=module):
                with torch.inference_mode():
                    module(x)

            if backend is None:
                timing = time_call(forward, device=device, threads=threads, min_run_time=min_run_time)
            else:
                with kernels.use_backend(backend):
                    timing = time_call(forward, device=device, threads=threads, min_run_time=min_run_time)
            dense_ms = dense_ms or timing.median_ms
            rows.append({
                "layer": name, "kernel": kernel, "device": device, "tokens": n, "threads": threads, "hidden": hidden,
                **row_work,
                "median_ms": round(timing.median_ms, 4), "iqr_ms": round(timing.iqr_ms, 4),
                "p90_ms": round(timing.p90_ms, 4), "speedup": round(dense_ms / timing.median_ms, 2),
            })
    return rows
