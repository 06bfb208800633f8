"""Conditional-computation kernels (custom torch ops) used by ccli's converted models.

- `ccli.kernels.registry`: the one op registration (`KernelOp`, `register_op`): schema, reference,
  native CPU and Triton backends (through `ccli.kernels.backends`), fake kernel, autograd formula,
  FlopCounterMode formula and fvcore handle. A family's kernel module only declares its ops.
- `ccli.kernels.fff`: fast feedforward (FFF) trees, the `ccli::fff` op (reference, native C++ CPU and
  Triton CUDA backends). Importing it registers the op.
- `ccli.kernels.ternary`: ternary (BitNet b1.58) linear layers, the `ccli::ternary_linear` op on 2-bit
  packed weights with int8 (act_bits=8) or float (act_bits=16) activations (reference, native C++ CPU
  and Triton backends) and `ccli::ternary_outliers_`, plus weight/activation quantisation and packing
  helpers (`ccli.kernels.ternary_format`, re-exported). Importing it registers the ops.
- `ccli.kernels.activations`: the one activation table (kernel names, PyTorch functions, transformers
  module classes).
- `ccli.kernels.native`: builds/loads the C++ CPU kernels on first use (`NativeExtension`: `FFF` for
  fff_cpu.cpp, `TERNARY` for ternary_cpu.cpp; both include ccli_op.h, their shared dispatcher glue).
  CCLI_REQUIRE_NATIVE=1 turns a native kernel that does not build into an error instead of a fallback.
- `ccli.kernels.fff_triton`, `ccli.kernels.ternary_triton`: the Triton kernels (triton is imported
  lazily, `ccli.kernels.triton_support`).

Submodules are not imported here, so `import ccli.kernels` stays cheap. No module of this package
imports one that imports it back (tests/test_kernels.py checks).
"""
