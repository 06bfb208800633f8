"""The native CPU kernel for FFF trees (fff_cpu.cpp), built on first use.

`load()` compiles fff_cpu.cpp with torch.utils.cpp_extension.load (-O3, OpenMP, -march=native on
x86-64/arm64). torch caches the build (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions),
so only the first process on a machine pays for the compile (~15-25 s on 2 cores); later processes
load it in ~0.2 s. The extension's name carries a hash of the CPU's feature flags, so a cache shared
between different machines never hands one a binary built for another's instruction set.

If the build fails (no compiler, no OpenMP, ...), or CCLI_FFF_NATIVE=0 is set, `load()` returns None and
callers use the PyTorch reference. A failed build warns once and is not retried in the same process.

Loading the extension also registers its C++ function as the CPU kernel of the `ccli::fff` op, so
CPU calls skip Python entirely; ccli.kernels.fff switches it on or off (`set_dispatch`) according
to the selected backend, and when off it calls back into Python (`_dispatch_fallback`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fff_cpu.cpp")

_ext = None  # the loaded extension module
_loaded = None  # the extension once loaded, kept even after reset() (its op kernel stays registered)
_failure: str | None = None  # why it is unavailable; set once, never retried
build_seconds: float | None = None  # wall time of load() in this process (compile or cache hit)


_python_kernel = None  # ccli.kernels.fff._impl_python, set when that module is imported


def _dispatch_fallback(x, w_in, b_in, w_out, trees, depth, leaf_width, activation):
    """Called by the extension's dispatcher kernel for CPU calls it does not handle itself."""
    kernel = _python_kernel
    if kernel is None:
        from ccli.kernels import fff

        kernel = fff._impl_python
    return kernel(x, w_in, b_in, w_out, trees, depth, leaf_width, activation)


def extension_name() -> str:
    """ccli_fff_cpu_<hash of machine type and CPU flags> (see module doc)."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    ident += " " + " ".join(sorted(line.split(":", 1)[-1].split()))
                    break
    except OSError:
        ident += " " + platform.processor()
    return "ccli_fff_cpu_" + hashlib.sha1(ident.encode()).hexdigest()[:10]


def set_dispatch(enabled: bool) -> None:
    """Let the extension's CPU kernel of ccli::fff compute float32 calls itself (True) or hand every
    call to the Python backend selection (False). No-op if the extension never loaded."""
    if _loaded is not None:
        _loaded.configure(enabled)


def _cflags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        flags.append("-march=native")
    return flags


def _build():
    """Compile (or load from torch's extension cache) and return the extension module."""
    from torch.utils.cpp_extension import load as load_extension

    if not SOURCE.is_file():
        raise FileNotFoundError(f"{SOURCE} is missing (is the package data installed?)")
    return load_extension(
        name=extension_name(),
        sources=[str(SOURCE)],
        extra_cflags=_cflags(),
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def load():
    """The extension module, building it on first call; None if it cannot be built (warns once)."""
    global _ext, _loaded, _failure, build_seconds
    if _ext is not None:
        return _ext
    if _failure is not None:
        return None
    if os.environ.get("CCLI_FFF_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        _failure = "disabled by CCLI_FFF_NATIVE=0"
        return None
    start = time.perf_counter()
    log.info("ccli: loading the native FFF CPU kernel (the first build compiles C++, ~15-60 s)")
    try:
        ext = _build()
    except Exception as exc:  # compiler missing, compile error, ninja missing, ...
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        if len(reason) > 600:
            reason = reason[:600] + " ..."
        _failure = reason
        warnings.warn(
            f"ccli: could not build the native FFF CPU kernel ({reason}); "
            "using the PyTorch reference implementation instead (correct, but slower).",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    build_seconds = time.perf_counter() - start
    # Loading registered the extension's CPU kernel for ccli::fff; it defers to Python until the
    # backend selection in ccli.kernels.fff enables it.
    ext.configure(False, _dispatch_fallback)
    _ext = _loaded = ext
    return ext


def available() -> bool:
    """Whether the native kernel is usable (builds it if needed)."""
    return load() is not None


def failure_reason() -> str | None:
    """Why the native kernel is unavailable, or None (if it was never tried or it loaded)."""
    return _failure


def reset() -> None:
    """Forget the loaded/failed state so that the next `load()` tries again (for tests)."""
    global _ext, _failure, build_seconds
    set_dispatch(False)
    _ext = None
    _failure = None
    build_seconds = None


def fff_native(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    trees: int,
    depth: int,
    leaf_width: int,
    activation: str,
) -> torch.Tensor:
    """FFF forward with the native kernel (float32 CPU tensors; x is (N, H)). Raises if unavailable."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"native FFF kernel unavailable: {_failure}")
    return ext.fff_forward(x, w_in, b_in, w_out, trees, depth, leaf_width, activation)
