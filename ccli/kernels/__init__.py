"""Conditional-computation kernels (custom torch ops) used by ccli's converted models.

- `ccli.kernels.fff`: fast feedforward (FFF) trees, the `ccli::fff` op (reference, native C++ CPU and
  Triton CUDA backends). Importing it registers the op and its FLOP formulas.
- `ccli.kernels.ternary`: ternary (BitNet b1.58) linear layers, the `ccli::ternary_linear` op on 2-bit
  packed weights with int8 (act_bits=8) or float (act_bits=16) activations (reference, native C++ CPU
  and Triton backends), plus weight/activation quantisation and packing helpers. Importing it
  registers the op and its FLOP formulas.
- `ccli.kernels.native`: builds/loads the C++ CPU kernels on first use (`NativeExtension`: `FFF` for
  fff_cpu.cpp, `TERNARY` for ternary_cpu.cpp).
- `ccli.kernels.fff_triton`, `ccli.kernels.ternary_triton`: the Triton kernels (triton is imported
  lazily).

Submodules are not imported here, so `import ccli.kernels` stays cheap.
"""
