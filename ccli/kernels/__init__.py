"""Conditional-computation kernels (custom torch ops) used by ccli's converted models.

- `ccli.kernels.fff`: fast feedforward (FFF) trees, the `ccli::fff` op (reference, native C++ CPU and
  Triton CUDA backends). Importing it registers the op and its FLOP formulas.
- `ccli.kernels.native`: builds/loads the C++ CPU kernel (fff_cpu.cpp) on first use.
- `ccli.kernels.fff_triton`: the Triton kernel (triton is imported lazily).

Submodules are not imported here, so `import ccli.kernels` stays cheap.
"""
