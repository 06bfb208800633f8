"""Forward-pass latency with torch.utils.benchmark: warm-up, fixed threads, median, IQR, p90.

Peak memory is read while the timed runs happen: CUDA's max allocated bytes on GPU, and on CPU the
highest resident set size (psutil RSS) that a sampling thread sees.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import psutil
import torch
from torch.utils import benchmark


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    p90_ms: float
    runs: int
    peak_mem_mb: float


@contextmanager
def _peak_rss(interval_s: float = 0.002):
    """Samples this process's RSS in a thread; yields a dict whose 'peak' holds the maximum in bytes."""
    process = psutil.Process()
    result = {"peak": process.memory_info().rss}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], process.memory_info().rss)
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(result["peak"], process.memory_info().rss)


def time_call(
    fn: Callable[[], object],
    *,
    device: str = "cpu",
    threads: int = 1,
    warmup: int = 3,
    warmup_time: float = 0.5,
    min_run_time: float = 2.0,
) -> Timing:
    """Time `fn()` (a complete forward pass, synchronised on GPU) and measure its peak memory."""
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run() -> None:
        fn()
        sync()

    # Warm up by count and by time: the first calls pay for allocator growth and kernel selection.
    start, calls = time.perf_counter(), 0
    while calls < warmup or time.perf_counter() - start < warmup_time:
        run()
        calls += 1
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with _peak_rss() as rss:
        timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=threads)
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    times = torch.tensor(measurement.times, dtype=torch.float64) * 1e3
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = rss["peak"] / 2**20
    return Timing(
        median_ms=float(times.median()),
        iqr_ms=float(times.quantile(0.75) - times.quantile(0.25)),
        p90_ms=float(times.quantile(0.90)),
        runs=len(measurement.times) * measurement.number_per_run,
        peak_mem_mb=round(peak, 1),
    )
