"""Ternary (BitNet b1.58) linear kernels (ccli.kernels.ternary): packing, quantisation, the reference,
native C++ and Triton backends of `ccli::ternary_linear`, the op's fake impl and FLOP accounting.

The integer accumulators of act_bits=8 (`ternary_int_matmul`) and the quantised activations must be
identical across backends; the float outputs agree to rtol 1e-5 / atol 1e-5 * max|y|.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccli.kernels import ternary as T
from ccli.kernels import ternary_triton, triton_support

REPO = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_case(n_tokens, in_features, out_features, group_size, seed, zero_frac=0.3):
    """Random ternary weights (packed), positive scales, bias and activations."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (out_features, in_features), generator=g).to(torch.int8)
    t[torch.rand(out_features, in_features, generator=g) < zero_frac] = 0
    packed = T.pack_ternary(t)
    scale = torch.rand(out_features, T.n_groups(in_features, group_size), generator=g) + 0.05
    bias = torch.randn(out_features, generator=g)
    x = torch.randn(n_tokens, in_features, generator=g) * 2
    return x, packed, scale, bias, t


def assert_close(actual, expected, tol=1e-5):
    expected = expected.to(actual.dtype)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


def oracle(x, t, scale, bias, group_size, act_bits):
    """Float64 loop over groups written from the definition (module doc)."""
    in_features = t.shape[1]
    if act_bits == 8:
        q, sx = T.quantize_activations(x)
        xs, mult = q.double(), sx.double()
    else:
        xs, mult = x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)
    y = torch.zeros(x.shape[0], t.shape[0], dtype=torch.float64)
    for g in range(T.n_groups(in_features, group_size)):
        cols = slice(g * group_size, min((g + 1) * group_size, in_features))
        y += (xs[:, cols] @ t[:, cols].double().T) * scale[:, g].double()
    y = mult * y
    return y if bias is None else y + bias.double()


@pytest.fixture(scope="module", params=["default", "i2"])
def native_ext(request):
    """The native extension, once with its default int8 kernel (AVX-512 VNNI where the CPU has it) and
    once with the AVX2 / scalar one ("i2"), so that a VNNI machine tests both."""
    ext = T._native.load()
    if ext is None:
        pytest.skip(f"native ternary kernel unavailable: {T._native.failure_reason()}")
    default = ext.int8_kernels()[0]
    if request.param == "i2" and default == "i2":
        pytest.skip("this build has only the i2 int8 kernel, tested as the default")
    ext.use_int8_kernel(default if request.param == "default" else request.param)
    yield ext
    ext.use_int8_kernel(default)


@pytest.fixture(autouse=True)
def _auto_backend():
    T.set_backend("auto")
    yield
    T.set_backend("auto")


# --- packing and quantisation ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 5), (3, 1), (2, 3), (4, 4), (5, 5), (7, 767), (2, 768), (1, 9)])
def test_pack_unpack_round_trip(shape):
    t = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(sum(shape))).to(torch.int8)
    packed = T.pack_ternary(t)
    assert packed.dtype is torch.uint8 and packed.shape == (shape[0], math.ceil(shape[1] / 4))
    assert torch.equal(T.unpack_ternary(packed, shape[1]), t)
    codes = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], -1).reshape(shape[0], packed.shape[1] * 4)
    assert not (codes == 3).any()
    assert not codes[:, shape[1] :].any()  # padding codes are 0
    assert torch.equal(codes[:, : shape[1]], torch.where(t > 0, 1, torch.where(t < 0, 2, 0)).to(torch.uint8))


def test_pack_layout_and_errors():
    t = torch.tensor([[1, -1, 0, 1, -1]], dtype=torch.int8)
    assert T.pack_ternary(t).tolist() == [[1 | 2 << 2 | 0 << 4 | 1 << 6, 2]]
    assert torch.equal(T.pack_ternary(t.float()), T.pack_ternary(t))
    for bad in (torch.tensor([[2, 0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[-128, 0]], dtype=torch.int8)):
        with pytest.raises(ValueError):
            T.pack_ternary(bad)
    with pytest.raises(ValueError):
        T.pack_ternary(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match="packed"):
        T.unpack_ternary(T.pack_ternary(t), 9)


@pytest.mark.parametrize("granularity,group_size", [("tensor", 128), ("channel", 128), ("group", 16), ("group", 7), ("group", 500)])
def test_quantize_weights_absmean(granularity, group_size):
    w = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    t, scale, gs = T.quantize_weights(w, granularity, group_size)
    assert t.dtype is torch.int8 and set(t.unique().tolist()) <= {-1, 0, 1}
    assert scale.dtype is torch.float32 and gs == (group_size if granularity == "group" else 50)
    groups = math.ceil(50 / gs)
    assert scale.shape == (6, groups)
    for g in range(groups):
        cols = slice(g * gs, min((g + 1) * gs, 50))
        if granularity == "tensor":
            expected = w.abs().mean().expand(6)
        else:
            expected = w[:, cols].abs().mean(1)
        torch.testing.assert_close(scale[:, g], expected)
        torch.testing.assert_close(t[:, cols].float(), torch.round(w[:, cols] / scale[:, g : g + 1]).clamp(-1, 1))
    fake = T.absmean_ternarize(w, granularity, group_size)
    assert torch.equal(fake, t.float() * scale.repeat_interleave(gs, 1)[:, :50])
    assert T.quantize_weights(torch.zeros(3, 4))[1].min().item() == pytest.approx(T.WEIGHT_EPS)
    with pytest.raises(ValueError):
        T.quantize_weights(w, "row")


def test_quantize_activations_definition():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5], [0.0] * 6, [-254.0, 1.0, 3.0, 127.0, 0.9, -1.0]])
    q, sx = T.quantize_activations(x)
    assert q.dtype is torch.int8 and sx.shape == (3, 1)
    assert q[0].tolist() == [127, 0, 2, 2, -2, 0]  # ties round to even
    assert sx[1].item() == pytest.approx(T.ACT_EPS) and not q[1].any()
    assert q[2].tolist() == [-127, 0, 2, 64, 0, 0]  # sx = 2: 1/2 -> 0, 3/2 -> 2, 127/2 -> 64
    xr = torch.randn(50, 33, generator=torch.Generator().manual_seed(0))
    q, sx = T.quantize_activations(xr)
    assert q.abs().amax(1).eq(127).all()
    torch.testing.assert_close(q.float() * sx, xr, atol=sx.max().item() / 2 + 1e-6, rtol=0)


# --- native ----------------------------------------------------------------------------------------------

shapes = {
    "n_tokens": st.sampled_from([1, 2, 3, 4, 5, 8, 9, 13]),
    "in_features": st.sampled_from([1, 3, 5, 31, 32, 33, 97, 128, 129, 255]) | st.integers(1, 300),
    "out_features": st.integers(1, 40),
    "group_frac": st.sampled_from([None, 1, 3, 8, 32, 33, 64, 100, 128]),
    "act_bits": st.sampled_from([8, 16]),
    "with_bias": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
}


def _group(in_features, group_frac):
    return in_features if group_frac is None else group_frac


@SETTINGS
@given(**shapes)
def test_native_matches_reference(native_ext, n_tokens, in_features, out_features, group_frac, act_bits, with_bias, seed):
    gs = _group(in_features, group_frac)
    x, packed, scale, bias, t = make_case(n_tokens, in_features, out_features, gs, seed)
    bias = bias if with_bias else None
    q, sx = T.quantize_activations(x)
    qn, sxn = T.quantize_activations(x, backend="native")
    assert torch.equal(q, qn) and torch.equal(sx, sxn)
    acc = T.ternary_int_matmul(q, packed, in_features, gs)
    assert acc.dtype is torch.int32 and acc.shape == (n_tokens, out_features, T.n_groups(in_features, gs))
    assert torch.equal(T.ternary_int_matmul(q, packed, in_features, gs, backend="native"), acc)
    expected = T.ternary_linear_reference(x, packed, scale, bias, in_features, gs, act_bits)
    assert_close(expected, oracle(x, t, scale, bias, gs, act_bits).float())
    assert_close(T.ternary_linear_native(x, packed, scale, bias, in_features, gs, act_bits), expected)
    with T.use_backend("native"):
        assert_close(T.ternary_linear(x, packed, scale, bias, in_features, gs, act_bits), expected)


@pytest.mark.parametrize(
    "n_tokens,in_features,out_features,group_size",
    [(1, 768, 72, 768), (5, 768, 64, 128), (70, 300, 33, 300), (130, 96, 20, 32), (3, 3072, 16, 3072), (2, 2100, 9, 2100)],
)
@pytest.mark.parametrize("act_bits", [8, 16])
def test_native_realistic_shapes(native_ext, n_tokens, in_features, out_features, group_size, act_bits):
    """Long rows (int16 accumulators flushed every 64 chunks), groups of 128, token blocks of 64."""
    x, packed, scale, bias, _ = make_case(n_tokens, in_features, out_features, group_size, seed=in_features)
    q, _ = T.quantize_activations(x)
    assert torch.equal(T.ternary_int_matmul(q, packed, in_features, group_size, backend="native"),
                       T.ternary_int_matmul(q, packed, in_features, group_size))
    expected = T.ternary_linear_reference(x, packed, scale, bias, in_features, group_size, act_bits)
    assert_close(T.ternary_linear(x, packed, scale, bias, in_features, group_size, act_bits), expected)


def test_int8_kernel_choice(native_ext):
    kernels = native_ext.int8_kernels()
    assert kernels[-1] == "i2" and set(kernels) <= {"vnni", "i2"}
    assert native_ext.int8_kernel() in kernels
    with pytest.raises(ValueError, match="not in this build"):
        native_ext.use_int8_kernel("amx")


@pytest.mark.parametrize("out_features", [1, 15, 16, 17, 33, 50])
@pytest.mark.parametrize("group_size", [32, 64, 100])
def test_native_rows_in_blocks_of_16(native_ext, out_features, group_size):
    """The VNNI kernel puts 16 rows in a vector: row counts around a block, groups of one and more chunks."""
    for n_tokens in (1, 4, 6):
        x, packed, scale, bias, _ = make_case(n_tokens, 200, out_features, group_size, seed=out_features)
        q, _ = T.quantize_activations(x)
        assert torch.equal(T.ternary_int_matmul(q, packed, 200, group_size, backend="native"),
                           T.ternary_int_matmul(q, packed, 200, group_size))
        expected = T.ternary_linear_reference(x, packed, scale, bias, 200, group_size, 8)
        assert_close(T.ternary_linear_native(x, packed, scale, bias, 200, group_size, 8), expected)


def test_native_extreme_activations(native_ext):
    """All-+127 activations against all-(+1) rows: the largest int16 partial sums the kernel can see."""
    in_features = 64 * 32 * 2 + 5
    t = torch.ones(3, in_features, dtype=torch.int8)
    t[1] = -1
    t[2, ::2] = 0
    packed = T.pack_ternary(t)
    q = torch.full((2, in_features), 127, dtype=torch.int8)
    q[1] = -127
    for gs in (in_features, 2048, 100):
        assert torch.equal(T.ternary_int_matmul(q, packed, in_features, gs, backend="native"),
                           T.ternary_int_matmul(q, packed, in_features, gs))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_thread_counts(native_ext, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n_tokens, in_features, out_features in [(1, 512, 300), (7, 256, 130), (100, 129, 70)]:
            x, packed, scale, bias, _ = make_case(n_tokens, in_features, out_features, in_features, seed=n_tokens)
            for act_bits in (8, 16):
                expected = T.ternary_linear_reference(x, packed, scale, bias, in_features, in_features, act_bits)
                assert_close(T.ternary_linear_native(x, packed, scale, bias, in_features, in_features, act_bits), expected)
    finally:
        torch.set_num_threads(previous)


def test_native_layout_cache_follows_the_weights(native_ext):
    """The private weight layout is rebuilt when the packed tensor (or the scale tensor) changes in place
    or is replaced."""
    x, packed, scale, bias, _ = make_case(4, 70, 12, 70, seed=1)
    _, packed2, *_ = make_case(4, 70, 12, 70, seed=2)
    with T.use_backend("native"):
        for act_bits in (8, 16):
            y1 = T.ternary_linear(x, packed, scale, bias, 70, 70, act_bits)
            assert_close(y1, T.ternary_linear_reference(x, packed, scale, bias, 70, 70, act_bits))
            buf = packed.clone()
            T.ternary_linear(x, buf, scale, bias, 70, 70, act_bits)
            buf.copy_(packed2)  # in place: a new version of the same tensor
            assert_close(T.ternary_linear(x, buf, scale, bias, 70, 70, act_bits),
                         T.ternary_linear_reference(x, packed2, scale, bias, 70, 70, act_bits))
            with torch.no_grad():
                buf[:, :3] = packed[:, :3]  # a partial in-place write under no_grad
            assert_close(T.ternary_linear(x, buf, scale, bias, 70, 70, act_bits),
                         T.ternary_linear_reference(x, buf.clone(), scale, bias, 70, 70, act_bits))
            scale2 = scale.clone()  # the scales are cached too (the VNNI kernel's copy of them)
            T.ternary_linear(x, packed, scale2, bias, 70, 70, act_bits)
            scale2.mul_(1.5)
            assert_close(T.ternary_linear(x, packed, scale2, bias, 70, 70, act_bits),
                         T.ternary_linear_reference(x, packed, scale2, bias, 70, 70, act_bits))
        with torch.inference_mode():  # inference tensors have no version counter
            inf = packed2.clone()
            assert_close(T.ternary_linear(x, inf, scale, bias, 70, 70, 8),
                         T.ternary_linear_reference(x, packed2, scale, bias, 70, 70, 8))
    del buf, inf, scale2
    native_ext.clear_cache()
    assert native_ext.cache_size() == 0


def test_native_noncontiguous_other_dtypes_and_empty(native_ext):
    x, packed, scale, bias, _ = make_case(5, 37, 11, 10, seed=3)
    expected = T.ternary_linear_reference(x, packed, scale, bias, 37, 10, 8)
    x_nc = torch.stack([x, x], -1)[..., 0]
    packed_nc = packed.t().contiguous().t()
    scale_nc = scale.t().contiguous().t()
    assert not (x_nc.is_contiguous() or packed_nc.is_contiguous() or scale_nc.is_contiguous())
    with T.use_backend("native"):
        assert_close(T.ternary_linear(x_nc, packed_nc, scale_nc, bias, 37, 10, 8), expected)
        y64 = T.ternary_linear(x.double(), packed, scale, bias, 37, 10, 8)  # not native: the reference
        assert y64.dtype is torch.float64
        assert_close(y64.float(), expected)
        assert T.ternary_linear(x.bfloat16(), packed, scale, None, 37, 10, 16).dtype is torch.bfloat16
        assert T.ternary_linear(x[:0], packed, scale, bias, 37, 10, 8).shape == (0, 11)
        assert T.ternary_linear(x, packed[:0], scale[:0], bias[:0], 37, 10, 16).shape == (5, 0)
    assert T.ternary_linear_reference(x[:0], packed, scale, bias, 37, 10, 8).shape == (0, 11)


def test_argument_errors(native_ext):
    x, packed, scale, bias, _ = make_case(3, 20, 6, 8, seed=0)
    for backend in T.available_backends("cpu"):
        if backend == "triton":
            continue
        with T.use_backend(backend):
            with pytest.raises(ValueError, match="act_bits"):
                T.ternary_linear(x, packed, scale, bias, 20, 8, 4)
            with pytest.raises(ValueError, match="scale"):
                T.ternary_linear(x, packed, scale[:, :2], bias, 20, 8, 8)
            with pytest.raises(ValueError, match="packed"):
                T.ternary_linear(x, packed[:, :-1], scale, bias, 20, 8, 8)
            with pytest.raises(ValueError, match="x must be"):
                T.ternary_linear(x[:, :-1], packed, scale, bias, 20, 8, 16)
            with pytest.raises(ValueError, match="bias"):
                T.ternary_linear(x, packed, scale, bias[:-1], 20, 8, 16)
    with pytest.raises(ValueError, match="backend"):
        T.ternary_int_matmul(x.to(torch.int8), packed, 20, 8, backend="cuda")


# --- the op ---------------------------------------------------------------------------------------------


def test_op_any_leading_shape_and_dispatch(native_ext):
    x, packed, scale, bias, _ = make_case(12, 40, 9, 16, seed=5)
    expected = T.ternary_linear_reference(x, packed, scale, bias, 40, 16, 8)
    assert_close(torch.ops.ccli.ternary_linear(x, packed, scale, bias, 40, 16, 8), expected)
    assert_close(T.ternary_linear(x.view(3, 4, 40), packed, scale, bias, 40, 16, 8), expected.view(3, 4, 9))
    assert_close(T.ternary_linear(x[0], packed, scale, bias, 40, 16, 8), expected[0])


def test_op_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, packed, scale, bias, _ = make_case(4, 30, 7, 30, seed=6)
    torch.library.opcheck(torch.ops.ccli.ternary_linear.default, (x, packed, scale, bias, 30, 30, 8),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.ccli.ternary_linear.default, (x, packed, scale, None, 30, 30, 16),
                          test_utils=("test_schema", "test_faketensor"))
    x3 = x.view(2, 2, 30)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x3)
        y = T.ternary_linear(fx, mode.from_tensor(packed), mode.from_tensor(scale), None, 30, 30, 8)
        assert y.shape == (2, 2, 7) and y.dtype is torch.float32
    with pytest.raises(ValueError, match="scale"):
        T.ternary_linear(x.to("meta"), packed.to("meta"), scale[:, :0].to("meta"), None, 30, 30, 8)


class _TinyTernary(torch.nn.Module):
    def __init__(self, in_features, out_features, group_size, act_bits):
        super().__init__()
        _, packed, scale, bias, _ = make_case(1, in_features, out_features, group_size, seed=7)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.bias = torch.nn.Parameter(bias)
        self.cfg = (in_features, group_size, act_bits)

    def forward(self, x):
        return T.ternary_linear(x, self.packed, self.scale, self.bias, *self.cfg)


@pytest.mark.parametrize("in_features,out_features,group_size,shape", [(16, 8, 16, (5,)), (50, 6, 16, (2, 3)), (24, 4, 5, (1,))])
def test_flop_counter_mode(in_features, out_features, group_size, shape):
    from torch.utils.flop_counter import FlopCounterMode

    model = _TinyTernary(in_features, out_features, group_size, 8)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(*shape, in_features))
    n_tokens = math.prod(shape)
    groups = math.ceil(in_features / group_size)
    assert counter.get_total_flops() == 2 * n_tokens * out_features * groups
    assert counter.get_total_flops() == 2 * T.ternary_scale_macs(n_tokens, out_features, groups)


@pytest.mark.parametrize("act_bits", [8, 16])
def test_fvcore_count_flops(act_bits):
    from ccli.measure.flops import count_flops

    model = _TinyTernary(50, 6, 16, act_bits)
    x = torch.randn(2, 3, 50)
    with torch.no_grad():
        graph = torch.jit.trace(model, (x,), check_trace=False).inlined_graph
    assert any(node.kind() == "ccli::ternary_linear" for node in graph.nodes())
    result = count_flops(model, {"x": x})
    assert result.total == 2 * 6 * 6 * 4  # epilogue multiply-accumulates only
    assert "ccli::ternary_linear" not in result.unknown_ops


def test_outlier_op_adds_each_outlier_product_and_both_counters_count_it():
    from torch.utils.flop_counter import FlopCounterMode

    from ccli.measure.flops import count_flops

    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 10), torch.randn(2, 3, 4)
    rows, cols, values = torch.tensor([0, 3, 3]), torch.tensor([9, 0, 9]), torch.tensor([2.0, -1.5, 0.25])
    expected = y.clone()
    for r, c, v in zip(rows.tolist(), cols.tolist(), values.tolist()):  # per-entry oracle
        expected[..., r] += x[..., c] * v
    assert torch.allclose(T.add_outliers_reference(y, x, rows, cols, values), expected)
    inplace = y.clone()
    assert T.add_outliers(inplace, x, rows, cols, values) is inplace  # in place: no copy of the output
    assert torch.allclose(inplace, expected)

    class Outliers(torch.nn.Module):
        def forward(self, y, x):
            return T.add_outliers(y, x, rows, cols, values)

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        Outliers()(y.clone(), x)
    assert counter.get_total_flops() == 2 * 6 * 3  # one multiply-accumulate per token and outlier
    assert count_flops(Outliers(), {"y": y, "x": x}).total == 2 * 6 * 3


def test_work_accounting():
    assert T.ternary_adds(3, 768, 3072) == 3 * 768 * 3072
    assert T.ternary_scale_macs(3, 3072, 6) == 3 * 3072 * 6
    assert T.adds_for_call((2, 5, 768), (3072, 192), 768) == 10 * 768 * 3072


# --- backend selection -----------------------------------------------------------------------------


def test_backend_switch(monkeypatch):
    assert T.get_backend() == "auto"
    with pytest.raises(ValueError):
        T.set_backend("cuda")
    x, packed, scale, bias, _ = make_case(4, 33, 7, 33, seed=2)
    args = (packed, scale, bias, 33, 33, 8)
    calls = []
    real_reference = T.ternary_linear_reference

    def counting_reference(*a):
        calls.append(1)
        return real_reference(*a)

    monkeypatch.setattr(T._backends, "reference", counting_reference)
    with T.use_backend("reference"):
        assert T.get_backend() == "reference"
        y_ref = T.ternary_linear(x, *args)
        assert calls
    assert T.get_backend() == "auto"
    backends = T.available_backends("cpu")
    assert backends[0] == "reference"
    if "native" in backends:
        calls.clear()
        with T.use_backend("native"):
            assert_close(T.ternary_linear(x, *args), y_ref)
        assert not calls
        calls.clear()
        assert_close(T.ternary_linear(x, *args), y_ref)  # auto on CPU: native
        assert not calls
    if "triton" not in backends:
        with T.use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
            T.ternary_linear(x, *args)
    with T.use_backend("native"), pytest.raises(RuntimeError, match="native"):
        T._resolve("meta")  # native never serves other devices


def test_native_build_failure_warns_once(monkeypatch):
    x, packed, scale, bias, _ = make_case(4, 21, 5, 8, seed=4)
    expected = T.ternary_linear_reference(x, packed, scale, bias, 21, 8, 8)
    builds = []

    def failing_build():
        builds.append(1)
        raise OSError("no C++ compiler (simulated)")

    monkeypatch.delenv("CCLI_REQUIRE_NATIVE", raising=False)  # this test is about the fallback
    monkeypatch.setattr(T._native, "compile", failing_build)
    T._native.reset()
    T.set_backend("auto")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert_close(T.ternary_linear(x, packed, scale, bias, 21, 8, 8), expected)
            assert "native" not in T.available_backends("cpu")
        ours = [w for w in caught if "native ternary CPU kernel" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "no C++ compiler (simulated)" in str(ours[0].message) and "reference" in str(ours[0].message)
        assert len(builds) == 1  # not retried
        with T.use_backend("native"), pytest.raises(RuntimeError, match="unavailable"):
            T.ternary_linear(x, packed, scale, bias, 21, 8, 8)
        with pytest.raises(RuntimeError, match="unavailable"):
            T.ternary_int_matmul(x.to(torch.int8), packed, 21, 8, backend="native")
    finally:
        monkeypatch.undo()
        T._native.reset()
        T.set_backend("auto")


def test_native_disabled_by_environment(monkeypatch):
    monkeypatch.delenv("CCLI_REQUIRE_NATIVE", raising=False)
    monkeypatch.setenv("CCLI_TERNARY_NATIVE", "0")
    T._native.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # disabling is not a failure: no warning
            assert T._native.load() is None
        assert "CCLI_TERNARY_NATIVE" in T._native.failure_reason()
    finally:
        monkeypatch.undo()
        T._native.reset()


# --- Triton (CPU interpreter) -----------------------------------------------------------------------
# triton's interpreter must be chosen before triton is first imported, so these run in a child pytest
# with TRITON_INTERPRET=1 (test_triton_kernel_in_subprocess); in a session that already has it set
# they run directly.

needs_interpreter = pytest.mark.skipif(
    not triton_support.interpret_mode(), reason="needs TRITON_INTERPRET=1 before triton is imported"
)


@needs_interpreter
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**{**shapes, "in_features": st.sampled_from([1, 3, 5, 33, 70, 129]),
          "group_frac": st.sampled_from([None, 8, 33, 64])})
def test_interp_triton_matches_reference(n_tokens, in_features, out_features, group_frac, act_bits, with_bias, seed):
    gs = _group(in_features, group_frac)
    x, packed, scale, bias, _ = make_case(n_tokens, in_features, out_features, gs, seed)
    bias = bias if with_bias else None
    q, _ = T.quantize_activations(x)
    assert torch.equal(T.ternary_int_matmul(q, packed, in_features, gs, backend="triton"),
                       T.ternary_int_matmul(q, packed, in_features, gs))
    expected = T.ternary_linear_reference(x, packed, scale, bias, in_features, gs, act_bits)
    assert_close(ternary_triton.ternary_linear_triton(x, packed, scale, bias, in_features, gs, act_bits), expected)


@needs_interpreter
@pytest.mark.parametrize("act_bits", [8, 16])
def test_interp_triton_through_op(act_bits):
    assert "triton" in T.available_backends("cpu")
    x, packed, scale, bias, t = make_case(70, 200, 70, 64, seed=11)
    expected = oracle(x, t, scale, bias, 64, act_bits).float()
    with T.use_backend("triton"):
        assert_close(T.ternary_linear(x, packed, scale, bias, 200, 64, act_bits), expected)
        assert_close(T.ternary_linear(x[:1], packed, scale, None, 200, 64, act_bits), expected[:1] - bias)
        assert T.ternary_linear(x[:0], packed, scale, bias, 200, 64, act_bits).shape == (0, 70)


def test_triton_kernel_in_subprocess():
    pytest.importorskip("triton")
    if triton_support.interpret_mode():
        pytest.skip("the interpreter tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "test_interp_"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "passed" in out and "skipped" not in out, out[-4000:]


def test_triton_kernel_compiles_for_cuda():
    """Ahead-of-time compile of the kernel for an sm_80 GPU (no GPU needed): catches GPU-only
    type/codegen errors (int8 tl.dot, IEEE fp32 tl.dot) the interpreter cannot see."""
    pytest.importorskip("triton")
    if triton_support.interpret_mode():
        pytest.skip("kernels are interpreted in this process")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"triton AOT API unavailable: {exc}")
    kernel = ternary_triton._KERNEL.get()
    ints = ("N", "OUT", "IN", "GS", "SPAN", "G", "NB", "stride_a")
    consts = ("MODE", "HAS_BIAS", "BLOCK_N", "BLOCK_O", "BLOCK_K")
    for mode in (ternary_triton.MODE_INT, ternary_triton.MODE_ACT8, ternary_triton.MODE_ACT16):
        signature = {
            "a_ptr": "*fp32" if mode == ternary_triton.MODE_ACT16 else "*i8",
            "packed_ptr": "*u8",
            "scale_ptr": "*fp32",
            "sx_ptr": "*fp32",
            "bias_ptr": "*fp32",
            "out_ptr": "*i32" if mode == ternary_triton.MODE_INT else "*fp32",
            **{name: "i32" for name in ints},
            **{name: "constexpr" for name in consts},
        }
        assert list(signature) == list(kernel.arg_names)
        constexprs = {"MODE": mode, "HAS_BIAS": True, "BLOCK_N": 16, "BLOCK_O": 64, "BLOCK_K": 64}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 80, 32), options={"num_warps": 4, "enable_fp_fusion": True})
        assert "ptx" in compiled.asm
        if mode != ternary_triton.MODE_ACT16:
            assert "mma" in compiled.asm["ptx"]  # int8 tensor-core dot
