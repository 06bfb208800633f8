"""Test inputs and checks shared by the kernel tests (test_kernels.py, test_fff_kernels.py,
test_ternary_kernels.py): random cases and slow oracles per op, tolerances, the native-kernel fixture
logic (honouring CCLI_REQUIRE_NATIVE) and the Triton-interpreter subprocess.

FFF cases are dyadic (multiples of 1/16, biases of 1/256) and small, so every dot product is exact in
fp32 whatever the summation order: routing decisions (z >= 0) then agree exactly between the oracle,
the reference and the kernels, and only the activations/output sums are compared with a tolerance
(FFF_TOL relative to max|y|). Ternary cases are random ternary weights, positive scales, a bias and
activations; its float outputs agree to TERNARY_TOL (rtol, and atol relative to max|y|), its integer
accumulators and quantised activations exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st

from ccli.kernels import fff as F
from ccli.kernels import ternary as T
from ccli.kernels import triton_support

REPO = Path(__file__).resolve().parents[1]

FFF_TOL = 1e-4
TERNARY_TOL = 1e-5


def assert_close(actual, expected, tol):
    expected = expected.to(actual.dtype)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


# --- native kernels -------------------------------------------------------------------------------------


def load_native_or_skip(extension):
    """The loaded extension; skips the test if it is unavailable. Under CCLI_REQUIRE_NATIVE=1 an
    unavailable extension raises (NativeUnavailable, with the compiler's message) instead: the test fails."""
    ext = extension.load()
    if ext is None:
        pytest.skip(f"native {extension.label} kernel unavailable: {extension.failure_reason()}")
    return ext


TERNARY_NATIVE_VARIANTS = ("default", "i2")


@contextlib.contextmanager
def ternary_int8_kernel(ext, variant):
    """The ternary extension with its default int8 kernel (AVX-512 VNNI where the CPU has it), or with
    the AVX2 / scalar one ("i2"), so that a VNNI machine tests both."""
    default = ext.int8_kernels()[0]
    if variant == "i2" and default == "i2":
        pytest.skip("this build has only the i2 int8 kernel, tested as the default")
    ext.use_int8_kernel(default if variant == "default" else variant)
    try:
        yield ext
    finally:
        ext.use_int8_kernel(default)


INT8_NATIVE_VARIANTS = ("default", "int_mm", "small")


@contextlib.contextmanager
def int8_token_kernel(ext, variant):
    """The int8 extension as it chooses by token count ("default"), with torch._int_mm for every call
    ("int_mm"), or with its own small-token kernel for every call ("small", AVX-512 VNNI builds only),
    so that every shape of the tests runs through both products."""
    default = ext.small_m()
    if variant == "small" and default == 0:
        pytest.skip("this build has no small-token int8 kernel (it needs AVX-512 VNNI)")
    ext.set_small_m({"default": default, "int_mm": 0, "small": 1 << 40}[variant])
    try:
        yield ext
    finally:
        ext.set_small_m(default)


# --- Triton interpreter ---------------------------------------------------------------------------------
# triton's interpreter must be chosen before triton is first imported, so the test_interp_ tests run in
# a child pytest with TRITON_INTERPRET=1 (run_interpreter_tests); in a session that already has it set
# they run directly.

needs_interpreter = pytest.mark.skipif(
    not triton_support.interpret_mode(), reason="needs TRITON_INTERPRET=1 before triton is imported"
)


def run_interpreter_tests(test_file) -> None:
    """Run the test_interp_ tests of `test_file` in a child pytest under TRITON_INTERPRET=1; they must
    all pass, none skipped."""
    pytest.importorskip("triton")
    if triton_support.interpret_mode():
        pytest.skip("the interpreter tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(test_file)), "-k", "test_interp_"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "passed" in out and "skipped" not in out, out[-4000:]


# --- FFF ------------------------------------------------------------------------------------------------

_SCALAR_ACTS = {
    "gelu": lambda z: 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * z * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3))),
    "relu": lambda z: max(z, 0.0),
    "silu": lambda z: z / (1.0 + math.exp(-z)),
}


def fff_case(trees, depth, leaf_width, hidden, n_tokens, seed, dtype=torch.float32):
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


def fff_up(trees, depth, leaf_width, hidden, seed, gated=True):
    """Dyadic up rows w_up (like w_in) for gated trees, or None."""
    if not gated:
        return None
    g = torch.Generator().manual_seed(seed + 2)
    return torch.randint(-8, 9, (F.fff_rows(trees, depth, leaf_width), hidden), generator=g).float() / 16


def fff_bias(hidden, seed, with_bias=True):
    """A dyadic output bias (hidden,), or None."""
    if not with_bias:
        return None
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(-64, 65, (hidden,), generator=g).float() / 256


def fff_oracle(x, w_in, b_in, w_out, trees, depth, leaf_width, activation, leaf_linear=0, w_up=None):
    """Slow per-token loop written straight from the contract, in float64."""
    act = _SCALAR_ACTS[activation]
    x, w_in, b_in, w_out = (t.double() for t in (x, w_in, b_in, w_out))
    w_up = None if w_up is None else w_up.double()

    def up(t, row):  # a gated neuron's second factor
        return 1.0 if w_up is None else float(x[t] @ w_up[row])

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
                y[t] += act(z) * up(t, base + n) * w_out[base + n]
                n = 2 * n + 1 + (1 if z >= 0 else 0)
            first = base + n_internal + (n - n_internal) * leaf_width
            for q in range(leaf_width):
                z = float(x[t] @ w_in[first + q]) + float(b_in[first + q])
                linear = q >= leaf_width - leaf_linear  # the leaf's last leaf_linear neurons
                y[t] += (z if linear else act(z)) * up(t, first + q) * w_out[first + q]
    return y


FFF_SHAPES = dict(
    trees=st.integers(1, 3),
    depth=st.integers(0, 5),
    leaf_width=st.integers(1, 8),
    hidden=st.sampled_from([1, 7, 33]) | st.integers(1, 40),
    n_tokens=st.integers(1, 6),
    activation=st.sampled_from(F.ACTIVATIONS),
    seed=st.integers(0, 2**31 - 1),
    linear=st.integers(0, 13),  # leaf_linear = linear % (leaf_width + 1), or 0 when gated
    gated=st.booleans(),  # with w_up (LLaMA-family neurons act(gate) * up)
)


# --- ternary --------------------------------------------------------------------------------------------


def ternary_case(n_tokens, in_features, out_features, group_size, seed, zero_frac=0.3):
    """Random ternary weights (packed), positive scales, bias and activations; and the int8 weights t."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (out_features, in_features), generator=g).to(torch.int8)
    t[torch.rand(out_features, in_features, generator=g) < zero_frac] = 0
    packed = T.pack_ternary(t)
    scale = torch.rand(out_features, T.n_groups(in_features, group_size), generator=g) + 0.05
    bias = torch.randn(out_features, generator=g)
    x = torch.randn(n_tokens, in_features, generator=g) * 2
    return x, packed, scale, bias, t


def ternary_oracle(x, t, scale, bias, group_size, act_bits):
    """Float64 loop over groups written from the definition (ccli.kernels.ternary's module doc)."""
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


TERNARY_SHAPES = {
    "n_tokens": st.sampled_from([1, 2, 3, 4, 5, 8, 9, 13]),
    "in_features": st.sampled_from([1, 3, 5, 31, 32, 33, 97, 128, 129, 255]) | st.integers(1, 300),
    "out_features": st.integers(1, 40),
    "group_frac": st.sampled_from([None, 1, 3, 8, 32, 33, 64, 100, 128]),
    "act_bits": st.sampled_from([8, 16]),
    "with_bias": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
}
# the Triton interpreter is slow: fewer and smaller inputs
TERNARY_TRITON_SHAPES = {**TERNARY_SHAPES, "in_features": st.sampled_from([1, 3, 5, 33, 70, 129]),
                         "group_frac": st.sampled_from([None, 8, 33, 64])}


def ternary_group(in_features, group_frac):
    return in_features if group_frac is None else group_frac


# --- MoE ------------------------------------------------------------------------------------------------

MOE_TOL = 1e-4


def moe_case(n_tokens, hidden, experts, width, top_k, seed, gated=False, with_bias=True, with_gates=False,
             with_b_out=True, unused=0, one_expert=False, ascending=True):
    """Random x and weights for `experts` experts of `width` neurons, and a routing: every token picks
    `top_k` distinct experts among the first experts - `unused` (so the last `unused` are picked by no
    token), or, with one_expert, every token expert 0 alone. Returns (x, args) in the op's order."""
    from ccli.kernels import moe as M

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, hidden, generator=g)
    rows = experts * width
    w_in = torch.randn(experts, hidden, width, generator=g) / max(hidden, 1) ** 0.5
    w_out = torch.randn(rows, hidden, generator=g) / max(width, 1) ** 0.5
    b_in = torch.randn(rows, generator=g) * 0.5 if with_bias else None
    w_gate = torch.randn(experts, hidden, width, generator=g) / max(hidden, 1) ** 0.5 if gated else None
    b_out = torch.randn(hidden, generator=g) if with_b_out else None
    pickable = max(1, experts - unused)
    k = min(top_k, pickable)
    if one_expert:
        idx = torch.zeros(n_tokens, 1, dtype=torch.long)
    else:
        idx = torch.stack([torch.randperm(pickable, generator=g)[:k] for _ in range(n_tokens)]) if n_tokens else (
            torch.zeros(0, k, dtype=torch.long))
    tokens, offsets, _ = M.group_by_expert(idx, experts)
    if not ascending:  # the same pairs, tokens in no particular order within each expert
        perm = torch.cat([lo + torch.randperm(hi - lo, generator=g)
                          for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
        tokens = tokens[perm]
    gates = torch.rand(tokens.shape[0], generator=g) + 0.5 if with_gates else None
    return x, (tokens, offsets, w_in, b_in, w_out, "gelu", w_gate, gates, b_out)


def moe_oracle(x, tokens, offsets, w_in, b_in, w_out, activation, w_gate=None, gates=None, b_out=None):
    """Slow loop over the pairs written straight from the contract, in float64."""
    act = _SCALAR_ACTS[activation]
    x64 = x.double()
    experts = offsets.shape[0] - 1
    width = w_in.shape[2]
    w_in = w_in.transpose(1, 2).reshape(experts * width, -1)  # neuron rows
    w_gate = None if w_gate is None else w_gate.transpose(1, 2).reshape(experts * width, -1)
    y = torch.zeros(x.shape, dtype=torch.float64)
    if b_out is not None:
        y += b_out.double()
    offs = offsets.tolist()
    for e in range(experts):
        for i in range(offs[e], offs[e + 1]):
            t = int(tokens[i])
            for r in range(e * width, (e + 1) * width):
                z = float(x64[t] @ w_in[r].double()) + (float(b_in[r]) if b_in is not None else 0.0)
                h = act(float(x64[t] @ w_gate[r].double())) * z if w_gate is not None else act(z)
                y[t] += (float(gates[i]) if gates is not None else 1.0) * h * w_out[r].double()
    return y


MOE_SHAPES = dict(
    n_tokens=st.integers(1, 12),
    hidden=st.sampled_from([1, 7, 33]) | st.integers(1, 40),
    experts=st.integers(1, 6),
    width=st.integers(1, 9),
    top_k=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    gated=st.booleans(),
    with_bias=st.booleans(),
    with_gates=st.booleans(),
    with_b_out=st.booleans(),
    unused=st.integers(0, 2),
    one_expert=st.booleans(),
    ascending=st.booleans(),
)
