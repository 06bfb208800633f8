"""`ccli compare` (this module is ccli.frontier, so that `ccli.compare` stays the API function): one
run, one table: every given model (a converted directory, or the base model itself) and, on request, the baselines a user would pick instead, each measured the same way against the same
base model: fidelity on the same held-out text, FLOPs per token, weight bytes, and latency at each
sequence length with the rows timed in interleaved rounds, so that the machine's drift hits every row
alike. Rows on the fidelity/latency Pareto frontier are marked.

Fidelity is ccli.measure.fidelity.compare, the measure `ccli convert` and `ccli eval` report, run on
every row alike, the baselines included (int8 dynamic quantization and half precision are lossy too).
"""

from __future__ import annotations

import gc
import statistics
from typing import Iterable, Sequence

import torch

from . import baselines as baseline_models
from .api import ModelRef, _as_loaded, _check_device, _refs, describe_conversion
from .arch import view
from .data import evaluation_sets
from .errors import CcliError
from .hub import load
from .inputs import build_inputs, fit_length
from .measure.components import weight_bytes
from .measure.fidelity import compare_domains
from .measure.flops import count_flops
from .measure.timing import time_call

# The base model itself, torch's dynamic int8 quantization, the FFN-removed floor, and half precision.
BASELINES = ("dense", "int8-dynamic", "ffn-removed", "fp16", "bf16")
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
# What the frontier ranks rows by: pooled-embedding cosine (higher is better) for embedding models,
# next-token KL to the base model (lower is better) for models with an LM head.
# the worst domain's cosine: a row is only as good as the text it does worst on
FRONTIER_MEASURE = {"embedding": "worst_domain_cosine", "lm": "kl"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def half_supported(name: str, device: str) -> bool:
    """Whether `device` computes in `name` (fp16 or bf16) natively: on CPU, with AVX-512 or AMX
    instructions for that type (elsewhere torch converts and runs slower than fp32)."""
    if device == "cuda":
        return name == "fp16" or torch.cuda.is_bf16_supported()
    flags = _cpu_flags()
    if name == "bf16":
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return bool(flags & {"avx512_fp16", "amx_fp16"})


def default_baselines(device: str) -> list[str]:
    """What --baselines adds: every baseline that runs natively on `device` (int8 dynamic
    quantization is CPU-only in torch)."""
    names = ["int8-dynamic", "ffn-removed"] if device == "cpu" else ["ffn-removed"]
    return names + [n for n in HALF if half_supported(n, device)]


def _baseline_names(baselines: bool | Iterable[str], device: str) -> list[str]:
    """The baseline rows to add: True or "all" stands for default_baselines(device)."""
    if baselines is True:
        baselines = ["all"]
    if baselines is False or baselines is None:
        return []
    names = []
    for name in [baselines] if isinstance(baselines, str) else list(baselines):
        if name == "all":
            names += default_baselines(device)
            continue
        if name not in BASELINES:
            raise CcliError(f"unknown baseline '{name}': choose from {', '.join(BASELINES)} (or all)")
        if name == "int8-dynamic" and device != "cpu":
            raise CcliError("the int8-dynamic baseline runs on CPU only (torch's dynamic quantization); drop it or use --device cpu")
        names.append(name)
    return [n for n in dict.fromkeys(names) if n != "dense"]  # dense is always a row


def _build_baseline(name: str, model: torch.nn.Module) -> torch.nn.Module:
    if name in HALF:
        import copy

        return copy.deepcopy(model).to(HALF[name]).eval()
    return baseline_models.build(name, model).eval()


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (fidelity, latency) points, higher fidelity and lower latency being better: True for each
    point that no other point dominates (at least as good on both, strictly better on one)."""
    front = []
    for i, (fid, lat) in enumerate(points):
        dominated = any(f >= fid and l <= lat and (f > fid or l < lat) for j, (f, l) in enumerate(points) if j != i)
        front.append(not dominated)
    return front


def _parse_models(refs: list[ModelRef]):
    """Load the given models; returns (base Loaded, [(label, Loaded)] of the converted ones).

    Every row is measured against one base model: a converted directory's base, or a plain model
    (which then is the dense row itself)."""
    loaded = [(ref if isinstance(ref, str) else None, _as_loaded(ref, False)) for ref in refs]
    bases = {m.manifest["base_source"] if m.manifest else m.source for _, m in loaded}
    if len(bases) > 1:
        raise CcliError("compare measures every row against one base model, but these models have different bases: "
                        + ", ".join(sorted(bases)) + "; compare them in separate runs")
    base_source = bases.pop()
    plain = [m for _, m in loaded if not m.manifest]
    base = plain[0] if plain else load(base_source)
    if not plain:  # the name the base model was converted under ("minilm"), not its directory
        base.name = next(m.manifest.get("base_model") or base.name for _, m in loaded)
    if base.tokenizer is None:
        raise CcliError(f"'{base.name}' has no tokenizer: compare measures fidelity on held-out text, which needs one")
    view(base.model)  # fail early on unsupported families
    converted = [(label or m.name, m) for label, m in loaded if m.manifest]
    return base, converted


def compare_models(
    models: ModelRef | Iterable[ModelRef] = None,
    *,
    baselines: bool | Iterable[str] = False,
    seq: Iterable[int] = (16, 128),
    threads: int | None = None,
    device: str = "cpu",
    min_time: float = 0.5,
    rounds: int = 5,
    data: str | None = None,
    heldout_paragraphs: int = 128,
    max_length: int = 128,
    progress=None,
) -> list[dict]:
    """One record per row: the base model (`dense`), each converted model given, and the baselines
    (`baselines=True`: every one that runs natively on `device`; or a list of names from BASELINES).

    Each record holds the row's fidelity to the base model on every bundled domain's held-out split
    and on `data` as a domain of its own (at most `heldout_paragraphs` paragraphs a domain, up to
    `max_length` tokens each; the bundled corpus's left-out domains count as unseen for every row),
    its FLOPs per token and
    weight bytes, and for each sequence length in `seq` its latency at batch 1: `rounds` rounds, each
    timing every row at every length for `min_time` seconds in turn; the median over rounds is
    reported with the spread (IQR) of the rounds' medians, and the speedup against the dense row.
    `pareto` lists the sequence lengths at which the row is on the fidelity/latency frontier."""
    _check_device(device)
    seqs = list(seq)
    if not seqs or min(seqs) < 1:
        raise CcliError("--seq takes positive integers")
    threads = threads or torch.get_num_threads()
    if threads < 1:
        raise CcliError(f"--threads must be at least 1 (got {threads})")
    if rounds < 1:
        raise CcliError(f"--rounds must be at least 1 (got {rounds})")
    if min_time <= 0:
        raise CcliError(f"--min-time must be positive (got {min_time})")
    names = _baseline_names(baselines, device)
    say = progress or (lambda message: None)

    base, converted = _parse_models(_refs(models))
    sets = evaluation_sets(None, data, per_domain=heldout_paragraphs)
    max_length = fit_length(base.model.config, max_length)
    rows = [{"row": "dense", "kind": "base", "model": base.name, "conversion": None, "module": base.model}]
    rows += [{"row": label, "kind": "converted", "model": m.source, "conversion": describe_conversion(m.manifest),
              "module": m.model} for label, m in converted]
    for name in names:
        rows.append({"row": name, "kind": "baseline", "model": base.name, "conversion": None,
                     "module": _build_baseline(name, base.model)})

    inputs = {s: build_inputs(base, batch=1, seq=s) for s in seqs}
    for row in rows:
        say(f"fidelity and FLOPs: {row['row']}")
        model = row["module"]
        row["fidelity"] = compare_domains(model, base.model, base.tokenizer, sets, max_length)
        row["task"] = "lm" if "kl" in row["fidelity"] else "embedding"
        row["weight_bytes"] = weight_bytes(model)
        row["flops_per_token"] = {}
        for s in seqs:
            if row["row"] == "int8-dynamic":
                # fvcore cannot trace torch's quantized ops; quantization keeps every linear's shape,
                # so the row does the dense model's multiply-accumulates (its linears' in int8).
                row["flops_per_token"][s] = rows[0]["flops_per_token"][s]
                row["flops_note"] = "the dense model's multiply-accumulates, the linears' in int8"
            else:
                counted = count_flops(model, inputs[s])
                row["flops_per_token"][s] = round(counted.total / inputs[s]["input_ids"].numel())
                if counted.unknown_ops:
                    row["unknown_ops"] = counted.unknown_ops

    medians = _time_interleaved(rows, inputs, device, threads, min_time, rounds, say)

    task = rows[0]["task"]
    measure = FRONTIER_MEASURE[task]
    records = []
    for i, row in enumerate(rows):
        latency = []
        for s in seqs:
            times = medians[i][s]
            dense = statistics.median(medians[0][s])
            median = statistics.median(times)
            q = statistics.quantiles(times, n=4) if len(times) > 1 else [median, median, median]
            latency.append({"seq": s, "flops_per_token": row["flops_per_token"][s], "median_ms": round(median, 3),
                            "iqr_ms": round(q[2] - q[0], 3), "rounds": len(times), "speedup": round(dense / median, 3)})
        record = {k: v for k, v in row.items() if k not in ("module", "flops_per_token")}
        record.update({"base_model": base.name, "device": device, "threads": threads, "batch": 1,
                       "heldout": {"data": data or "bundled", "paragraphs": sum(d["paragraphs"] for d in row["fidelity"]["domains"]), "max_length": max_length},
                       "frontier_measure": measure, "latency": latency})
        records.append(record)
    for k, s in enumerate(seqs):
        sign = 1 if task == "embedding" else -1  # higher cosine is better; lower KL is
        points = [(sign * r["fidelity"][measure], r["latency"][k]["median_ms"]) for r in records]
        for r, on in zip(records, pareto_front(points)):
            r["latency"][k]["pareto"] = on
    for r in records:
        r["pareto"] = [entry["seq"] for entry in r["latency"] if entry["pareto"]]
    for row in rows:
        row["module"].to("cpu")
    return records


def _time_interleaved(rows, inputs, device, threads, min_time, rounds, say) -> list[dict[int, list[float]]]:
    """Per row and sequence length, the median latency (ms) of each round. A round times every row at
    every length in turn, so slow drift of the machine (thermal, other load) reaches all rows alike."""
    modules = [row["module"].to(device) for row in rows]
    device_inputs = {s: {k: v.to(device) for k, v in x.items()} for s, x in inputs.items()}
    medians: list[dict[int, list[float]]] = [{s: [] for s in inputs} for _ in rows]
    for r in range(rounds):
        say(f"timing: round {r + 1} of {rounds}")
        for s, x in device_inputs.items():
            for i, model in enumerate(modules):
                def forward(model=model, x=x):
                    with torch.inference_mode():
                        model(**x)

                timing = time_call(forward, device=device, threads=threads, warmup=2,
                                   warmup_time=min(0.2, min_time), min_run_time=min_time)
                medians[i][s].append(timing.median_ms)
        gc.collect()
    return medians
