"""ccli's native CPU kernels (C++ extensions), built on first use.

Each kernel is a `NativeExtension`: one C++ source next to this file, compiled by `load()` with
torch.utils.cpp_extension.load (-O3, OpenMP, -march=native on x86-64/arm64). torch caches the build
(TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions), so only the first process on a machine
pays for the compile (~15-25 s on 2 cores); later processes load it in ~0.2 s. An extension's name
carries a hash of the CPU's feature flags, so a cache shared between different machines never hands
one a binary built for another's instruction set.

- `FFF` (fff_cpu.cpp): the `ccli::fff` op (ccli.kernels.fff). The module-level functions below
  (`load`, `failure_reason`, `set_dispatch`, `reset`, `fff_native`, ...) are its API.
- `TERNARY` (ternary_cpu.cpp): the `ccli::ternary_linear` op (ccli.kernels.ternary).
- `MOE` (moe_cpu.cpp): the `ccli::moe` op (ccli.kernels.moe).
- `INT8` (int8_cpu.cpp): the `ccli::int8_linear` op (ccli.kernels.int8).

Every C++ source includes ccli_op.h, the dispatcher glue they share (the switch between the C++
kernel and the Python fallback below, `configure`, releasing the GIL); SHARED_HEADERS lists it with
the other headers the sources share, whose text is part of each extension's name.

If a build fails (no compiler, no OpenMP, ...), or the extension's environment variable
(CCLI_FFF_NATIVE / CCLI_TERNARY_NATIVE / CCLI_MOE_NATIVE / CCLI_INT8_NATIVE) or CCLI_NATIVE is set to 0, `load()` returns None and callers
use the PyTorch reference. A failed build warns once and is not retried in the same process.

With CCLI_REQUIRE_NATIVE=1 (CI sets it) there is no fallback: `load()` raises `NativeUnavailable`
instead, with the compiler's full message, every time it is called (a disabled extension raises too),
so a kernel that does not build fails loudly instead of being replaced by the reference.

Loading an extension also registers its C++ function as the CPU kernel of its op, so CPU calls skip
Python entirely; the op's registration (ccli.kernels.registry) switches it on or off (`set_dispatch`)
according to the selected backend, and when off it calls back into Python (the extension's
`python_kernel`, which the registration sets).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes")

REQUIRE_ENV = "CCLI_REQUIRE_NATIVE"


def native_required() -> bool:
    """Whether CCLI_REQUIRE_NATIVE=1 is set: a native kernel that does not load is an error, not a fallback."""
    return os.environ.get(REQUIRE_ENV, "0").strip().lower() in _ON


class NativeUnavailable(RuntimeError):
    """A native kernel did not load while CCLI_REQUIRE_NATIVE=1 forbids falling back to the reference."""


def _cpu_ident() -> str:
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    ident += " " + " ".join(sorted(line.split(":", 1)[-1].split()))
                    break
    except OSError:
        ident += " " + platform.processor()
    return ident


# A build takes well under a minute; a lock file this old was left by a process that died while
# building (killed, machine stopped). torch waits on such a lock forever, so we remove it first.
STALE_LOCK_SECONDS = 600.0


def clear_stale_build_lock(build_directory: str | os.PathLike, *, stale_after: float = STALE_LOCK_SECONDS,
                           poll: float = 0.5) -> bool:
    """Wait while another process holds the build lock of `build_directory`; once the lock is older
    than `stale_after` seconds, remove it (with a warning). Returns True if a stale lock was removed.

    torch.utils.cpp_extension takes `<build_directory>/lock` while compiling and makes every other
    process wait until the file is gone, with no time limit: a lock left behind by a killed build
    would hang every later first use of the kernel (it hung CI once).
    """
    lock = Path(build_directory) / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age >= stale_after:
            break
        time.sleep(min(poll, stale_after - age))
    try:
        lock.unlink()
    except FileNotFoundError:
        return False
    warnings.warn(f"ccli: removed a stale build lock {lock} ({age:.0f} s old, left by an interrupted build)",
                  RuntimeWarning, stacklevel=2)
    return True


def _build_directory(name: str) -> str | None:
    """torch's build directory for extension `name` (None if this torch does not expose it)."""
    from torch.utils import cpp_extension

    get = getattr(cpp_extension, "_get_build_directory", None)
    if get is None:
        return None
    try:
        return get(name, False)
    except Exception:  # noqa: BLE001 - private torch helper; the build itself will report problems
        return None


def _forget_build(name: str) -> None:
    """Make torch run the build of extension `name` again on its next load in this process (it skips
    it when the sources did not change since its last attempt, and then only reports that the library
    is missing, not why the build failed)."""
    try:
        from torch.utils.cpp_extension import JIT_EXTENSION_VERSIONER

        JIT_EXTENSION_VERSIONER.entries.pop(name, None)
    except Exception:  # noqa: BLE001 - private torch state; without it a retry only reports less
        pass


def _one_line(detail: str, limit: int = 600) -> str:
    """A failed build's error on one line: the whole of it if short, else its head and the compiler's
    error lines (torch's message starts with the full compiler command line)."""
    reason = " ".join(detail.split())
    if len(reason) > limit:
        errors = [" ".join(line.split()) for line in detail.splitlines() if "error:" in line]
        if errors:
            head = " ".join(detail.splitlines()[0].split())
            head = head.split(": [", 1)[0] if ": [" in head else head[:120]
            reason = head + ": " + " | ".join(errors)
    return reason if len(reason) <= limit else reason[:limit] + " ..."


def _cflags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        flags.append("-march=native")
    return flags


# Headers next to the sources that every extension may include (hashed into its name, see extension_name).
SHARED_HEADERS = ("ccli_op.h", "ccli_cpu.h", "ccli_quant.h")


class NativeExtension:
    """One C++ extension (a source file next to this module) that registers the CPU kernel of a
    `ccli::` op: built or loaded from torch's cache on first `load()`, or None if that fails.

    stem:       source file stem, e.g. "fff_cpu" (fff_cpu.cpp, extension ccli_fff_cpu_<cpu hash>)
    label:      name used in log messages and warnings ("native <label> CPU kernel")
    env_var:    set to 0 to disable this extension (CCLI_NATIVE=0 disables all of them)

    The C++ module must export `configure(native_enabled: bool, fallback=None)` (ccli_op.h defines it).
    """

    def __init__(self, stem: str, label: str, env_var: str):
        self.stem = stem
        self.label = label
        self.env_var = env_var
        self.source = Path(__file__).with_name(stem + ".cpp")
        self.ext = None  # the loaded extension module
        self.loaded = None  # the extension once loaded, kept after reset() (its op kernel stays registered)
        self.failure: str | None = None  # why it is unavailable (one line); set once, never retried
        self.failure_detail: str | None = None  # the whole error (the compiler's output), for NativeUnavailable
        self.build_seconds: float | None = None  # wall time of load() in this process
        self.python_kernel: Callable[..., Any] | None = None  # the op's Python kernel (set by its registration)

    def __repr__(self) -> str:
        state = "loaded" if self.ext is not None else f"failed ({self.failure})" if self.failure else "not loaded"
        return f"NativeExtension({self.stem!r}, {state})"

    def headers(self) -> list[Path]:
        """The shared headers every source includes (SHARED_HEADERS, next to it)."""
        return [self.source.with_name(name) for name in SHARED_HEADERS]

    def extension_name(self) -> str:
        """ccli_<stem>_<hash of machine type, CPU flags and the shared headers> (see module doc).
        torch rebuilds an extension when its source changes but not when a header it includes does:
        the headers' text in the name makes a changed header a new extension, built afresh."""
        ident = _cpu_ident().encode()
        for header in self.headers():
            ident += header.read_bytes() if header.is_file() else b""
        return f"ccli_{self.stem}_" + hashlib.sha1(ident).hexdigest()[:10]

    def dispatch_fallback(self, *args):
        """Called by the extension's dispatcher kernel for CPU calls it does not handle itself."""
        kernel = self.python_kernel
        if kernel is None:  # the op is defined by its registration, which sets the kernel first
            raise RuntimeError(f"ccli: the native {self.label} CPU kernel has no Python kernel to fall back to")
        return kernel(*args)

    def set_dispatch(self, enabled: bool) -> None:
        """Let the extension's CPU kernel of its op compute the calls it supports itself (True) or hand
        every call to the Python backend selection (False). No-op if the extension never loaded."""
        if self.loaded is not None:
            self.loaded.configure(enabled)

    def compile(self):
        """Compile (or load from torch's extension cache) and return the extension module."""
        from torch.utils.cpp_extension import load as load_extension

        for path in (self.source, *self.headers()):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (is the package data installed?)")
        name = self.extension_name()
        build_directory = _build_directory(name)
        if build_directory is not None:
            clear_stale_build_lock(build_directory)
        return load_extension(
            name=name,
            sources=[str(self.source)],
            extra_cflags=_cflags(),
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )

    def disabled(self) -> str | None:
        for var in (self.env_var, "CCLI_NATIVE"):
            if os.environ.get(var, "1").strip().lower() in _OFF:
                return f"disabled by {var}=0"
        return None

    def _unavailable(self) -> NativeUnavailable:
        return NativeUnavailable(
            f"ccli: the native {self.label} CPU kernel is unavailable and {REQUIRE_ENV}=1 forbids falling back to "
            f"the PyTorch reference: {self.failure_detail or self.failure}"
        )

    def load(self):
        """The extension module, building it on first call; None if it cannot be built (warns once).
        Under CCLI_REQUIRE_NATIVE=1 it raises NativeUnavailable instead of returning None."""
        if self.ext is not None:
            return self.ext
        if self.failure is None:
            self._try_load()
        if self.ext is None and native_required():
            raise self._unavailable()
        return self.ext

    def _try_load(self) -> None:
        reason = self.disabled()
        if reason is not None:
            self.failure = reason
            return
        start = time.perf_counter()
        log.info("ccli: loading the native %s CPU kernel (the first build compiles C++, ~15-60 s)", self.label)
        try:
            ext = self.compile()
        except Exception as exc:  # noqa: BLE001 - compiler missing, compile error, ninja missing, ...
            self.failure_detail = f"{type(exc).__name__}: {exc}"
            self.failure = _one_line(self.failure_detail)
            if native_required():
                raise self._unavailable() from exc
            warnings.warn(
                f"ccli: could not build the native {self.label} CPU kernel ({self.failure}); "
                "using the PyTorch reference implementation instead (correct, but slower).",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        self.build_seconds = time.perf_counter() - start
        # Loading registered the extension's CPU kernel for its op; it defers to Python until the
        # backend selection of the op's registration enables it.
        ext.configure(False, self.dispatch_fallback)
        self.ext = self.loaded = ext

    def available(self) -> bool:
        """Whether the native kernel is usable (builds it if needed)."""
        return self.load() is not None

    def failure_reason(self) -> str | None:
        """Why the native kernel is unavailable, or None (if it was never tried or it loaded)."""
        return self.failure

    def reset(self) -> None:
        """Forget the loaded/failed state so that the next `load()` tries again (for tests)."""
        self.set_dispatch(False)
        self.ext = None
        self.failure = None
        self.failure_detail = None
        self.build_seconds = None
        _forget_build(self.extension_name())


# --- the extensions (and the module-level API the FFF one has always had) -------------------------

FFF = NativeExtension("fff_cpu", "FFF", "CCLI_FFF_NATIVE")
TERNARY = NativeExtension("ternary_cpu", "ternary", "CCLI_TERNARY_NATIVE")
MOE = NativeExtension("moe_cpu", "MoE", "CCLI_MOE_NATIVE")
INT8 = NativeExtension("int8_cpu", "int8", "CCLI_INT8_NATIVE")
SOURCE = FFF.source

EXTENSIONS = {"fff": FFF, "ternary": TERNARY, "moe": MOE, "int8": INT8}

# Module attributes that mirror the FFF extension's state (read through __getattr__).
_FFF_STATE = {"_ext": "ext", "_loaded": "loaded", "_failure": "failure", "build_seconds": "build_seconds"}


def __getattr__(name: str):
    if name in _FFF_STATE:
        return getattr(FFF, _FFF_STATE[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def extension_name() -> str:
    """Name of the FFF extension: ccli_fff_cpu_<hash of machine type and CPU flags>."""
    return FFF.extension_name()


def set_dispatch(enabled: bool) -> None:
    """FFF: let the extension's CPU kernel of ccli::fff compute float32 calls itself (True) or hand
    every call to the Python backend selection (False). No-op if the extension never loaded."""
    FFF.set_dispatch(enabled)


def load():
    """The FFF extension module, building it on first call; None if it cannot be built (warns once)."""
    return FFF.load()


def available() -> bool:
    """Whether the native FFF kernel is usable (builds it if needed)."""
    return FFF.available()


def failure_reason() -> str | None:
    """Why the native FFF kernel is unavailable, or None (if it was never tried or it loaded)."""
    return FFF.failure_reason()


def reset() -> None:
    """Forget the FFF extension's loaded/failed state so that the next `load()` tries again (for tests)."""
    FFF.reset()


def fff_native(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    w_out: torch.Tensor,
    trees: int,
    depth: int,
    leaf_width: int,
    activation: str,
    b_out: torch.Tensor | None = None,
    leaf_linear: int = 0,
    w_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """FFF forward with the native kernel (float32 CPU tensors; x is (N, H)). Raises if unavailable."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"native FFF kernel unavailable: {FFF.failure}")
    return ext.fff_forward(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, b_out, leaf_linear, w_up)
