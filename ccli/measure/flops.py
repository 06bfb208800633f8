"""FLOPs of the executed graph, through fvcore, in one unit: FLOPs = 2 x multiply-accumulates.

What is counted: every multiply-accumulate op (linear/matmul/bmm/einsum, scaled-dot-product
attention, and the custom conditional ops ccli registers). Elementwise ops, softmax, normalisation
and embedding lookups are not counted; they are listed as `uncounted_ops` so nothing is hidden.

fvcore traces the model with the real input, so a conditional op is counted by its handle for the
shapes it ran with. Custom ops register a handle with `register_flop_handle`; ccli's own kernels
do so when they are imported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

# fvcore handle signature: (inputs: list[torch._C.Value], outputs: list[torch._C.Value]) -> MACs
FlopHandle = Callable[[list[Any], list[Any]], float]
_EXTRA_HANDLES: dict[str, FlopHandle] = {}

# Ops that do no multiply-accumulates, or only O(elements) work that ccli deliberately leaves out.
# They are reported as `uncounted_ops`; any other op without a handle is reported as `unknown_ops`.
_NOT_MAC_OPS = frozenset(
    "add add_ sub rsub mul mul_ div neg pow rsqrt sqrt mean tanh gelu silu relu sigmoid softmax exp "
    "cos sin cumsum embedding layer_norm group_norm batch_norm dropout new_ones ones zeros zeros_like "
    "full where masked_fill masked_fill_ ne eq gt lt ge le arange expand_as clone fill_ copy_ sum max "
    "min abs sign clamp clamp_min round bitwise_not bitwise_and bitwise_or __and__ __or__ any all "
    "scatter gather index index_select argmax topk sort lift_fresh new_zeros floor_divide remainder "
    "triu tril type_as masked_scatter linalg_vector_norm argsort bincount searchsorted view_as".split()
)


def _mac_handles() -> dict[str, FlopHandle]:
    """fvcore's public handles for multiply-accumulate ops (its defaults also count norms; we don't)."""
    from fvcore.nn import jit_handles as h

    return {
        "aten::addmm": h.addmm_flop_jit,
        "aten::bmm": h.bmm_flop_jit,
        "aten::_convolution": h.conv_flop_jit,
        "aten::einsum": h.einsum_flop_jit,
        "aten::matmul": h.matmul_flop_jit,
        "aten::mm": h.matmul_flop_jit,
        "aten::linear": h.linear_flop_jit,
    }


def register_flop_handle(op_name: str, handle: FlopHandle) -> None:
    """Register an fvcore handle (returning multiply-accumulates) for a custom op, e.g. 'ccli::cmm'."""
    _EXTRA_HANDLES[op_name] = handle


def _shape(value) -> list[int]:
    return list(value.type().sizes())


def _sdpa_handle(inputs, outputs) -> float:
    """softmax(QK^T)V: Sq*Sk*d MACs for the scores plus Sq*Sk*dv for the context, per head.
    Grouped-query attention repeats K/V heads, so the work follows the query heads."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch_heads = 1
    for dim in q[:-2]:
        batch_heads *= dim
    sq, d = q[-2], q[-1]
    sk, dv = k[-2], v[-1]
    return batch_heads * sq * sk * (d + dv)


register_flop_handle("aten::scaled_dot_product_attention", _sdpa_handle)


@dataclass
class FlopCount:
    total: int  # FLOPs (2 x MACs) for the whole input
    by_module: dict[str, int]  # FLOPs per module path (the model's own names)
    uncounted_ops: dict[str, int] = field(default_factory=dict)  # op -> calls, not counted by design
    unknown_ops: dict[str, int] = field(default_factory=dict)  # op -> calls, no handle at all


class _Forward(nn.Module):
    """Wraps a model so that fvcore's tracer calls it with keyword inputs and gets one tensor back."""

    def __init__(self, model: nn.Module, keys: list[str]):
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *tensors):
        # Return every tensor the model outputs: returning only one would let the tracer drop work
        # the real forward does (BERT's pooler, for instance).
        out = self.model(**dict(zip(self.keys, tensors)))
        values = out.to_tuple() if hasattr(out, "to_tuple") else (out if isinstance(out, tuple) else (out,))
        return tuple(v for v in values if isinstance(v, torch.Tensor))


def count_flops(model: nn.Module, inputs: dict[str, torch.Tensor]) -> FlopCount:
    """Count FLOPs of one forward of `model(**inputs)` with fvcore (see module doc)."""
    from fvcore.nn.jit_analysis import JitModelAnalysis

    keys = list(inputs)
    wrapper = _Forward(model, keys)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = JitModelAnalysis(wrapper, tuple(inputs[k] for k in keys))
        analysis.set_op_handle(**_mac_handles(), **_EXTRA_HANDLES)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        total_macs = analysis.total()
        by_module_macs = analysis.by_module()
        unhandled = dict(analysis.unsupported_ops())
    by_module = {}
    for name, macs in by_module_macs.items():
        if name == "":
            continue  # the wrapper; "model" is the whole model and becomes ""
        path = name[len("model.") :] if name.startswith("model.") else ""
        by_module[path] = int(2 * macs)
    uncounted = {op: n for op, n in unhandled.items() if op.split("::")[-1] in _NOT_MAC_OPS or op.startswith("prim::")}
    unknown = {op: n for op, n in unhandled.items() if op not in uncounted}
    return FlopCount(int(2 * total_macs), by_module, uncounted, unknown)


def _register_cpu_sdpa_formula() -> None:
    """FlopCounterMode knows the CUDA attention kernels but not the CPU flash one SDPA runs on CPU."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def torch_flop_count(model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """The same forward counted by PyTorch's FlopCounterMode (FLOPs, 2 per MAC), as a cross-check."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_formula()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    return int(counter.get_total_flops())
