"""Greedy generation with the KV cache, and its timing: prefill (the prompt in one forward pass) and
decode (one token per forward pass, reusing the cache), each with its own median and spread.

Every timed run starts from an empty cache: prefill the prompt, then `new_tokens` decode steps,
each feeding the previous step's greedy token. Decode tokens/s is new_tokens / decode time. The rows
of one bench are timed in interleaved rounds (`time_generation`).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from ..arch import has_lm_head
from ..errors import CcliError
from .timing import _peak_rss


@dataclass
class GenerationTiming:
    prefill_ms: float  # median
    prefill_iqr_ms: float
    decode_ms: float  # median time of all new_tokens decode steps of one run
    decode_iqr_ms: float
    runs: int
    peak_mem_mb: float


def check_generative(model, name: str) -> None:
    """A one-line error unless `model` is a decoder language model (it has an LM head and a cache)."""
    if not has_lm_head(model) or getattr(model.config, "is_encoder_decoder", False) or not hasattr(model, "generate"):
        raise CcliError(f"--generate needs a decoder language model with an LM head; '{name}' "
                        f"({model.config.model_type}) has none")


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed the forward's `past_key_values` to `cache` (the old name warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def greedy_generate(model, input_ids: torch.Tensor, new_tokens: int, sync=lambda: None, clock=None) -> torch.Tensor:
    """Greedy continuation of `input_ids` (batch 1) by `new_tokens` decode steps with the KV cache.

    Returns the prompt followed by new_tokens + 1 tokens (the prefill's token, then one per decode
    step). With `clock` (a list), appends the seconds spent in prefill and in decode."""
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        prefilled = time.perf_counter()
        tokens = [input_ids, token]
        past, key = _cache_of(out), _cache_kwarg(model)
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{key: past})
            past = _cache_of(out)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        sync()
        if clock is not None:
            clock += [prefilled - start, time.perf_counter() - prefilled]
    return torch.cat(tokens, dim=1)


def stepwise_generate(model, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The same greedy continuation without a cache: every step runs the whole sequence again."""
    ids = input_ids
    with torch.inference_mode():
        for _ in range(new_tokens + 1):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def time_generation(models: list, input_ids: torch.Tensor, new_tokens: int, *, device: str = "cpu", threads: int = 1,
                    warmup: int = 1, min_run_time: float = 2.0, min_runs: int = 3) -> list[GenerationTiming]:
    """Time prefill and decode of each of `models` (after `warmup` untimed runs each) in interleaved
    rounds: every round runs each model once, in turn, so the machine's drift hits every row alike;
    rounds go on until each model has had `min_run_time` seconds and at least `min_runs` runs.
    Returns one timing per model, medians and IQR over its runs."""
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peaks = []
    for model in models:  # the warm-up run also gives each model's own peak memory
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with _peak_rss() as rss:
            for _ in range(max(warmup, 1)):
                greedy_generate(model, input_ids, new_tokens, sync)
        peaks.append(torch.cuda.max_memory_allocated() if device == "cuda" else rss["peak"])
    prefill: list[list[float]] = [[] for _ in models]
    decode: list[list[float]] = [[] for _ in models]
    while (min(len(p) for p in prefill) < min_runs
           or min(sum(p) + sum(d) for p, d in zip(prefill, decode)) < min_run_time):
        for i, model in enumerate(models):
            clock: list[float] = []
            greedy_generate(model, input_ids, new_tokens, sync, clock)
            prefill[i].append(clock[0])
            decode[i].append(clock[1])

    def stats(values):
        t = torch.tensor(values, dtype=torch.float64) * 1e3
        return float(t.median()), float(t.quantile(0.75) - t.quantile(0.25))

    timings = []
    for p, d, peak in zip(prefill, decode, peaks):
        (p_med, p_iqr), (d_med, d_iqr) = stats(p), stats(d)
        timings.append(GenerationTiming(p_med, p_iqr, d_med, d_iqr, len(p), round(peak / 2**20, 1)))
    return timings


def generation_row(name: str, variant: str, device: str, prompt: int, new_tokens: int, threads: int,
                   timing: GenerationTiming, random_init: bool) -> dict:
    return {
        "model": name,
        "variant": variant,
        "device": device,
        "batch": 1,
        "prompt_tokens": prompt,
        "new_tokens": new_tokens,
        "threads": threads,
        "prefill_ms": round(timing.prefill_ms, 3),
        "prefill_iqr_ms": round(timing.prefill_iqr_ms, 3),
        "decode_ms_per_token": round(timing.decode_ms / new_tokens, 4),
        "decode_iqr_ms_per_token": round(timing.decode_iqr_ms / new_tokens, 4),
        "decode_tokens_per_s": round(new_tokens / (timing.decode_ms / 1e3), 2),
        "runs": timing.runs,
        "peak_mem_mb": timing.peak_mem_mb,
        "random_init": random_init,
    }
