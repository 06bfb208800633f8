"""The one registration of ccli's kernel ops (ccli::fff, ccli::ternary_linear, ccli::ternary_outliers_, ...).

A family's kernel module declares each op once, as a `KernelOp`, and registers it with `register_op`:

    FFF_OP = register_op(KernelOp(
        name="fff",
        schema="(Tensor x, Tensor w_in, ..., int leaf_linear=0) -> Tensor",
        reference=fff_reference,          # plain PyTorch, any device
        fake=_fff_fake,                   # output shapes for FakeTensor / meta tensors (checks arguments)
        macs=_fff_macs,                   # multiply-accumulates of one call, from its arguments' shapes
        native=native.FFF, native_impl=_native_impl,   # optional: the C++ CPU extension and its caller
        triton_impl=_triton_impl,         # optional: the Triton implementation
    ))

`register_op` then does all of the wiring, the same way for every op:
- defines `ccli::<name>` in the one `ccli` library fragment, with the schema;
- makes a `BackendSelector` (ccli.kernels.backends) over reference / native / triton when the op has
  a native or a Triton kernel (else the reference is the op's kernel on every device), and registers
  its Python kernel for every device (CompositeExplicitAutograd); the native extension, once loaded,
  serves CPU calls from C++ itself and falls back to this Python kernel (ccli_op.h);
- registers the fake kernel, and the autograd formula when the op has one (`backward`, `setup_context`);
- registers the FLOP count with both counters: a FlopCounterMode formula (2 * macs FLOPs) and an fvcore
  handle (macs multiply-accumulates, ccli.measure.flops), so the two can never disagree.

`macs` receives the op's arguments in schema order, with every tensor replaced by its shape (a tuple of
sizes; an absent optional tensor stays None) and every other argument as given, and returns the
multiply-accumulates of the call: what the op computes for those inputs, never its dense shape.

`KernelOp.over_tokens(x, *args)` calls the op on x of shape (..., features) flattened to
(tokens, features) and gives the output back as (..., out).

`OPS` holds every registered op by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ccli.kernels.backends import BackendSelector
from ccli.kernels.native import NativeExtension

__all__ = ["KernelOp", "LIBRARY", "OPS", "register_op"]

LIBRARY = "ccli"
_LIB = torch.library.Library(LIBRARY, "FRAGMENT")

OPS: dict[str, KernelOp] = {}


@dataclasses.dataclass(eq=False)
class KernelOp:
    """One kernel op, as its family's module declares it (see the module doc)."""

    name: str  # the op is ccli::<name>
    schema: str  # "(Tensor x, ...) -> Tensor", without the name
    reference: Callable[..., Any]  # plain PyTorch, any device
    fake: Callable[..., Any]  # the output (empty tensors) for fake / meta inputs; validates the arguments
    macs: Callable[..., int]  # multiply-accumulates of a call from its arguments' shapes (module doc)
    native: NativeExtension | None = None  # the op's C++ CPU extension
    native_impl: Callable[..., Any] | None = None  # calls the loaded extension (from Python)
    triton_impl: Callable[..., Any] | None = None
    backward: Callable[..., Any] | None = None  # torch.library.register_autograd's backward
    setup_context: Callable[..., Any] | None = None
    # filled in by register_op
    backends: BackendSelector | None = dataclasses.field(default=None, init=False)
    kernel: Callable[..., Any] | None = dataclasses.field(default=None, init=False)  # the Python kernel
    overload: Any = dataclasses.field(default=None, init=False)  # torch.ops.ccli.<name>.default

    @property
    def qualname(self) -> str:
        return f"{LIBRARY}::{self.name}"

    @property
    def packet(self):
        """torch.ops.ccli.<name>."""
        return getattr(getattr(torch.ops, LIBRARY), self.name)

    def over_tokens(self, x: torch.Tensor, *args):
        """The op on x (..., features) as (tokens, features); returns (..., out)."""
        if x.dim() == 2:
            return self.overload(x, *args)
        shape = x.shape
        y = self.overload(x.reshape(-1, shape[-1]), *args)
        return y.view(*shape[:-1], y.shape[-1])


def register_op(op: KernelOp) -> KernelOp:
    """Define and wire `op` (see the module doc); returns it. Each name is registered once per process."""
    if op.name in OPS:
        raise RuntimeError(f"{op.qualname} is already registered")
    if (op.native is None) != (op.native_impl is None):
        raise ValueError(f"{op.qualname}: give both native and native_impl, or neither")
    _LIB.define(op.name + op.schema)
    if op.native_impl is not None or op.triton_impl is not None:
        op.backends = BackendSelector(op.name, reference=op.reference, native_impl=op.native_impl,
                                      triton_impl=op.triton_impl, extension=op.native)
        op.kernel = _python_kernel(op.backends)
    else:
        op.kernel = op.reference
    _LIB.impl(op.name, op.kernel, "CompositeExplicitAutograd")
    if op.native is not None:
        op.native.python_kernel = op.kernel  # the C++ CPU kernel's fallback
    torch.library.register_fake(op.qualname, op.fake, lib=_LIB)
    if op.backward is not None:
        torch.library.register_autograd(op.qualname, op.backward, setup_context=op.setup_context, lib=_LIB)
    op.overload = op.packet.default
    _register_flop_formula(op)
    _register_fvcore_handle(op)
    OPS[op.name] = op
    return op


def _python_kernel(backends: BackendSelector) -> Callable[..., Any]:
    implementation = backends.implementation

    def kernel(x, *args):
        """The op's Python kernel, for every device (CPU calls reach it only while the native
        extension's own C++ CPU kernel is not loaded or not selected, or for inputs it does not handle)."""
        return implementation(x.device.type)(x, *args)

    return kernel


def _register_flop_formula(op: KernelOp) -> None:
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if op.packet in flop_registry:
        return
    macs = op.macs

    def formula(*args, out_shape=None, **kwargs):
        return 2 * macs(*args, **kwargs)

    register_flop_formula(op.packet)(formula)


def _jit_value(value):
    """An fvcore (TorchScript) input as `macs` reads it: a tensor's shape, else its constant value."""
    if isinstance(value.type(), torch._C.TensorType):
        return tuple(value.type().sizes())
    return value.toIValue()


def _register_fvcore_handle(op: KernelOp) -> None:
    from ccli.measure.flops import register_flop_handle

    macs = op.macs

    def handle(inputs, outputs) -> float:
        return macs(*(_jit_value(v) for v in inputs))

    register_flop_handle(op.qualname, handle)
