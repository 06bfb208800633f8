"""What ccli's Triton kernels share: importing triton lazily, the CPU interpreter mode, and building a
kernel from plain Python source once per mode.

triton is imported lazily: importing a ccli kernel module never needs it. With TRITON_INTERPRET=1 set
before triton is first imported, kernels run in triton's CPU interpreter on CPU tensors (how the tests
run them); otherwise they need CUDA tensors.

Kernel sources are plain functions that name `tl` (and their helpers) as free globals; `LazyKernel`
binds them to a namespace holding triton and decorates them with triton.jit on first use, once for
the compiled mode and once for the interpreter (so linters see undefined names: hence the noqa marks
in the sources).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable

import torch

_IMPORT_ERROR: str | None = None


def triton_importable() -> bool:
    """Whether triton can be imported (the result is cached)."""
    global _IMPORT_ERROR
    if _IMPORT_ERROR is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _IMPORT_ERROR = ""
        except Exception as exc:  # ImportError, or a broken install
            _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    return _IMPORT_ERROR == ""


def import_error() -> str:
    """Why triton cannot be imported ("" if it can)."""
    triton_importable()
    return _IMPORT_ERROR or ""


def require_triton() -> None:
    if not triton_importable():
        raise RuntimeError(f"triton backend unavailable: {import_error()}")


def interpret_mode() -> bool:
    """True when triton runs kernels in its CPU interpreter: TRITON_INTERPRET=1 is set now and was set
    when triton was first imported (triton.language's own helpers are built in that mode at import)."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "on", "yes"):
        return False
    if not triton_importable():
        return False
    import triton.language as tl

    return type(tl.zeros).__name__ == "InterpretedFunction"


def supports(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on tensors of `device`."""
    device = torch.device(device)
    if not triton_importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpret_mode()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class LazyKernel:
    """A triton.jit kernel built from the plain function `source` on first use, with `helpers`
    (name -> plain function) jitted into the same namespace; cached per interpreter mode."""

    def __init__(self, source: Callable, helpers: dict[str, Callable] | None = None):
        self.source = source
        self.helpers = helpers or {}
        self._built: dict[bool, object] = {}

    def _build(self):
        import triton
        import triton.language as tl

        module = self.source.__module__
        ns = {"__name__": module, "tl": tl, "triton": triton}
        for name, helper in self.helpers.items():
            ns[name] = triton.jit(types.FunctionType(helper.__code__, ns, helper.__name__))
        return triton.jit(types.FunctionType(self.source.__code__, ns, self.source.__name__))

    def get(self):
        mode = interpret_mode()
        kernel = self._built.get(mode)
        if kernel is None:
            kernel = self._built[mode] = self._build()
        return kernel
