"""Kernels for the CPU, run inside the compiled step through XLA's FFI. Only jax and the
standard library: nothing here knows about sequences or configs.

- `ragged_paged_attention`: a C++ ragged paged attention kernel with the contract of
  `pallas_kernels.reference.ragged_paged_attention_reference`.
- `matmul`: a C++ weight-only int8 matrix product for the few rows of a decode step.
- `write_kv`: writes a step's K/V rows into the paged pool in place (XLA's CPU scatter widens a
  bfloat16 pool to float32 and back on every step).
- `build`: compiles the C++ sources with the system compiler against the headers of the JAX installed
  at run time, once per (source, JAX version, CPU), into a user cache directory.
"""

from cpu_kernels import build, matmul, ragged_paged_attention, write_kv

__all__ = ["build", "matmul", "ragged_paged_attention", "write_kv"]
