"""Backend selection shared by ccli's kernel ops (ccli::fff, ccli::ternary_linear, ...).

Every op has the same four backends: "reference" (plain PyTorch, any device), "native" (the op's C++
CPU extension, see ccli.kernels.native), "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1) and
"auto" (native on CPU when it builds, triton on CUDA when available, else the reference). An op
without a native or a Triton kernel has that backend unavailable. A `BackendSelector` holds one op's
choice and caches the resolved implementation per device type, so the op's Python kernel costs one
dict lookup per call. ccli.kernels.registry makes one for every op it registers.

The native extension also registers its own C++ CPU kernel for the op; the selector switches it on
only while "native" (explicitly or through "auto") is what CPU calls resolve to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from ccli.kernels import triton_support

if TYPE_CHECKING:
    from ccli.kernels.native import NativeExtension

BACKENDS = ("auto", "reference", "native", "triton")


class BackendSelector:
    """One op's backend choice.

    op:              name used in error messages ("fff", "ternary_linear")
    reference:       the plain-PyTorch implementation
    native_impl:     the implementation that calls the loaded native extension (may fall back to the
                     reference for inputs the extension does not handle); None if the op has none
    triton_impl:     the Triton implementation (runs wherever `triton_support.supports` says); None if
                     the op has none
    extension:       the op's NativeExtension (None exactly when native_impl is None)

    Under CCLI_REQUIRE_NATIVE=1, anything that needs the native extension to say whether it loaded
    (`available("cpu")`, "auto" or "native" on CPU) raises ccli.kernels.native.NativeUnavailable if
    it did not.
    """

    def __init__(self, op: str, *, reference: Callable, native_impl: Callable | None = None,
                 triton_impl: Callable | None = None, extension: NativeExtension | None = None):
        if (native_impl is None) != (extension is None):
            raise ValueError(f"{op}: a native implementation and its extension come together")
        self.op = op
        self.reference = reference
        self.native_impl = native_impl
        self.triton_impl = triton_impl
        self.extension = extension
        self.name = "auto"
        self.resolved: dict[str, Callable] = {}  # device type -> implementation, for `name`

    def set(self, name: str) -> None:
        """Force a backend for all later calls: "auto" (default), "reference", "native" or "triton"."""
        if name not in BACKENDS:
            raise ValueError(f"unknown {self.op} backend {name!r}; expected one of {BACKENDS}")
        self.name = name
        self.resolved.clear()
        if self.extension is not None:
            self.extension.set_dispatch(False)  # re-enabled by the next CPU call if native is still selected

    def get(self) -> str:
        return self.name

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Context manager: use backend `name` inside the block, restore the previous one after."""
        previous = self.name
        self.set(name)
        try:
            yield
        finally:
            self.set(previous)

    def available(self, device: torch.device | str = "cpu") -> list[str]:
        """Backends that can run on `device` (may build the native kernel). "auto" is always allowed too."""
        device = torch.device(device)
        names = ["reference"]
        if device.type == "cpu" and self._native_loaded():
            names.append("native")
        if self.triton_impl is not None and triton_support.supports(device):
            names.append("triton")
        return names

    def _native_loaded(self) -> bool:
        return self.extension is not None and self.extension.load() is not None

    def implementation(self, device_type: str) -> Callable:
        """The implementation for `device_type` under the current backend (cached)."""
        fn = self.resolved.get(device_type)
        return fn if fn is not None else self.resolve(device_type)

    def resolve(self, device_type: str) -> Callable:
        """Pick (and cache) the implementation for `device_type` under the current backend."""
        device = torch.device(device_type)
        if self.name == "reference":
            fn = self.reference
        elif self.name == "native":
            if self.extension is None:
                raise RuntimeError(f"{self.op}: native backend unavailable: the op has no native kernel")
            if device.type != "cpu":
                raise RuntimeError(f"{self.op}: the native backend runs on CPU tensors only, got {device.type}")
            if self.extension.load() is None:
                raise RuntimeError(f"{self.op}: native backend unavailable: {self.extension.failure_reason()}")
            fn = self.native_impl
        elif self.name == "triton":
            if self.triton_impl is None:
                raise RuntimeError(f"{self.op}: triton backend unavailable: the op has no Triton kernel")
            if not triton_support.supports(device):
                raise RuntimeError(
                    f"{self.op}: triton backend unavailable on {device.type} (needs triton, and a CUDA device, "
                    "or TRITON_INTERPRET=1 set before triton is imported for CPU tensors)"
                )
            fn = self.triton_impl
        elif device.type == "cpu":  # auto
            fn = self.native_impl if self._native_loaded() else self.reference
        elif device.type == "cuda" and self.triton_impl is not None and triton_support.supports(device):
            fn = self.triton_impl
        else:
            fn = self.reference
        self.resolved[device.type] = fn
        if device.type == "cpu" and self.extension is not None:
            # The extension's C++ CPU kernel of the op handles its dtypes itself only when native is selected.
            self.extension.set_dispatch(fn is self.native_impl)
        return fn
