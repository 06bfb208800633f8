"""What every kernel op must do, one parametrised set over the ops of ccli.kernels.registry:

- every registered op: its schema and fake (meta) kernel (opcheck, FakeTensorMode), and its FLOP count
  from both counters (FlopCounterMode, fvcore) against a hand formula;
- every op with backends (SPECS): native and Triton agree with the reference on random shapes, on
  realistic shapes, at several thread counts, on non-contiguous inputs, other dtypes and no tokens;
  arguments are checked by every backend; any leading shape works; the backend switch; a native build
  that fails falls back to the reference with one warning, or raises under CCLI_REQUIRE_NATIVE=1;
- the kernels package itself: no import cycles, one activation table, the build lock.

What only one op has is tested in its own file (test_fff_kernels.py, test_ternary_kernels.py). A new
family's op adds its OpSpec here (test_every_registered_op_is_covered fails until it does).
"""

from __future__ import annotations

import ast
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_cases import (
    FFF_SHAPES,
    FFF_TOL,
    INT8_NATIVE_VARIANTS,
    MOE_SHAPES,
    MOE_TOL,
    REPO,
    TERNARY_NATIVE_VARIANTS,
    TERNARY_SHAPES,
    TERNARY_TOL,
    TERNARY_TRITON_SHAPES,
    assert_close,
    fff_bias,
    fff_case,
    fff_up,
    int8_token_kernel,
    load_native_or_skip,
    moe_case,
    needs_interpreter,
    run_interpreter_tests,
    ternary_case,
    ternary_group,
    ternary_int8_kernel,
)

from ccli.kernels import activations, fff_triton, int8_triton, moe_triton, native, registry, ternary_triton
from ccli.kernels import fff as F
from ccli.kernels import int8 as I
from ccli.kernels import moe as M
from ccli.kernels import ternary as T
from ccli.kernels.native import REQUIRE_ENV, NativeUnavailable

Case = tuple[torch.Tensor, tuple]  # (x, the op's other arguments)


@dataclass
class OpSpec:
    """How the shared tests drive one op with backends."""

    name: str  # its name in registry.OPS
    module: ModuleType  # the family's kernel module (set_backend, use_backend, ...)
    function: Callable  # the public wrapper: function(x (..., features), *args)
    native_direct: Callable  # the native kernel without the dispatcher: native_direct(x, *args)
    triton_direct: Callable  # the Triton kernel without the dispatcher
    tol: float
    native_variants: tuple[str, ...]  # native kernel variants every native test runs with
    native_examples: int  # random shapes: hypothesis examples, strategies and case builder
    native_shapes: dict
    triton_examples: int
    triton_shapes: dict
    make: Callable[..., Case]  # make(**drawn) -> case
    realistic: list  # (id, case builder)
    thread_cases: Callable[[], list[Case]]
    small: Callable[[], Case]  # backend switch
    failing: Callable[[], Case]  # build failure
    native_entry_points: Callable[[torch.Tensor, tuple], list[Callable]]  # more native calls that must raise
    noncontiguous: Callable[[], tuple]  # (x, args, x_nc, args_nc, tensors that must be non-contiguous)
    to_double: Callable[[torch.Tensor, tuple], Case]
    empty_shape: Callable[[tuple], tuple]  # output shape for no tokens
    bad_calls: Callable[[], list[tuple[str, torch.Tensor, tuple]]]  # (error match, x, args)
    leading: Callable[[], Case]  # 12 tokens
    fake_error: tuple[str, Callable[[torch.Tensor, tuple], Case]]  # (match, bad arguments) for meta inputs
    empty: Callable[[torch.Tensor, tuple], Case] | None = None  # no tokens (default: x[:0], the same arguments)

    @property
    def op(self) -> registry.KernelOp:
        return registry.OPS[self.name]

    @property
    def extension(self):
        return self.op.native

    def call(self, x, args):
        return self.function(x, *args)

    def reference(self, x, args):
        return self.op.reference(x, *args)

    def no_tokens(self, x, args) -> Case:
        return self.empty(x, args) if self.empty is not None else (x[:0], args)

    def native_variant(self, ext, variant):
        if self.name == "ternary_linear":
            return ternary_int8_kernel(ext, variant)
        return int8_token_kernel(ext, variant) if self.name == "int8_linear" else _nothing(ext)


class _nothing:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


# --- FFF ------------------------------------------------------------------------------------------------


def _fff_make(trees, depth, leaf_width, hidden, n_tokens, activation, seed, linear, gated, with_bias) -> Case:
    x, w_in, b_in, w_out = fff_case(trees, depth, leaf_width, hidden, n_tokens, seed)
    return x, (w_in, b_in, w_out, trees, depth, leaf_width, activation, fff_bias(hidden, seed, with_bias),
               0 if gated else linear % (leaf_width + 1), fff_up(trees, depth, leaf_width, hidden, seed, gated))


def _fff_shape_case(trees, depth, leaf_width, hidden, n_tokens, seed, activation="gelu", *extra) -> Case:
    x, w_in, b_in, w_out = fff_case(trees, depth, leaf_width, hidden, n_tokens, seed=seed)
    return x, (w_in, b_in, w_out, trees, depth, leaf_width, activation, *extra)


def _fff_realistic(trees, depth, leaf_width, hidden, n_tokens):
    return lambda: _fff_shape_case(trees, depth, leaf_width, hidden, n_tokens, hidden)


def _fff_thread_cases() -> list[Case]:
    cases = []
    for trees, depth, leaf_width, hidden, n_tokens in [
        (1, 3, 192, 64, 1), (2, 2, 40, 300, 2), (1, 5, 33, 257, 1), (2, 3, 24, 40, 37), (1, 6, 1, 50, 9)
    ]:
        x, w_in, b_in, w_out = fff_case(trees, depth, leaf_width, hidden, n_tokens, seed=n_tokens)
        for leaf_linear in (0, leaf_width // 3, leaf_width):
            cases.append((x, (w_in, b_in, w_out, trees, depth, leaf_width, "gelu", fff_bias(hidden, n_tokens), leaf_linear)))
        gated = fff_up(trees, depth, leaf_width, hidden, n_tokens)
        cases.append((x, (w_in, b_in, w_out, trees, depth, leaf_width, "silu", None, 0, gated)))
    return cases


def _fff_noncontiguous():
    x, w_in, b_in, w_out = fff_case(2, 3, 4, 12, 5, seed=3)
    rest = (2, 3, 4, "silu")
    x_nc = torch.stack([x, x], dim=-1)[..., 0]  # strided view with the same values
    w_in_nc = w_in.t().contiguous().t()
    w_out_nc = torch.stack([w_out, w_out], dim=-1)[..., 0]
    b_in_nc = torch.stack([b_in, b_in], dim=-1)[:, 1]
    return x, (w_in, b_in, w_out, *rest), x_nc, (w_in_nc, b_in_nc, w_out_nc, *rest), (x_nc, w_in_nc, w_out_nc)


def _fff_double(x, args) -> Case:
    return x.double(), tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


def _fff_bad_calls():
    x, w_in, b_in, w_out = fff_case(1, 2, 2, 4, 3, seed=0)
    return [
        ("w_in", x, (w_in[:-1], b_in, w_out, 1, 2, 2, "gelu")),
        ("activation", x, (w_in, b_in, w_out, 1, 2, 2, "tanh")),
        ("b_out", x, (w_in, b_in, w_out, 1, 2, 2, "gelu", torch.zeros(5))),
        ("w_up", x, (w_in, b_in, w_out, 1, 2, 2, "gelu", None, 0, w_in[:-1])),
        ("leaf_linear", x, (w_in, b_in, w_out, 1, 2, 2, "gelu", None, 1, w_in)),  # gated trees have no linear neurons
    ]


def _fff_fake_error(x, args):
    w_in, *rest = args
    return x, (w_in[:-1], *rest)


FFF_SPEC = OpSpec(
    name="fff",
    module=F,
    function=F.fff,
    native_direct=native.fff_native,
    triton_direct=fff_triton.fff_triton,
    tol=FFF_TOL,
    native_variants=("default",),
    native_examples=30,
    native_shapes={**FFF_SHAPES, "with_bias": st.booleans()},
    triton_examples=25,
    triton_shapes={**FFF_SHAPES, "n_tokens": st.integers(1, 4), "with_bias": st.booleans()},
    make=_fff_make,
    realistic=[(f"fff-{'-'.join(map(str, shape))}", _fff_realistic(*shape)) for shape in [
        (1, 11, 1, 768, 5), (1, 3, 192, 384, 4), (1, 3, 192, 384, 150), (4, 2, 3, 64, 300), (2, 0, 16, 31, 2),
        (2, 1, 64, 48, 700)]],
    thread_cases=_fff_thread_cases,
    small=lambda: _fff_shape_case(1, 2, 3, 8, 4, 2, "relu"),
    failing=lambda: _fff_shape_case(1, 3, 2, 8, 4, 4, "gelu"),
    native_entry_points=lambda x, args: [lambda: native.fff_native(x, *args)],
    noncontiguous=_fff_noncontiguous,
    to_double=_fff_double,
    empty_shape=lambda args: (0, args[0].shape[1]),
    bad_calls=_fff_bad_calls,
    leading=lambda: _fff_shape_case(2, 2, 3, 10, 12, 5, "gelu_tanh"),
    fake_error=("w_in", _fff_fake_error),
)


# --- ternary --------------------------------------------------------------------------------------------


def _ternary_make(n_tokens, in_features, out_features, group_frac, act_bits, with_bias, seed) -> Case:
    gs = ternary_group(in_features, group_frac)
    x, packed, scale, bias, _ = ternary_case(n_tokens, in_features, out_features, gs, seed)
    return x, (packed, scale, bias if with_bias else None, in_features, gs, act_bits)


def _ternary_shape_case(n_tokens, in_features, out_features, group_size, seed, act_bits=8) -> Case:
    x, packed, scale, bias, _ = ternary_case(n_tokens, in_features, out_features, group_size, seed=seed)
    return x, (packed, scale, bias, in_features, group_size, act_bits)


def _ternary_realistic(n_tokens, in_features, out_features, group_size, act_bits):
    return lambda: _ternary_shape_case(n_tokens, in_features, out_features, group_size, in_features, act_bits)


def _ternary_thread_cases() -> list[Case]:
    cases = []
    for n_tokens, in_features, out_features in [(1, 512, 300), (7, 256, 130), (100, 129, 70)]:
        x, packed, scale, bias, _ = ternary_case(n_tokens, in_features, out_features, in_features, seed=n_tokens)
        for act_bits in (8, 16):
            cases.append((x, (packed, scale, bias, in_features, in_features, act_bits)))
    return cases


def _ternary_noncontiguous():
    x, packed, scale, bias, _ = ternary_case(5, 37, 11, 10, seed=3)
    x_nc = torch.stack([x, x], -1)[..., 0]
    packed_nc = packed.t().contiguous().t()
    scale_nc = scale.t().contiguous().t()
    return (x, (packed, scale, bias, 37, 10, 8), x_nc, (packed_nc, scale_nc, bias, 37, 10, 8),
            (x_nc, packed_nc, scale_nc))


def _ternary_bad_calls():
    x, packed, scale, bias, _ = ternary_case(3, 20, 6, 8, seed=0)
    return [
        ("act_bits", x, (packed, scale, bias, 20, 8, 4)),
        ("scale", x, (packed, scale[:, :2], bias, 20, 8, 8)),
        ("packed", x, (packed[:, :-1], scale, bias, 20, 8, 8)),
        ("x must be", x[:, :-1], (packed, scale, bias, 20, 8, 16)),
        ("bias", x, (packed, scale, bias[:-1], 20, 8, 16)),
    ]


def _ternary_native_entry_points(x, args):
    packed, scale, bias, in_features, group_size, act_bits = args
    return [
        lambda: T.ternary_int_matmul(x.to(torch.int8), packed, in_features, group_size, backend="native"),
        lambda: T.ternary_linear_native(x, *args),
        lambda: T.quantize_activations(x, backend="native"),
    ]


def _ternary_fake_error(x, args):
    packed, scale, *rest = args
    return x, (packed, scale[:, :0], *rest)


TERNARY_SPEC = OpSpec(
    name="ternary_linear",
    module=T,
    function=T.ternary_linear,
    native_direct=T.ternary_linear_native,
    triton_direct=ternary_triton.ternary_linear_triton,
    tol=TERNARY_TOL,
    native_variants=TERNARY_NATIVE_VARIANTS,
    native_examples=40,
    native_shapes=TERNARY_SHAPES,
    triton_examples=12,
    triton_shapes=TERNARY_TRITON_SHAPES,
    make=_ternary_make,
    realistic=[(f"ternary-{'-'.join(map(str, shape))}-act{act_bits}", _ternary_realistic(*shape, act_bits))
               for shape in [(1, 768, 72, 768), (5, 768, 64, 128), (70, 300, 33, 300), (130, 96, 20, 32),
                             (3, 3072, 16, 3072), (2, 2100, 9, 2100)]
               for act_bits in (8, 16)],
    thread_cases=_ternary_thread_cases,
    small=lambda: _ternary_shape_case(4, 33, 7, 33, 2),
    failing=lambda: _ternary_shape_case(4, 21, 5, 8, 4),
    native_entry_points=_ternary_native_entry_points,
    noncontiguous=_ternary_noncontiguous,
    to_double=lambda x, args: (x.double(), args),
    empty_shape=lambda args: (0, args[0].shape[0]),
    bad_calls=_ternary_bad_calls,
    leading=lambda: _ternary_shape_case(12, 40, 9, 16, 5),
    fake_error=("scale", _ternary_fake_error),
)

# --- MoE ------------------------------------------------------------------------------------------------


def _moe_make(**drawn) -> Case:
    return moe_case(**drawn)


def _moe_realistic(n_tokens, hidden, experts, width, top_k, gated=False, **kw):
    return lambda: moe_case(n_tokens, hidden, experts, width, top_k, seed=hidden + n_tokens, gated=gated, **kw)


def _moe_thread_cases() -> list[Case]:
    cases = []
    for n_tokens, hidden, experts, width, top_k in [(1, 64, 16, 24, 6), (3, 40, 6, 10, 2), (37, 33, 8, 7, 3),
                                                   (130, 48, 12, 9, 4)]:
        for gated in (False, True):
            for ascending in (True, False):
                cases.append(moe_case(n_tokens, hidden, experts, width, top_k, seed=n_tokens, gated=gated,
                                      with_gates=gated, ascending=ascending))
    return cases


def _moe_noncontiguous():
    x, (tokens, offsets, w_in, b_in, w_out, act, w_gate, gates, b_out) = moe_case(9, 12, 4, 5, 2, seed=3, gated=True,
                                                                                 with_gates=True)
    x_nc = torch.stack([x, x], dim=-1)[..., 0]
    w_in_nc = w_in.transpose(1, 2).contiguous().transpose(1, 2)
    w_out_nc = torch.stack([w_out, w_out], dim=-1)[..., 0]
    w_gate_nc = w_gate.transpose(1, 2).contiguous().transpose(1, 2)
    args = (tokens, offsets, w_in, b_in, w_out, act, w_gate, gates, b_out)
    args_nc = (tokens, offsets, w_in_nc, b_in, w_out_nc, act, w_gate_nc, gates, b_out)
    return x, args, x_nc, args_nc, (x_nc, w_in_nc, w_out_nc, w_gate_nc)


def _moe_double(x, args) -> Case:
    return x.double(), tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _moe_bad_calls():
    x, (tokens, offsets, w_in, b_in, w_out, act, w_gate, gates, b_out) = moe_case(6, 8, 3, 4, 2, seed=0)
    args = lambda **kw: tuple({**dict(tokens=tokens, offsets=offsets, w_in=w_in, b_in=b_in, w_out=w_out, act=act,  # noqa: E731
                                      w_gate=w_gate, gates=gates, b_out=b_out), **kw}.values())
    backwards = offsets.clone()
    backwards[1], backwards[2] = offsets[2], offsets[1]
    return [
        ("w_out", x, args(w_out=w_out[:-1])),
        ("w_in", x, args(w_in=w_in[:, :-1])),
        ("w_in", x, args(w_in=w_in[:-1])),
        ("activation", x, args(act="tanh")),
        ("b_out", x, args(b_out=torch.zeros(5))),
        ("offsets", x, args(offsets=backwards)),
        ("for E=2 experts", x, args(offsets=offsets[:-1])),  # offsets of 2 experts, weights of 3
        ("tokens must index", x[:2], args()),
        ("gates", x, args(gates=torch.ones(3))),
    ]


def _moe_leading() -> Case:
    # 12 tokens, of which only the first picks experts (so that a single row, x[0], is a valid call too)
    x, (tokens, offsets, *rest) = moe_case(12, 10, 5, 3, 3, seed=5, gated=True)
    idx = torch.tensor([[0, 2, 4]])
    tokens, offsets, _ = M.group_by_expert(idx, 5)
    return x, (tokens, offsets, *rest)


def _moe_empty(x, args) -> Case:
    tokens, offsets, w_in, b_in, w_out, act, w_gate, gates, b_out = args
    return x[:0], (tokens[:0], torch.zeros_like(offsets), w_in, b_in, w_out, act, w_gate,
                   None if gates is None else gates[:0], b_out)


def _moe_fake_error(x, args):
    tokens, offsets, w_in, *rest = args
    return x, (tokens, offsets, w_in[:, :-1], *rest)  # H of the weights no longer that of x


MOE_SPEC = OpSpec(
    name="moe",
    module=M,
    function=M.moe,
    native_direct=M.moe_native,
    triton_direct=moe_triton.moe_triton,
    tol=MOE_TOL,
    native_variants=("default",),
    native_examples=40,
    native_shapes=MOE_SHAPES,
    triton_examples=12,
    triton_shapes={**MOE_SHAPES, "n_tokens": st.integers(1, 5), "hidden": st.sampled_from([1, 7, 20, 33])},
    make=_moe_make,
    realistic=[(f"moe-{'-'.join(map(str, shape))}", _moe_realistic(*shape)) for shape in [
        (1, 384, 64, 24, 14), (128, 384, 64, 24, 14), (5, 768, 64, 48, 16, True), (300, 64, 8, 16, 3),
        (1, 31, 3, 7, 3, True), (200, 33, 10, 11, 2),
        # every column block of the native kernel's input side (widths 32, 40, 56 = 48 + 8, 61) and
        # every number of tokens left over after its blocks of 8 (about 11-30 tokens per expert)
        (60, 20, 4, 32, 2), (90, 17, 6, 40, 2, True), (45, 24, 3, 56, 1), (70, 9, 5, 61, 2)]]
    + [("moe-one-expert", _moe_realistic(90, 40, 6, 8, 1, one_expert=True)),
       ("moe-unused-experts", _moe_realistic(70, 40, 12, 8, 3, unused=6))],
    thread_cases=_moe_thread_cases,
    small=lambda: moe_case(4, 8, 3, 4, 2, seed=2),
    failing=lambda: moe_case(4, 8, 3, 4, 2, seed=4, gated=True),
    native_entry_points=lambda x, args: [lambda: M.moe_native(x, *args)],
    noncontiguous=_moe_noncontiguous,
    to_double=_moe_double,
    empty_shape=lambda args: (0, args[4].shape[1]),
    bad_calls=_moe_bad_calls,
    leading=_moe_leading,
    fake_error=("w_in", _moe_fake_error),
    empty=_moe_empty,
)


# --- int8 (W8A8) ----------------------------------------------------------------------------------------


def int8_case(n_tokens, in_features, out_features, seed=0, with_bias=True, spread=1.0) -> Case:
    """Random activations (one token 100x larger when n_tokens > 2, as in MiniLM and SmolLM2), int8
    weights over the whole range, positive per-row scales and a bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, in_features, generator=g) * spread
    if n_tokens > 2:
        x[1] *= 100
    weight = torch.randint(-127, 128, (out_features, in_features), generator=g, dtype=torch.int8)
    scale = torch.rand(out_features, generator=g) * 0.01 + 1e-4
    bias = torch.randn(out_features, generator=g) if with_bias else None
    return x, (weight, scale, bias)


INT8_SHAPES = {"n_tokens": st.integers(1, 40), "in_features": st.integers(1, 300), "out_features": st.integers(1, 70),
               "seed": st.integers(0, 2**16), "with_bias": st.booleans(), "spread": st.sampled_from([1e-3, 1.0, 50.0])}


def _int8_noncontiguous():
    x, (weight, scale, bias) = int8_case(5, 37, 11, seed=3)
    x_nc = torch.stack([x, x], -1)[..., 0]
    weight_nc = weight.t().contiguous().t()
    return x, (weight, scale, bias), x_nc, (weight_nc, scale, bias), (x_nc, weight_nc)


def _int8_bad_calls():
    x, (weight, scale, bias) = int8_case(3, 20, 6, seed=0)
    return [
        ("weight", x, (weight[:, :-1], scale, bias)),
        ("weight", x, (weight.float(), scale, bias)),
        ("scale", x, (weight, scale[:-1], bias)),
        ("bias", x, (weight, scale, bias[:-1])),
        ("x must be", x[:, :0], (weight[:, :0], scale, bias)),
    ]


INT8_SPEC = OpSpec(
    name="int8_linear",
    module=I,
    function=I.int8_linear,
    native_direct=I.int8_linear_native,
    triton_direct=int8_triton.int8_linear_triton,
    tol=TERNARY_TOL,
    native_variants=INT8_NATIVE_VARIANTS,
    native_examples=40,
    native_shapes=INT8_SHAPES,
    triton_examples=12,
    triton_shapes={**INT8_SHAPES, "n_tokens": st.integers(1, 20), "in_features": st.integers(1, 150)},
    make=lambda **drawn: int8_case(**drawn),
    realistic=[(f"int8-{n}-{i}-{o}", lambda n=n, i=i, o=o: int8_case(n, i, o, seed=n))
               for n, i, o in [(1, 384, 1536), (16, 1536, 384), (128, 576, 192), (3, 3072, 768), (70, 1, 9)]],
    thread_cases=lambda: [int8_case(n, i, o, seed=n) for n, i, o in [(1, 512, 300), (7, 256, 130), (100, 129, 70)]],
    small=lambda: int8_case(4, 33, 7, seed=2),
    failing=lambda: int8_case(4, 21, 5, seed=4),
    native_entry_points=lambda x, args: [lambda: I.int8_linear_native(x, *args)],
    noncontiguous=_int8_noncontiguous,
    to_double=lambda x, args: (x.double(), args),
    empty_shape=lambda args: (0, args[0].shape[0]),
    bad_calls=_int8_bad_calls,
    leading=lambda: int8_case(12, 40, 9, seed=5),
    fake_error=("scale", lambda x, args: (x, (args[0], args[1][:0], args[2]))),
)

SPECS = [FFF_SPEC, TERNARY_SPEC, MOE_SPEC, INT8_SPEC]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(params=SPECS, ids=lambda s: s.name)
def spec(request) -> OpSpec:
    return request.param


@pytest.fixture(params=[pytest.param((s, v), id=f"{s.name}-{v}") for s in SPECS for v in s.native_variants])
def native_spec(request):
    """(spec, loaded extension) for every op and native kernel variant; skips if the extension is
    unavailable, fails under CCLI_REQUIRE_NATIVE=1."""
    spec, variant = request.param
    ext = load_native_or_skip(spec.extension)
    with spec.native_variant(ext, variant):
        yield spec, ext


@pytest.fixture(autouse=True)
def _auto_backend():
    for s in SPECS:
        s.module.set_backend("auto")
    yield
    for s in SPECS:
        s.module.set_backend("auto")


def test_every_registered_op_is_covered():
    """A new op adds an OpSpec (if it has backends) and its FLOP and fake cases here."""
    with_backends = {name for name, op in registry.OPS.items() if op.backends is not None}
    assert with_backends == {s.name for s in SPECS}
    assert {case.values[0] for case in FLOP_CASES} == set(registry.OPS)
    assert {case.values[0] for case in FAKE_CASES} == set(registry.OPS)
    for s in SPECS:
        assert s.extension is not None and s.op.triton_impl is not None


# --- backends against the reference ---------------------------------------------------------------------


def test_native_matches_reference(native_spec):
    spec, _ = native_spec

    @settings(max_examples=spec.native_examples, **SETTINGS)
    @given(drawn=st.fixed_dictionaries(spec.native_shapes))
    def check(drawn):
        x, args = spec.make(**drawn)
        expected = spec.reference(x, args)
        assert_close(spec.native_direct(x, *args), expected, spec.tol)
        with spec.module.use_backend("native"):
            assert_close(spec.call(x, args), expected, spec.tol)

    check()


@pytest.mark.parametrize("native_spec,case", [
    pytest.param((s, v), build, id=f"{case_id}-{v}")
    for s in SPECS for v in s.native_variants for case_id, build in s.realistic
], indirect=["native_spec"])
def test_native_realistic_shapes(native_spec, case):
    spec, _ = native_spec
    x, args = case()
    assert_close(spec.call(x, args), spec.reference(x, args), spec.tol)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_thread_counts(native_spec, threads):
    """Every parallel path of the native kernel gives the reference result whatever the thread count."""
    spec, _ = native_spec
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x, args in spec.thread_cases():
            assert_close(spec.native_direct(x, *args), spec.reference(x, args), spec.tol)
    finally:
        torch.set_num_threads(previous)


def test_native_noncontiguous_other_dtypes_and_empty(native_spec):
    spec, _ = native_spec
    x, args, x_nc, args_nc, must_be_strided = spec.noncontiguous()
    expected = spec.reference(x, args)
    assert not any(t.is_contiguous() for t in must_be_strided)
    with spec.module.use_backend("native"):
        assert_close(spec.call(x_nc, args_nc), expected, spec.tol)
        y64 = spec.call(*spec.to_double(x, args))  # float64 is not a native dtype: the reference
        assert y64.dtype is torch.float64
        assert_close(y64.float(), expected, spec.tol)
        assert spec.call(*spec.no_tokens(x, args)).shape == spec.empty_shape(args)  # no tokens
    assert spec.reference(*spec.no_tokens(x, args)).shape == spec.empty_shape(args)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_argument_errors(spec, backend):
    if backend == "native":
        load_native_or_skip(spec.extension)
    with spec.module.use_backend(backend):
        for match, x, args in spec.bad_calls():
            with pytest.raises(ValueError, match=match):
                spec.call(x, args)


def test_op_any_leading_shape(native_spec):
    spec, _ = native_spec
    x, args = spec.leading()
    expected = spec.reference(x, args)
    assert_close(spec.op.packet(x, *args), expected, spec.tol)  # straight through the dispatcher
    out = expected.shape[-1]
    assert_close(spec.call(x.view(3, 4, -1), args), expected.view(3, 4, out), spec.tol)
    assert_close(spec.call(x[0], args), expected[0], spec.tol)


@needs_interpreter
def test_interp_triton_matches_reference(spec):
    @settings(max_examples=spec.triton_examples, **SETTINGS)
    @given(drawn=st.fixed_dictionaries(spec.triton_shapes))
    def check(drawn):
        x, args = spec.make(**drawn)
        assert_close(spec.triton_direct(x, *args), spec.reference(x, args), spec.tol)

    check()


def test_triton_kernels_in_subprocess():
    run_interpreter_tests(__file__)


# --- backend selection ----------------------------------------------------------------------------------


def test_backend_switch(spec, monkeypatch):
    m = spec.module
    assert m.get_backend() == "auto"
    with pytest.raises(ValueError):
        m.set_backend("cuda")
    x, args = spec.small()
    calls = []
    real_reference = spec.op.reference

    def counting_reference(*a):
        calls.append(1)
        return real_reference(*a)

    monkeypatch.setattr(spec.op.backends, "reference", counting_reference)
    with m.use_backend("reference"):
        assert m.get_backend() == "reference"
        assert_close(spec.call(x, args), real_reference(x, *args), spec.tol)
        assert calls
    assert m.get_backend() == "auto"
    assert m.available_backends("cpu")[0] == "reference"
    with m.use_backend("native"), pytest.raises(RuntimeError, match="native"):
        spec.op.backends.resolve("meta")  # native never serves other devices


def test_native_backend_bypasses_the_reference(native_spec, monkeypatch):
    """With the native kernel loaded, "native" and "auto" on CPU never call the reference."""
    spec, _ = native_spec
    x, args = spec.small()
    y_ref = spec.reference(x, args)
    calls = []
    real_reference = spec.op.reference
    monkeypatch.setattr(spec.op.backends, "reference", lambda *a: calls.append(1) or real_reference(*a))
    assert "native" in spec.module.available_backends("cpu")
    with spec.module.use_backend("native"):
        assert_close(spec.call(x, args), y_ref, spec.tol)
    assert_close(spec.call(x, args), y_ref, spec.tol)  # auto on CPU: native
    assert not calls


def test_triton_backend_unavailable_raises(spec):
    if "triton" in spec.module.available_backends("cpu"):
        pytest.skip("triton runs here")
    x, args = spec.small()
    with spec.module.use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
        spec.call(x, args)


@pytest.fixture
def failing_build(spec, monkeypatch):
    """The op's extension, its build failing (simulated); CCLI_REQUIRE_NATIVE unset. Yields the list
    of build attempts."""
    builds = []

    def failing_compile():
        builds.append(1)
        raise OSError("no C++ compiler (simulated)")

    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    monkeypatch.setattr(spec.extension, "compile", failing_compile)
    spec.extension.reset()
    spec.module.set_backend("auto")
    yield builds
    monkeypatch.undo()
    spec.extension.reset()
    spec.module.set_backend("auto")


def test_native_build_failure_warns_once(spec, failing_build):
    x, args = spec.failing()
    expected = spec.reference(x, args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert_close(spec.call(x, args), expected, spec.tol)
        assert "native" not in spec.module.available_backends("cpu")
    ours = [w for w in caught if f"native {spec.extension.label} CPU kernel" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "no C++ compiler (simulated)" in str(ours[0].message) and "reference" in str(ours[0].message)
    assert len(failing_build) == 1  # not retried
    with spec.module.use_backend("native"), pytest.raises(RuntimeError, match="unavailable"):
        spec.call(x, args)
    for call in spec.native_entry_points(x, args):
        with pytest.raises(RuntimeError, match="unavailable"):
            call()


def test_native_build_failure_raises_when_required(spec, failing_build, monkeypatch):
    """CCLI_REQUIRE_NATIVE=1 (CI): no fallback and no warning, an error with the build's message,
    every time the native kernel is asked for; the reference stays usable when chosen explicitly."""
    monkeypatch.setenv(REQUIRE_ENV, "1")
    x, args = spec.failing()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for attempt in (spec.extension.load, lambda: spec.call(x, args), lambda: spec.module.available_backends("cpu"),
                        *spec.native_entry_points(x, args)):
            with pytest.raises(NativeUnavailable, match=r"CCLI_REQUIRE_NATIVE=1 .*no C\+\+ compiler \(simulated\)"):
                attempt()
        with spec.module.use_backend("reference"):
            assert_close(spec.call(x, args), spec.reference(x, args), spec.tol)
    assert len(failing_build) == 1  # failed once, reported every time


def test_native_disabled_by_environment(spec, monkeypatch):
    ext = spec.extension
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    monkeypatch.setenv(ext.env_var, "0")
    ext.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # disabling is not a failure: no warning
            assert ext.load() is None
        assert ext.env_var in ext.failure_reason()
        monkeypatch.setenv(REQUIRE_ENV, "1")  # ... unless a native kernel is required
        with pytest.raises(NativeUnavailable, match=ext.env_var):
            ext.load()
    finally:
        monkeypatch.undo()
        ext.reset()


def test_a_failed_build_is_summed_up_by_its_compiler_errors():
    """torch's message starts with the whole compiler command line: the one-line reason (warning,
    failure_reason) keeps the compiler's errors instead; NativeUnavailable carries all of it."""
    command = "c++ " + " ".join(f"-isystem /very/long/include/path/{i}" for i in range(40))
    detail = (f"RuntimeError: Error building extension 'ccli_fff_cpu_0123456789': [1/2] {command}\nFAILED: fff_cpu.o\n"
              f"{command}\n/src/fff_cpu.cpp:76:9: error: expected ';' before 'for'\nninja: build stopped")
    reason = native._one_line(detail)
    assert reason == ("RuntimeError: Error building extension 'ccli_fff_cpu_0123456789': "
                      "/src/fff_cpu.cpp:76:9: error: expected ';' before 'for'")
    assert native._one_line("OSError: no C++ compiler") == "OSError: no C++ compiler"
    assert len(native._one_line("x" * 1000)) == 604


def test_stale_build_lock_is_removed_and_a_live_one_waited_for(tmp_path):
    # torch waits forever on a build lock; a killed build leaves one behind (it once hung CI)
    assert native.clear_stale_build_lock(tmp_path) is False  # no lock: nothing to do
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - 2 * native.STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        assert native.clear_stale_build_lock(tmp_path) is True
    assert not lock.exists()

    lock.touch()  # a fresh lock: waited on until it turns stale (or is released)
    start = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        assert native.clear_stale_build_lock(tmp_path, stale_after=0.3, poll=0.05) is True
    assert time.perf_counter() - start >= 0.2 and not lock.exists()


# --- every registered op: schema, fake kernel, FLOPs ----------------------------------------------------


def _fff_fake_args(b_out, leaf_linear):
    x, args = _fff_shape_case(2, 2, 3, 10, 4, 6, "gelu", None if b_out is None else torch.zeros(10) + b_out, leaf_linear)
    return (x, *args)


def _ternary_fake_args(with_bias, act_bits):
    x, packed, scale, bias, _ = ternary_case(4, 30, 7, 30, seed=6)
    return (x, packed, scale, bias if with_bias else None, 30, 30, act_bits)


def _outlier_args():
    torch.manual_seed(0)
    return (torch.randn(2, 3, 4), torch.randn(2, 3, 10), torch.tensor([0, 3, 3]), torch.tensor([9, 0, 9]),
            torch.tensor([2.0, -1.5, 0.25]))


FAKE_CASES = [
    pytest.param("fff", lambda: _fff_fake_args(0.5, 1), id="fff-bias"),
    pytest.param("fff", lambda: _fff_fake_args(None, 0), id="fff"),
    pytest.param("ternary_linear", lambda: _ternary_fake_args(True, 8), id="ternary_linear-act8"),
    pytest.param("ternary_linear", lambda: _ternary_fake_args(False, 16), id="ternary_linear-act16"),
    pytest.param("ternary_outliers_", _outlier_args, id="ternary_outliers_"),
    pytest.param("moe", lambda: (lambda x, args: (x, *args))(*moe_case(6, 10, 4, 3, 2, seed=6)), id="moe"),
    pytest.param("moe", lambda: (lambda x, args: (x, *args))(*moe_case(6, 10, 4, 3, 2, seed=6, gated=True,
                                                                         with_gates=True, with_bias=False)),
                 id="moe-gated"),
    pytest.param("int8_linear", lambda: (lambda x, args: (x, *args))(*int8_case(5, 30, 7, seed=6)), id="int8_linear"),
    pytest.param("int8_linear", lambda: (lambda x, args: (x, *args))(*int8_case(5, 30, 7, seed=6, with_bias=False)),
                 id="int8_linear-no-bias"),
]


@pytest.mark.parametrize("name,make_args", FAKE_CASES)
def test_op_schema_and_fake_kernel(name, make_args):
    torch.library.opcheck(registry.OPS[name].overload, make_args(), test_utils=("test_schema", "test_faketensor"))


def test_fake_kernel_shapes_and_checks(spec):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, args = spec.leading()
    out = spec.reference(x[:1], args).shape[-1]
    x3 = x.view(3, 4, -1)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        y = spec.call(mode.from_tensor(x3), fake_args)
        assert y.shape == (3, 4, out) and y.dtype is torch.float32
    match, bad = spec.fake_error
    x_bad, args_bad = bad(x, args)
    with pytest.raises(ValueError, match=match):
        spec.call(x_bad.to("meta"), tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args_bad))


class _TinyFFF(torch.nn.Module):
    def __init__(self, trees, depth, leaf_width, hidden):
        super().__init__()
        x, w_in, b_in, w_out = fff_case(trees, depth, leaf_width, hidden, 1, seed=7)
        self.w_in = torch.nn.Parameter(w_in)
        self.b_in = torch.nn.Parameter(b_in)
        self.w_out = torch.nn.Parameter(w_out)
        self.cfg = (trees, depth, leaf_width, "gelu")

    def forward(self, x):
        return F.fff(x, self.w_in, self.b_in, self.w_out, *self.cfg)


class _TinyTernary(torch.nn.Module):
    def __init__(self, in_features, out_features, group_size, act_bits):
        super().__init__()
        _, packed, scale, bias, _ = ternary_case(1, in_features, out_features, group_size, seed=7)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.bias = torch.nn.Parameter(bias)
        self.cfg = (in_features, group_size, act_bits)

    def forward(self, x):
        return T.ternary_linear(x, self.packed, self.scale, self.bias, *self.cfg)


class _Outliers(torch.nn.Module):
    def __init__(self, rows, cols, values):
        super().__init__()
        self.rows, self.cols, self.values = rows, cols, values

    def forward(self, y, x):
        return T.add_outliers(y, x, self.rows, self.cols, self.values)


def _fff_flops(trees, depth, leaf_width, shape):
    n_tokens, hidden = math.prod(shape[:-1]), shape[-1]
    return (lambda: (_TinyFFF(trees, depth, leaf_width, hidden), {"x": torch.randn(*shape)}),
            2 * n_tokens * trees * (depth + leaf_width) * 2 * hidden,  # by hand
            2 * F.fff_macs(n_tokens, hidden, trees, depth, leaf_width))  # the library's formula


def _ternary_flops(in_features, out_features, group_size, shape, act_bits):
    n_tokens, groups = math.prod(shape), math.ceil(in_features / group_size)
    return (lambda: (_TinyTernary(in_features, out_features, group_size, act_bits),
                     {"x": torch.randn(*shape, in_features)}),
            2 * n_tokens * out_features * groups,  # epilogue multiply-accumulates only
            2 * T.ternary_scale_macs(n_tokens, out_features, groups))


def _outlier_flops():
    y, x, rows, cols, values = _outlier_args()
    return (lambda: (_Outliers(rows, cols, values), {"y": y.clone(), "x": x}),
            2 * 6 * 3,  # one multiply-accumulate per token and outlier
            2 * 6 * 3)


class _TinyMoE(torch.nn.Module):
    """Experts picked by a fixed rule (token t runs experts t, t+1, ..., t+k-1 mod E), through the op."""

    def __init__(self, experts, width, top_k, hidden, gated):
        super().__init__()
        _, (_, _, w_in, b_in, w_out, _, w_gate, _, _) = moe_case(1, hidden, experts, width, 1, seed=7, gated=gated)
        self.w_in, self.b_in, self.w_out, self.w_gate = w_in, b_in, w_out, w_gate
        self.experts, self.top_k = experts, top_k

    def forward(self, x):
        x2d = x.reshape(-1, x.shape[-1])
        idx = (torch.arange(x2d.shape[0]).unsqueeze(1) + torch.arange(self.top_k)) % self.experts
        tokens, offsets, _ = M.group_by_expert(idx, self.experts)
        return M.moe(x, tokens, offsets, self.w_in, self.b_in, self.w_out, "gelu", self.w_gate)


def _moe_flops(experts, width, top_k, shape, gated):
    n_tokens, hidden = math.prod(shape[:-1]), shape[-1]
    return (lambda: (_TinyMoE(experts, width, top_k, hidden, gated), {"x": torch.randn(*shape)}),
            2 * n_tokens * top_k * width * hidden * (3 if gated else 2),  # by hand: the experts each token ran
            2 * M.moe_macs(n_tokens * top_k, hidden, width, gated))


class _TinyInt8(torch.nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        _, (self.weight, self.scale, self.bias) = int8_case(1, in_features, out_features, seed=7)

    def forward(self, x):
        return I.int8_linear(x, self.weight, self.scale, self.bias)


def _int8_flops(in_features, out_features, shape):
    return (lambda: (_TinyInt8(in_features, out_features), {"x": torch.randn(*shape, in_features)}),
            2 * math.prod(shape) * in_features * out_features,  # by hand: every weight, every token
            2 * I._macs((math.prod(shape), in_features), (out_features, in_features), (out_features,)))


FLOP_CASES = [
    *(pytest.param("fff", *_fff_flops(*case), id=f"fff-{i}")
      for i, case in enumerate([(1, 11, 1, (5, 16)), (3, 2, 4, (2, 3, 16)), (2, 0, 3, (4, 16))])),
    *(pytest.param("ternary_linear", *_ternary_flops(*case), id=f"ternary_linear-{i}")
      for i, case in enumerate([(16, 8, 16, (5,), 8), (50, 6, 16, (2, 3), 8), (24, 4, 5, (1,), 8),
                                (50, 6, 16, (2, 3), 16)])),
    pytest.param("ternary_outliers_", *_outlier_flops(), id="ternary_outliers_"),
    *(pytest.param("moe", *_moe_flops(*case), id=f"moe-{i}")
      for i, case in enumerate([(8, 4, 3, (5, 16), False), (6, 5, 2, (2, 3, 16), True), (4, 3, 4, (1, 16), False)])),
    *(pytest.param("int8_linear", *_int8_flops(*case), id=f"int8_linear-{i}")
      for i, case in enumerate([(16, 8, (5,)), (50, 6, (2, 3)), (7, 1, (1,))])),
]


@pytest.mark.parametrize("name,build,expected,library", FLOP_CASES)
def test_flop_counters(name, build, expected, library):
    """FlopCounterMode and fvcore count what the op computes for the input given (hand formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ccli.measure.flops import count_flops

    assert library == expected
    model, inputs = build()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**{k: v.clone() for k, v in inputs.items()})
    assert counter.get_total_flops() == expected
    with torch.no_grad():
        graph = torch.jit.trace(model, tuple(v.clone() for v in inputs.values()), check_trace=False).inlined_graph
    assert any(node.kind() == f"ccli::{name}" for node in graph.nodes())
    result = count_flops(model, inputs)
    assert result.total == expected
    assert f"ccli::{name}" not in result.unknown_ops


# --- the kernels package --------------------------------------------------------------------------------


def _imports(path: Path, module: str) -> set[str]:
    """ccli modules `module` (at `path`) imports anywhere in its body (module level or in functions)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {name for name in found if name.startswith("ccli.")}


def test_no_import_cycles_in_kernels():
    """No ccli module imported by ccli.kernels (at module level or inside a function) leads back to
    the module importing it."""
    root = REPO / "ccli"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: {m for m in _imports(path, name) if m in modules} for name, path in modules.items()}
    kernels = sorted(name for name in modules if name.startswith("ccli.kernels."))
    assert {"ccli.kernels.fff", "ccli.kernels.ternary", "ccli.kernels.registry"} <= set(kernels)

    def reaches(start, target, seen):
        for nxt in graph[start]:
            if nxt == target:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, target, seen):
                    return True
        return False

    cycles = [name for name in kernels if reaches(name, name, set())]
    assert not cycles, {name: sorted(graph[name]) for name in cycles}


def test_one_activation_table():
    from ccli.variants import base

    assert base.ACTIVATIONS is activations.ACTIVATIONS
    assert base.activation_name is activations.activation_name
    assert base.apply_activation is activations.apply_activation
    assert F.ACTIVATIONS == activations.NAMES == ("gelu", "gelu_tanh", "relu", "silu")
    assert set(activations.ACTIVATIONS.values()) == set(activations.NAMES)
    z = torch.linspace(-6, 6, 101)
    for name, fn in [("gelu", torch.nn.functional.gelu), ("relu", torch.relu), ("silu", torch.nn.functional.silu),
                     ("gelu_tanh", lambda v: torch.nn.functional.gelu(v, approximate="tanh"))]:
        assert torch.equal(activations.apply_activation(z, name), fn(z))
    assert activations.activation_name(torch.nn.GELU()) == "gelu"
    from ccli.errors import CcliError

    with pytest.raises(CcliError, match="unknown activation"):
        activations.apply_activation(z, "tanh")
    with pytest.raises(CcliError, match="unsupported FFN activation Tanh"):
        activations.activation_name(torch.nn.Tanh())
