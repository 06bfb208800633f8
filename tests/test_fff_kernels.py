"""FFF conditional-matrix-multiplication kernels (ccli.kernels.fff): what only the `ccli::fff` op has.

The reference against a slow oracle, the native kernel's own paths (grouped leaves, leaves as matrix
products), the UltraFastBERT layout, the Triton kernel through the op and its GPU compile. What every op
must do (backends against the reference, fake kernel, FLOP counters, backend selection, build failures)
is in test_kernels.py. Inputs are dyadic, so routing is exact (kernel_cases.py).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_cases import (
    FFF_SHAPES,
    FFF_TOL,
    load_native_or_skip,
    needs_interpreter,
    run_interpreter_tests,
)
from kernel_cases import assert_close as _assert_close
from kernel_cases import fff_bias as make_bias
from kernel_cases import fff_case as make_case
from kernel_cases import fff_oracle as oracle
from kernel_cases import fff_up as make_up

from ccli.kernels import fff as F
from ccli.kernels import fff_triton, native, triton_support

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_close(actual, expected, tol=FFF_TOL):
    _assert_close(actual, expected, tol)


@pytest.fixture(scope="module")
def native_ext():
    return load_native_or_skip(native.FFF)


@pytest.fixture(autouse=True)
def _auto_backend():
    F.set_backend("auto")
    yield
    F.set_backend("auto")


shapes = FFF_SHAPES

# --- reference vs the oracle ---------------------------------------------------------------------


@SETTINGS
@given(**shapes, with_bias=st.booleans())
def test_reference_matches_oracle(trees, depth, leaf_width, hidden, n_tokens, activation, seed, linear, gated, with_bias):
    x, w_in, b_in, w_out = make_case(trees, depth, leaf_width, hidden, n_tokens, seed)
    b_out = make_bias(hidden, seed, with_bias)
    w_up = make_up(trees, depth, leaf_width, hidden, seed, gated)
    args = (trees, depth, leaf_width, activation)
    leaf_linear = 0 if gated else linear % (leaf_width + 1)
    expected = oracle(x, w_in, b_in, w_out, *args, leaf_linear, w_up) + (0 if b_out is None else b_out.double())
    assert_close(F.fff_reference(x, w_in, b_in, w_out, *args, b_out, leaf_linear, w_up), expected)


def test_reference_chunks_and_dtypes(monkeypatch):
    x, w_in, b_in, w_out = make_case(2, 3, 5, 9, 11, seed=1, dtype=torch.float64)
    args = (2, 3, 5, "gelu")
    expected = oracle(x, w_in, b_in, w_out, *args)
    monkeypatch.setattr(F, "_REF_CHUNK_ELEMENTS", 2 * 5 * 9 * 3)  # chunks of 3 tokens
    torch.testing.assert_close(F.fff_reference(x, w_in, b_in, w_out, *args), expected)
    bf16 = F.fff_reference(*(t.bfloat16() for t in (x, w_in, b_in, w_out)), *args)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (11, 9)


def test_reference_rejects_bad_arguments():
    x, w_in, b_in, w_out = make_case(1, 2, 2, 4, 3, seed=0)
    with pytest.raises(ValueError, match="activation"):
        F.fff_reference(x, w_in, b_in, w_out, 1, 2, 2, "tanh")
    with pytest.raises(ValueError, match="w_in"):
        F.fff_reference(x, w_in[:-1], b_in, w_out, 1, 2, 2, "gelu")
    with pytest.raises(ValueError, match="b_in"):
        F.fff_reference(x, w_in, b_in[:-1], w_out, 1, 2, 2, "gelu")
    with pytest.raises(ValueError, match="b_out"):
        F.fff_reference(x, w_in, b_in, w_out, 1, 2, 2, "gelu", torch.zeros(5))
    with pytest.raises(ValueError, match="leaf_linear"):
        F.fff_reference(x, w_in, b_in, w_out, 1, 2, 2, "gelu", None, 3)
    with pytest.raises(ValueError):
        F.fff(x, w_in, b_in, w_out, 1, 2, 2, "tanh")  # through the op, whatever the backend


# --- native ----------------------------------------------------------------------------------------


@SETTINGS
@given(
    trees=st.integers(1, 3),
    depth=st.integers(0, 3),
    leaf_width=st.integers(8, 13),
    hidden=st.sampled_from([1, 7, 16, 33]) | st.integers(1, 40),
    n_tokens=st.integers(8, 60),
    activation=st.sampled_from(F.ACTIVATIONS),
    seed=st.integers(0, 2**31 - 1),
    linear=st.integers(0, 13),
    gated=st.booleans(),
)
def test_native_grouped_leaves(native_ext, trees, depth, leaf_width, hidden, n_tokens, activation, seed, linear, gated):
    """Wide leaves with many tokens take the native kernel's grouped (tokens sorted by leaf) path."""
    x, w_in, b_in, w_out = make_case(trees, depth, leaf_width, hidden, n_tokens, seed)
    args = (trees, depth, leaf_width, activation, make_bias(hidden, seed, seed % 2 == 0),
            0 if gated else linear % (leaf_width + 1), make_up(trees, depth, leaf_width, hidden, seed, gated))
    assert_close(native.fff_native(x, w_in, b_in, w_out, *args), F.fff_reference(x, w_in, b_in, w_out, *args))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    trees=st.integers(1, 2),
    depth=st.integers(0, 2),
    leaf_width=st.integers(32, 40),
    hidden=st.integers(1, 40),
    n_tokens=st.integers(16, 120),
    activation=st.sampled_from(F.ACTIVATIONS),
    seed=st.integers(0, 2**31 - 1),
    linear=st.sampled_from([0, 1, 7, 32]) | st.integers(0, 40),
    gated=st.booleans(),
)
def test_native_leaves_as_matrix_products(native_ext, trees, depth, leaf_width, hidden, n_tokens, activation, seed, linear,
                                          gated):
    """Wide leaves reached by 16 or more tokens are computed as matrix products (leaf_gemm); leaves
    with fewer tokens in the same call take the per-token path."""
    x, w_in, b_in, w_out = make_case(trees, depth, leaf_width, hidden, n_tokens, seed)
    args = (trees, depth, leaf_width, activation, make_bias(hidden, seed, seed % 2 == 1),
            0 if gated else min(linear, leaf_width), make_up(trees, depth, leaf_width, hidden, seed, gated))
    assert_close(native.fff_native(x, w_in, b_in, w_out, *args), F.fff_reference(x, w_in, b_in, w_out, *args))


# --- UltraFastBERT layout -------------------------------------------------------------------------


def ufb_forward(x, linear_in, linear_out, n_trees, depth):
    """UltraFastBERT-style FFF forward (their depth: 2^(depth+1)-1 nodes per tree, node n at row n of
    its tree, z >= 0 goes to child 2n+2), hand-written from their formulation."""
    n_nodes = 2 ** (depth + 1) - 1
    batch, hidden = x.shape
    offsets = torch.arange(n_trees) * n_nodes
    current = torch.zeros(batch, n_trees, dtype=torch.long)
    all_nodes, all_logits = [], []
    for _ in range(depth + 1):
        all_nodes.append(current)
        rows = (current + offsets).flatten()
        coeffs = linear_in.weight.index_select(0, rows).view(batch, n_trees, hidden)
        logits = torch.einsum("bh,bkh->bk", x, coeffs) + linear_in.bias.index_select(0, rows).view(batch, n_trees)
        all_logits.append(logits)
        current = current * 2 + 1 + (logits >= 0).long()
    nodes = torch.stack(all_nodes, dim=2) + offsets[None, :, None]  # (B, K, depth+1)
    logits = torch.stack(all_logits, dim=2)
    out_vectors = linear_out.weight.t().index_select(0, nodes.flatten()).view(batch, n_trees, depth + 1, hidden)
    return torch.einsum("bkd,bkdh->bh", torch.nn.functional.gelu(logits), out_vectors)


@pytest.mark.parametrize("n_trees,depth", [(1, 0), (1, 3), (2, 4), (3, 2)])
def test_ultrafastbert_layout(n_trees, depth):
    hidden = 24
    torch.manual_seed(depth * 10 + n_trees)
    n_nodes = 2 ** (depth + 1) - 1
    linear_in = torch.nn.Linear(hidden, n_trees * n_nodes)
    linear_out = torch.nn.Linear(n_trees * n_nodes, hidden, bias=False)
    with torch.no_grad():  # dyadic values: exact routing (see module doc)
        for p in (linear_in.weight, linear_in.bias, linear_out.weight):
            p.copy_((p * 256).round() / 256)
        x = (torch.randn(7, hidden) * 16).round() / 16
        expected = ufb_forward(x, linear_in, linear_out, n_trees, depth)
        w_out = linear_out.weight.t().contiguous()
        for backend in F.available_backends("cpu"):
            with F.use_backend(backend):
                got = F.fff(x, linear_in.weight, linear_in.bias, w_out, n_trees, depth, 1, "gelu")
            assert_close(got, expected)


# --- Triton (CPU interpreter; see kernel_cases.run_interpreter_tests) ----------------------------------


@needs_interpreter
@pytest.mark.parametrize("activation", F.ACTIVATIONS)
def test_interp_triton_through_op(activation):
    assert "triton" in F.available_backends("cpu")
    x, w_in, b_in, w_out = make_case(2, 4, 5, 33, 3, seed=11)
    args = (2, 4, 5, activation)
    expected = oracle(x, w_in, b_in, w_out, *args)
    with F.use_backend("triton"):
        assert_close(F.fff(x, w_in, b_in, w_out, *args), expected)
        assert_close(F.fff(x[:1], w_in, b_in, w_out, *args), expected[:1])  # one token
        w_up = make_up(2, 4, 5, 33, seed=11)  # gated trees
        assert_close(F.fff(x, w_in, b_in, w_out, *args, None, 0, w_up), oracle(x, w_in, b_in, w_out, *args, 0, w_up))
    # large |z| must not overflow the sigmoid-based activations
    x_big = x * 64
    with F.use_backend("triton"):
        assert_close(F.fff(x_big, w_in, b_in, w_out, *args), F.fff_reference(x_big, w_in, b_in, w_out, *args))


def test_triton_kernel_in_subprocess():
    run_interpreter_tests(__file__)


def test_triton_kernel_compiles_for_cuda():
    """Ahead-of-time compile of the kernel for an sm_80 GPU (no GPU needed): catches GPU-only
    type/codegen errors the interpreter cannot see."""
    pytest.importorskip("triton")
    if triton_support.interpret_mode():
        pytest.skip("kernels are interpreted in this process")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"triton AOT API unavailable: {exc}")
    kernel = fff_triton._KERNEL.get()
    pointers = {name: "*fp32" for name in ("x_ptr", "w_in_ptr", "b_in_ptr", "w_out_ptr", "w_up_ptr", "b_out_ptr", "y_ptr")}
    ints = ("H", "stride_x", "stride_y", "TREES", "DEPTH", "LEAF_WIDTH", "LEAF_ACTIVATED", "ROWS_PER_TREE", "N_INTERNAL")
    signature = {**pointers, **{name: "i32" for name in ints},
                 **{name: "constexpr" for name in ("ACT", "HAS_B_OUT", "GATED", "BLOCK_H", "BLOCK_W")}}
    assert list(signature) == list(kernel.arg_names)
    for activation, has_b_out, gated in zip(F.ACTIVATIONS, (True, False, True, False), (False, True, False, True)):
        source = ASTSource(fn=kernel, signature=signature, constexprs={
            "ACT": activation, "HAS_B_OUT": has_b_out, "GATED": gated, "BLOCK_H": 1024, "BLOCK_W": 4})
        compiled = triton.compile(source, target=GPUTarget("cuda", 80, 32), options={"num_warps": 4, "enable_fp_fusion": True})
        assert "ptx" in compiled.asm
