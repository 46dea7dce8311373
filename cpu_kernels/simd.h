// Vector helpers shared by the CPU kernels.
#pragma once

namespace fastgen_kernels {

// Keeps v in a register: without it GCC folds a vector's load into each of the products that use
// it (a memory operand per FMA), and then the loads, not the FMAs, bound a register tile's loop
// (the matmul's LM head at 32 rows, one thread outside XLA: 46 -> 65-70 GFLOP/s; AVX2 prompt
// attention's tiles: twelve loads per eight FMAs, see ragged_paged_attention.cc).
template <class V>
inline void in_register(V& v) {
#if defined(__GNUC__) && defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__GNUC__) && defined(__AVX2__)
  if constexpr (sizeof(V) <= 32) asm("" : "+x"(v));
#endif
}

}  // namespace fastgen_kernels
