"""FFF conditional-matrix-multiplication kernels (ccli.kernels): reference, native C++, Triton, FLOPs.

Test weights and inputs are dyadic (multiples of 1/16, biases of 1/256) and small, so every dot
product is exact in fp32 whatever the summation order: routing decisions (z >= 0) then agree exactly
between the oracle, the reference and the kernels, and only the activations/output sums are compared
with a tolerance.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccli.kernels import fff as F
from ccli.kernels import fff_triton, native, triton_support

REPO = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_SCALAR_ACTS = {
    "gelu": lambda z: 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * z * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3))),
    "relu": lambda z: max(z, 0.0),
    "silu": lambda z: z / (1.0 + math.exp(-z)),
}


def make_case(trees, depth, leaf_width, hidden, n_tokens, seed, dtype=torch.float32):
    """Dyadic random x, w_in, b_in, w_out for the given layout (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    rows = F.fff_rows(trees, depth, leaf_width)

    def grid(*shape, den=16, span=8):
        return (torch.randint(-span, span + 1, shape, generator=g).to(dtype)) / den

    x = grid(n_tokens, hidden)
    w_in = grid(rows, hidden)
    b_in = grid(rows, den=256, span=64)
    w_out = grid(rows, hidden)
    return x, w_in, b_in, w_out


def make_bias(hidden, seed, with_bias=True):
    """A dyadic output bias (hidden,), or None."""
    if not with_bias:
        return None
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(-64, 65, (hidden,), generator=g).float() / 256


def oracle(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, leaf_linear=0):
    """Slow per-token loop written straight from the contract, in float64."""
    act = _SCALAR_ACTS[activation]
    x, w_in, b_in, w_out = (t.double() for t in (x, w_in, b_in, w_out))
    n_tokens, hidden = x.shape
    n_internal = 2**depth - 1
    n_leaves = 2**depth
    rows_per_tree = n_internal + n_leaves * leaf_width
    y = torch.zeros(n_tokens, hidden, dtype=torch.float64)
    for t in range(n_tokens):
        for k in range(trees):
            base = k * rows_per_tree
            n = 0
            for _ in range(depth):
                z = float(x[t] @ w_in[base + n]) + float(b_in[base + n])
                y[t] += act(z) * w_out[base + n]
                n = 2 * n + 1 + (1 if z >= 0 else 0)
            first = base + n_internal + (n - n_internal) * leaf_width
            for q in range(leaf_width):
                z = float(x[t] @ w_in[first + q]) + float(b_in[first + q])
                linear = q >= leaf_width - leaf_linear  # the leaf's last leaf_linear neurons
                y[t] += (z if linear else act(z)) * w_out[first + q]
    return y


def assert_close(actual, expected, tol=1e-4):
    expected = expected.to(actual.dtype)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


@pytest.fixture(scope="module")
def native_ext():
    if native.load() is None:
        pytest.skip(f"native FFF kernel unavailable: {native.failure_reason()}")
    return native.load()


@pytest.fixture(autouse=True)
def _auto_backend():
    F.set_backend("auto")
    yield
    F.set_backend("auto")


shapes = dict(
    trees=st.integers(1, 3),
    depth=st.integers(0, 5),
    leaf_width=st.integers(1, 8),
    hidden=st.sampled_from([1, 7, 33]) | st.integers(1, 40),
    n_tokens=st.integers(1, 6),
    activation=st.sampled_from(F.ACTIVATIONS),
    seed=st.integers(0, 2**31 - 1),
    linear=st.integers(0, 13),  # leaf_linear = linear % (leaf_width + 1)
)


# --- reference vs the oracle ---------------------------------------------------------------------


@SETTINGS
@given(**shapes, with_bias=st.booleans())
def test_reference_matches_oracle(trees, depth, leaf_width, hidden, n_tokens, activation, seed, linear, with_bias):
    x, w_in, b_in, w_out = make_case(trees, depth, leaf_width, hidden, n_tokens, seed)
    b_out = make_bias(hidden, seed, with_bias)
    args = (trees, depth, leaf_width, activation)
    leaf_linear = linear % (leaf_width + 1)
    expected = oracle(x, w_in, b_in, w_out, *args, leaf_linear) + (0 if b_out is None else b_out.double())
    assert_close(F.fff_reference(x, w_in, b_in, w_out, *args, b_out, leaf_linear), expected)


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
@given(**shapes, with_bias=st.booleans())
def test_native_matches_reference(native_ext, trees, depth, leaf_width, hidden, n_tokens, activation, seed, linear,
                                  with_bias):
    x, w_in, b_in, w_out = make_case(trees, depth, leaf_width, hidden, n_tokens, seed)
    b_out = make_bias(hidden, seed, with_bias)
    args = (trees, depth, leaf_width, activation, b_out, linear % (leaf_width + 1))
    expected = F.fff_reference(x, w_in, b_in, w_out, *args)
    assert_close(native.fff_native(x, w_in, b_in, w_out, *args), expected)
    with F.use_backend("native"):
        assert_close(F.fff(x, w_in, b_in, w_out, *args), expected)


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
)
def test_native_grouped_leaves(native_ext, trees, depth, leaf_width, hidden, n_tokens, activation, seed, linear):
    """Wide leaves with many tokens take the native kernel's grouped (tokens sorted by leaf) path."""
    x, w_in, b_in, w_out = make_case(trees, depth, leaf_width, hidden, n_tokens, seed)
    args = (trees, depth, leaf_width, activation, make_bias(hidden, seed, seed % 2 == 0), linear % (leaf_width + 1))
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
)
def test_native_leaves_as_matrix_products(native_ext, trees, depth, leaf_width, hidden, n_tokens, activation, seed, linear):
    """Wide leaves reached by 16 or more tokens are computed as matrix products (leaf_gemm); leaves
    with fewer tokens in the same call take the per-token path."""
    x, w_in, b_in, w_out = make_case(trees, depth, leaf_width, hidden, n_tokens, seed)
    args = (trees, depth, leaf_width, activation, make_bias(hidden, seed, seed % 2 == 1), min(linear, leaf_width))
    assert_close(native.fff_native(x, w_in, b_in, w_out, *args), F.fff_reference(x, w_in, b_in, w_out, *args))


@pytest.mark.parametrize(
    "trees,depth,leaf_width,hidden,n_tokens",
    [(1, 11, 1, 768, 5), (1, 3, 192, 384, 4), (1, 3, 192, 384, 150), (4, 2, 3, 64, 300), (2, 0, 16, 31, 2),
     (2, 1, 64, 48, 700)],
)
def test_native_realistic_shapes(native_ext, trees, depth, leaf_width, hidden, n_tokens):
    x, w_in, b_in, w_out = make_case(trees, depth, leaf_width, hidden, n_tokens, seed=hidden)
    args = (trees, depth, leaf_width, "gelu")
    assert_close(F.fff(x, w_in, b_in, w_out, *args), F.fff_reference(x, w_in, b_in, w_out, *args))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_thread_counts(native_ext, threads):
    """Every parallel path of the native kernel (split leaf rows for few tokens, blocks of tokens,
    tokens grouped by leaf) gives the reference result whatever the thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for trees, depth, leaf_width, hidden, n_tokens in [
            (1, 3, 192, 64, 1), (2, 2, 40, 300, 2), (1, 5, 33, 257, 1), (2, 3, 24, 40, 37), (1, 6, 1, 50, 9)
        ]:
            x, w_in, b_in, w_out = make_case(trees, depth, leaf_width, hidden, n_tokens, seed=n_tokens)
            for leaf_linear in (0, leaf_width // 3, leaf_width):
                args = (trees, depth, leaf_width, "gelu", make_bias(hidden, n_tokens), leaf_linear)
                expected = F.fff_reference(x, w_in, b_in, w_out, *args)
                assert_close(native.fff_native(x, w_in, b_in, w_out, *args), expected)
    finally:
        torch.set_num_threads(previous)


def test_native_noncontiguous_and_other_dtypes(native_ext):
    x, w_in, b_in, w_out = make_case(2, 3, 4, 12, 5, seed=3)
    args = (2, 3, 4, "silu")
    expected = F.fff_reference(x, w_in, b_in, w_out, *args)
    x_nc = torch.stack([x, x], dim=-1)[..., 0]  # strided view with the same values
    w_in_nc = w_in.t().contiguous().t()
    w_out_nc = torch.stack([w_out, w_out], dim=-1)[..., 0]
    b_in_nc = torch.stack([b_in, b_in], dim=-1)[:, 1]
    assert not (x_nc.is_contiguous() or w_in_nc.is_contiguous() or w_out_nc.is_contiguous())
    with F.use_backend("native"):
        assert_close(F.fff(x_nc, w_in_nc, b_in_nc, w_out_nc, *args), expected)
        # float64 is not a native dtype: falls back to the reference
        y64 = F.fff(*(t.double() for t in (x, w_in, b_in, w_out)), *args)
        assert y64.dtype == torch.float64
        assert_close(y64.float(), expected)
        # no tokens
        assert F.fff(x[:0], w_in, b_in, w_out, *args).shape == (0, 12)
    assert F.fff_reference(x[:0], w_in, b_in, w_out, *args).shape == (0, 12)


def test_native_shape_errors(native_ext):
    x, w_in, b_in, w_out = make_case(1, 2, 2, 4, 3, seed=0)
    with F.use_backend("native"):
        with pytest.raises(ValueError, match="w_in"):
            F.fff(x, w_in[:-1], b_in, w_out, 1, 2, 2, "gelu")
        with pytest.raises(ValueError, match="activation"):
            F.fff(x, w_in, b_in, w_out, 1, 2, 2, "tanh")
        with pytest.raises(ValueError, match="b_out"):
            F.fff(x, w_in, b_in, w_out, 1, 2, 2, "gelu", torch.zeros(5))


def test_fff_any_leading_shape(native_ext):
    x, w_in, b_in, w_out = make_case(2, 2, 3, 10, 12, seed=5)
    args = (2, 2, 3, "gelu_tanh")
    expected = F.fff_reference(x, w_in, b_in, w_out, *args)
    assert_close(F.fff(x.view(3, 4, 10), w_in, b_in, w_out, *args), expected.view(3, 4, 10))
    assert_close(F.fff(x[0], w_in, b_in, w_out, *args), expected[0])


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


# --- FLOPs -----------------------------------------------------------------------------------------


class _TinyFFF(torch.nn.Module):
    def __init__(self, trees, depth, leaf_width, hidden):
        super().__init__()
        x, w_in, b_in, w_out = make_case(trees, depth, leaf_width, hidden, 1, seed=7)
        self.w_in = torch.nn.Parameter(w_in)
        self.b_in = torch.nn.Parameter(b_in)
        self.w_out = torch.nn.Parameter(w_out)
        self.cfg = (trees, depth, leaf_width, "gelu")

    def forward(self, x):
        return F.fff(x, self.w_in, self.b_in, self.w_out, *self.cfg)


@pytest.mark.parametrize("trees,depth,leaf_width,shape", [(1, 11, 1, (5, 16)), (3, 2, 4, (2, 3, 16)), (2, 0, 3, (4, 16))])
def test_flop_counter_mode(trees, depth, leaf_width, shape):
    from torch.utils.flop_counter import FlopCounterMode

    model = _TinyFFF(trees, depth, leaf_width, shape[-1])
    x = torch.randn(*shape)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    n_tokens = math.prod(shape[:-1])
    assert counter.get_total_flops() == 2 * n_tokens * trees * (depth + leaf_width) * 2 * shape[-1]
    assert counter.get_total_flops() == 2 * F.fff_macs(n_tokens, shape[-1], trees, depth, leaf_width)


@pytest.mark.parametrize("trees,depth,leaf_width,shape", [(1, 11, 1, (5, 16)), (3, 2, 4, (2, 3, 16))])
def test_fvcore_count_flops(trees, depth, leaf_width, shape):
    from ccli.measure.flops import count_flops

    model = _TinyFFF(trees, depth, leaf_width, shape[-1])
    x = torch.randn(*shape)
    with torch.no_grad():
        graph = torch.jit.trace(model, (x,), check_trace=False).inlined_graph
    assert any(node.kind() == "ccli::fff" for node in graph.nodes())
    result = count_flops(model, {"x": x})
    n_tokens = math.prod(shape[:-1])
    assert result.total == 2 * n_tokens * trees * (depth + leaf_width) * 2 * shape[-1]
    assert "ccli::fff" not in result.unknown_ops


# --- backend selection -----------------------------------------------------------------------------


def test_backend_switch(monkeypatch):
    assert F.get_backend() == "auto"
    with pytest.raises(ValueError):
        F.set_backend("cuda")
    x, w_in, b_in, w_out = make_case(1, 2, 3, 8, 4, seed=2)
    args = (1, 2, 3, "relu")
    calls = []
    real_reference = F.fff_reference

    def counting_reference(*a):
        calls.append(1)
        return real_reference(*a)

    monkeypatch.setattr(F._backends, "reference", counting_reference)
    with F.use_backend("reference"):
        assert F.get_backend() == "reference"
        y_ref = F.fff(x, w_in, b_in, w_out, *args)
        assert calls
    assert F.get_backend() == "auto"
    backends = F.available_backends("cpu")
    assert backends[0] == "reference"
    if "native" in backends:
        calls.clear()
        with F.use_backend("native"):
            assert_close(F.fff(x, w_in, b_in, w_out, *args), y_ref)
        assert not calls
        calls.clear()
        assert_close(F.fff(x, w_in, b_in, w_out, *args), y_ref)  # auto on CPU: native
        assert not calls
    if "triton" not in backends:
        with F.use_backend("triton"), pytest.raises(RuntimeError, match="triton"):
            F.fff(x, w_in, b_in, w_out, *args)
    with F.use_backend("native"), pytest.raises(RuntimeError, match="native"):
        F._resolve("meta")  # native never serves other devices


def test_native_build_failure_warns_once(monkeypatch):
    x, w_in, b_in, w_out = make_case(1, 3, 2, 8, 4, seed=4)
    args = (1, 3, 2, "gelu")
    expected = F.fff_reference(x, w_in, b_in, w_out, *args)
    builds = []

    def failing_build():
        builds.append(1)
        raise OSError("no C++ compiler (simulated)")

    monkeypatch.delenv("CCLI_REQUIRE_NATIVE", raising=False)  # this test is about the fallback
    monkeypatch.setattr(native.FFF, "compile", failing_build)
    native.reset()
    F.set_backend("auto")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert_close(F.fff(x, w_in, b_in, w_out, *args), expected)
            assert "native" not in F.available_backends("cpu")
        ours = [w for w in caught if "native FFF CPU kernel" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "no C++ compiler (simulated)" in str(ours[0].message) and "reference" in str(ours[0].message)
        assert len(builds) == 1  # not retried
        with F.use_backend("native"), pytest.raises(RuntimeError, match="unavailable"):
            F.fff(x, w_in, b_in, w_out, *args)
    finally:
        monkeypatch.undo()
        native.reset()
        F.set_backend("auto")


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


# --- Triton (CPU interpreter) -----------------------------------------------------------------------
# triton's interpreter must be chosen before triton is first imported, so these run in a child pytest
# with TRITON_INTERPRET=1 (test_triton_kernel_in_subprocess); in a session that already has it set
# they run directly.

needs_interpreter = pytest.mark.skipif(
    not triton_support.interpret_mode(), reason="needs TRITON_INTERPRET=1 before triton is imported"
)


@needs_interpreter
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**{**shapes, "n_tokens": st.integers(1, 4)}, with_bias=st.booleans())
def test_interp_triton_matches_reference(trees, depth, leaf_width, hidden, n_tokens, activation, seed, linear, with_bias):
    x, w_in, b_in, w_out = make_case(trees, depth, leaf_width, hidden, n_tokens, seed)
    args = (trees, depth, leaf_width, activation, make_bias(hidden, seed, with_bias), linear % (leaf_width + 1))
    expected = F.fff_reference(x, w_in, b_in, w_out, *args)
    assert_close(fff_triton.fff_triton(x, w_in, b_in, w_out, *args), expected)


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
    # large |z| must not overflow the sigmoid-based activations
    x_big = x * 64
    with F.use_backend("triton"):
        assert_close(F.fff(x_big, w_in, b_in, w_out, *args), F.fff_reference(x_big, w_in, b_in, w_out, *args))


def test_triton_kernel_in_subprocess():
    pytest.importorskip("triton")
    if triton_support.interpret_mode():
        pytest.skip("the interpreter tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "test_interp_"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "passed" in out and "skipped" not in out, out[-4000:]


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
    pointers = {name: "*fp32" for name in ("x_ptr", "w_in_ptr", "b_in_ptr", "w_out_ptr", "b_out_ptr", "y_ptr")}
    ints = ("H", "stride_x", "stride_y", "TREES", "DEPTH", "LEAF_WIDTH", "LEAF_GATED", "ROWS_PER_TREE", "N_INTERNAL")
    signature = {**pointers, **{name: "i32" for name in ints},
                 **{name: "constexpr" for name in ("ACT", "HAS_B_OUT", "BLOCK_H", "BLOCK_W")}}
    assert list(signature) == list(kernel.arg_names)
    for activation, has_b_out in zip(F.ACTIVATIONS, (True, False, True, False)):
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={"ACT": activation, "HAS_B_OUT": has_b_out, "BLOCK_H": 1024, "BLOCK_W": 4})
        compiled = triton.compile(source, target=GPUTarget("cuda", 80, 32), options={"num_warps": 4, "enable_fp_fusion": True})
        assert "ptx" in compiled.asm
