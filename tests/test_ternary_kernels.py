"""Ternary (BitNet b1.58) linear kernels (ccli.kernels.ternary): what only the ternary ops have.

Packing, weight and activation quantisation, the exact integer accumulators (`ternary_int_matmul`) and
quantised activations of every backend, the native kernel's own paths (row blocks of 16, extreme
activations, the layout cache, the int8 kernel choice), outlier weights, work accounting, the Triton
kernel through the op and its GPU compile. What every op must do (backends against the reference,
fake kernel, FLOP counters, backend selection, build failures) is in test_kernels.py.

The integer accumulators of act_bits=8 and the quantised activations must be identical across
backends; the float outputs agree to rtol 1e-5 / atol 1e-5 * max|y|.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from kernel_cases import (
    TERNARY_NATIVE_VARIANTS,
    TERNARY_SHAPES,
    TERNARY_TOL,
    TERNARY_TRITON_SHAPES,
    load_native_or_skip,
    needs_interpreter,
    run_interpreter_tests,
    ternary_int8_kernel,
)
from kernel_cases import assert_close as _assert_close
from kernel_cases import ternary_case as make_case
from kernel_cases import ternary_group as _group
from kernel_cases import ternary_oracle as oracle

from ccli.kernels import ternary as T
from ccli.kernels import ternary_triton, triton_support

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_close(actual, expected, tol=TERNARY_TOL):
    _assert_close(actual, expected, tol)


@pytest.fixture(scope="module", params=TERNARY_NATIVE_VARIANTS)
def native_ext(request):
    """The native extension, once with its default int8 kernel (AVX-512 VNNI where the CPU has it) and
    once with the AVX2 / scalar one ("i2"), so that a VNNI machine tests both."""
    with ternary_int8_kernel(load_native_or_skip(T._native), request.param) as ext:
        yield ext


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

shapes = TERNARY_SHAPES


@SETTINGS
@given(**shapes)
def test_native_integer_parts_and_reference_match(native_ext, n_tokens, in_features, out_features, group_frac, act_bits,
                                                  with_bias, seed):
    """The quantised activations and integer accumulators of the native kernel equal the reference's,
    and the reference equals the oracle (the float outputs of every backend: test_kernels.py)."""
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


@pytest.mark.parametrize(
    "n_tokens,in_features,out_features,group_size",
    [(1, 768, 72, 768), (5, 768, 64, 128), (70, 300, 33, 300), (130, 96, 20, 32), (3, 3072, 16, 3072), (2, 2100, 9, 2100)],
)
def test_native_int_matmul_realistic_shapes(native_ext, n_tokens, in_features, out_features, group_size):
    """Long rows (int16 accumulators flushed every 64 chunks), groups of 128, token blocks of 64 (the
    float outputs on these shapes: test_kernels.py)."""
    x, packed, *_ = make_case(n_tokens, in_features, out_features, group_size, seed=in_features)
    q, _ = T.quantize_activations(x)
    assert torch.equal(T.ternary_int_matmul(q, packed, in_features, group_size, backend="native"),
                       T.ternary_int_matmul(q, packed, in_features, group_size))


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
    assert native_ext.cache_size() > 0  # the layouts above were cached ...
    native_ext.clear_cache()
    assert native_ext.cache_size() == 0  # ... and clear_cache drops them


def test_native_bfloat16_and_no_outputs(native_ext):
    """Beyond test_kernels.py's dtypes and empty inputs: bfloat16 goes to the reference and keeps its
    dtype, and a layer with no outputs gives (N, 0)."""
    x, packed, scale, bias, _ = make_case(5, 37, 11, 10, seed=3)
    with T.use_backend("native"):
        assert T.ternary_linear(x.bfloat16(), packed, scale, None, 37, 10, 16).dtype is torch.bfloat16
        assert T.ternary_linear(x, packed[:0], scale[:0], bias[:0], 37, 10, 16).shape == (5, 0)


def test_int_matmul_rejects_an_unknown_backend():
    x, packed, *_ = make_case(3, 20, 6, 8, seed=0)
    with pytest.raises(ValueError, match="backend"):
        T.ternary_int_matmul(x.to(torch.int8), packed, 20, 8, backend="cuda")


# --- outliers and work accounting ------------------------------------------------------------------------


def test_outlier_op_adds_each_outlier_product():
    """ccli::ternary_outliers_ (both FLOP counters count it: test_kernels.py)."""
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


def test_work_accounting():
    assert T.ternary_adds(3, 768, 3072) == 3 * 768 * 3072
    assert T.ternary_scale_macs(3, 3072, 6) == 3 * 3072 * 6
    assert T.adds_for_call((2, 5, 768), (3072, 192), 768) == 10 * 768 * 3072


# --- Triton (CPU interpreter; see kernel_cases.run_interpreter_tests) ----------------------------------


@needs_interpreter
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**TERNARY_TRITON_SHAPES)
def test_interp_triton_int_matmul(n_tokens, in_features, out_features, group_frac, act_bits, with_bias, seed):
    """The Triton kernel's integer accumulators equal the reference's (its float outputs: test_kernels.py)."""
    gs = _group(in_features, group_frac)
    x, packed, *_ = make_case(n_tokens, in_features, out_features, gs, seed)
    q, _ = T.quantize_activations(x)
    assert torch.equal(T.ternary_int_matmul(q, packed, in_features, gs, backend="triton"),
                       T.ternary_int_matmul(q, packed, in_features, gs))


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
    run_interpreter_tests(__file__)


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
