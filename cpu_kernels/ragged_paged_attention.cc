// Ragged paged attention on the CPU, an XLA FFI custom call (see ragged_paged_attention.py).
//
// Semantics are those of pallas_kernels/reference.py: slab rows cu_q_lens[s]..cu_q_lens[s + 1]
// belong to sequence s, whose kv_lens[s] keys (new tokens included, already written) live in the
// pages page_indices[s, :]. A row at position p sees keys k with k <= p, k < kv_len and, with a
// window w, k > p - w. Rows past cu_q_lens[num_seqs] come out as zeros.
//
// Work items are (sequence, KV head, block of 16 query rows): each reads its sequence's K/V rows
// for that head once, for all the block's rows x the KV group's query heads. When there are fewer
// than 4 items per thread (a few long sequences), each block's keys are split into page-aligned
// ranges of at least 256 keys, one item each, whose partial results (running max, denominator,
// unnormalised output) are merged at the end (flash-decoding). Items are spread over XLA's intra-op
// thread pool, the calling thread taking its share, so nothing waits on a pool that is busy.
//
// An item walks its pages through the page table (no gather is materialised), asking for the pages
// two ahead into L2 (each page is its own scattered block, where the hardware prefetcher stops;
// spread over a decode page's work: `Ahead`), and per page updates an online softmax in one of two
// ways:
// - few query vectors (decode: rows x group < 16): per query, its scores against the page's visible
//   keys as dot products vectorised over head_dim, their exponentials vectorised over keys (the 2-4
//   queries of one row's KV group through each step together: `page_by_group`);
// - many (prompt rows): per tile of 16 query vectors, the scores of 8 keys at a time as a small
//   matrix product (each key element broadcast against a vector of 16 queries: no horizontal sums),
//   masking, max and exponentials vectorised over the tile's queries.
// P.V then accumulates per query with the output row held in registers across the page's keys.
// Head sizes 64 and 128 get their own instantiation with the size a compile-time constant, so these
// loops unroll into a few vector FMAs. The prompt tiles' exponentials are computed inline (`exp16`,
// with AVX-512); the rest, and tanh, go through glibc's vector math. Prompt attention at SmolLM2's
// shapes (`bench_cpu_attention.py --layers=30`, three runs of each in turns, CPU ms per layer):
// 256 rows over 256 cached keys 3.60-3.81 against 3.84-4.36 with libmvec's expf and the queries
// copied twice; 32 decodes beside a 224-row chunk 5.26-5.60 against 5.64-6.75.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "simd.h"
#include "wait.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockRows = 16;      // query rows per work item
constexpr int64_t kPrefetchPages = 2;   // pages asked for ahead of the one being read
constexpr int64_t kQueryTile = 16;      // query vectors per score tile (prompt rows): one vector
constexpr int64_t kKeyTile = 8;         // keys per score tile
#ifdef __AVX512F__
constexpr int64_t kPvQueries = 4;  // queries sharing each V row in P.V (their rows: 16 of 32 registers)
#else
constexpr int64_t kPvQueries = 2;  // (8 of 16 AVX2 registers)
#endif
constexpr int64_t kItemsPerThread = 4;  // below this many items per thread, long contexts are split
constexpr int64_t kMinSplitKeys = 256;  // the fewest keys a split item reads

struct Shapes {
  int64_t num_rows, num_q_heads, head_dim;          // q [T, H, D]
  int64_t num_kv_heads, num_pages, page_size;       // pages [KVH, P, ps, D]
  int64_t max_seqs, width;                          // page_indices [S, W]
};

// A block of one sequence's query rows for one KV head, over its keys in [key_begin, key_end); split
// >= 0 when the keys are split over several items (the offset of its Partial in Shared::partials).
struct Item {
  int32_t seq, kv_head, first_row, num_rows;
  int64_t key_begin, key_end, split;
};

// Rows [ps, D] of one page as floats: the page itself for f32, a converted copy for bf16.
inline const float* page_rows(const float* page, int64_t, float*) { return page; }
inline const float* page_rows(const uint16_t* __restrict page, int64_t n, float* __restrict buffer) {
  // The float's bits are the bf16's shifted up: written as integers so the loop vectorises (widen,
  // shift) instead of converting one value at a time.
  typedef uint32_t __attribute__((may_alias)) Bits;
  Bits* __restrict bits = reinterpret_cast<Bits*>(buffer);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) bits[i] = static_cast<uint32_t>(page[i]) << 16;
  return buffer;
}

struct Params {
  const float* q;  // [T, H, D], f32
  const void* k_pages;
  const void* v_pages;
  const int32_t* kv_lens;
  const int32_t* page_indices;
  const int32_t* cu_q_lens;
  float* out;  // [T, H, D], f32
  Shapes shape;
  float sm_scale, softcap;
  int64_t window;
};

// The minimum score: finite (unlike -inf) so the fast-math build stays exact about "no key yet".
constexpr float kMinScore = -1e30f;

// q . k over one head's D values. kD > 0: D known at compile time (the loop unrolls into a few
// vector FMAs); kD == 0: D given at run time.
template <int kD>
inline float dot(const float* __restrict a, const float* __restrict b, int64_t D) {
  const int64_t n = kD > 0 ? kD : D;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// acc = acc * alpha + sum_j w[j * stride] v[j, :] over keys [begin, end). With kD > 0 the running
// row lives in registers (a local array of constant size) for the whole page instead of being
// reloaded and stored back for every key.
template <int kD>
inline void scale_add_rows(float* __restrict acc, float alpha, const float* __restrict w, int64_t stride,
                           const float* __restrict v, int64_t begin, int64_t end, int64_t D) {
  if constexpr (kD > 0) {
    float t[kD];
#pragma omp simd
    for (int64_t d = 0; d < kD; ++d) t[d] = acc[d] * alpha;
    for (int64_t j = begin; j < end; ++j) {
      const float wj = w[j * stride];
      const float* __restrict vj = v + j * kD;
#pragma omp simd
      for (int64_t d = 0; d < kD; ++d) t[d] += wj * vj[d];
    }
#pragma omp simd
    for (int64_t d = 0; d < kD; ++d) acc[d] = t[d];
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
    for (int64_t j = begin; j < end; ++j) {
      const float wj = w[j * stride];
      const float* __restrict vj = v + j * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += wj * vj[d];
    }
  }
}

// Where a split item leaves its unnormalised result for the combine step: per query vector its
// running max m, denominator l and output acc (floats at Item::split in Shared::partials: R, R, R * D).
struct Partial {
  float* m;
  float* l;
  float* acc;
};

// One item's query vectors (its rows x the KV group's query heads, row-major) and their online
// softmax state. Thread-local and reused, so an item allocates nothing once the thread is warm.
struct Queries {
  int64_t count, padded;             // R, and R rounded up to whole query tiles (tiled path)
  std::vector<float> q, qt;          // q [R, D] scaled; qt [D, padded] (tiled path)
  std::vector<float> acc, m, l;      // [R, D], [padded], [padded]
  std::vector<int32_t> lo, hi;       // [padded]: the keys [lo, hi) a query sees; padding sees none
  std::vector<float> k_buf, v_buf;   // a bf16 page as floats, [ps, D] each
  std::vector<float> scores;         // [ps rounded up to kKeyTile, kQueryTile]
  bool grouped = false;  // 2-4 queries that see the same keys (one row's KV group): `page_by_group`

  void reset(int64_t R, int64_t Rp, int64_t D, int64_t ps) {
    count = R;
    padded = Rp;
    q.resize(R * D);
    qt.resize(D * Rp);  // its padding queries (columns R..Rp) zero, the rest written by `attend`
    for (int64_t d = 0; d < D && Rp > R; ++d) std::fill_n(&qt[d * Rp + R], Rp - R, 0.0f);
    acc.assign(R * D, 0.0f);
    m.assign(Rp, kMinScore);
    l.assign(Rp, 0.0f);
    lo.assign(Rp, 0);
    hi.assign(Rp, 0);
    k_buf.resize(ps * D);
    v_buf.resize(ps * D);
    scores.resize((ps + kKeyTile) * kQueryTile);
  }
};

// The keys a block of rows [first, first + rows) of sequence `seq` can see: [lo of its first row,
// hi of its last row).
std::pair<int64_t, int64_t> visible_keys(const Params& p, int32_t seq, int64_t first, int64_t rows) {
  const int64_t kv_len = p.kv_lens[seq], seq_rows = p.cu_q_lens[seq + 1] - p.cu_q_lens[seq];
  const int64_t first_pos = kv_len - seq_rows + first, last_pos = first_pos + rows - 1;
  return {std::max<int64_t>(0, first_pos - p.window + 1), std::min<int64_t>(last_pos + 1, kv_len)};
}

// The pages an item reads: its KV head's K and V pools, its sequence's page table, and the logical
// pages [first, end) that hold the keys its rows see.
template <typename KV>
struct Walk {
  const KV* k_head = nullptr;
  const KV* v_head = nullptr;
  const int32_t* pages = nullptr;
  int64_t num_pages = 0, page_elems = 0;  // the pool's pages; ps * D values a page
  int64_t first = 0, end = 0;

  // Logical page `page`'s K and V rows [ps, D] (its table entry clamped into the pool).
  const KV* k_page(int64_t page) const { return k_head + physical(page) * page_elems; }
  const KV* v_page(int64_t page) const { return v_head + physical(page) * page_elems; }
  int64_t physical(int64_t page) const { return std::clamp<int64_t>(pages[page], 0, num_pages - 1); }
};

template <typename KV>
Walk<KV> walk_of(const Params& p, const Item& item) {
  const Shapes& s = p.shape;
  auto [lo, hi] = visible_keys(p, item.seq, item.first_row, item.num_rows);
  lo = std::max<int64_t>(lo, item.key_begin);
  hi = std::min<int64_t>(hi, item.key_end);
  Walk<KV> w;
  w.num_pages = s.num_pages;
  w.page_elems = s.page_size * s.head_dim;
  w.k_head = static_cast<const KV*>(p.k_pages) + item.kv_head * s.num_pages * w.page_elems;
  w.v_head = static_cast<const KV*>(p.v_pages) + item.kv_head * s.num_pages * w.page_elems;
  w.pages = p.page_indices + item.seq * s.width;
  w.first = lo / s.page_size;
  w.end = lo < hi ? std::min<int64_t>((hi + s.page_size - 1) / s.page_size, s.width) : w.first;
  return w;
}

// The cache lines of logical page `page`'s K and V rows still to be asked for into L2 (the hardware
// prefetcher stops at 4 KiB boundaries, and every page is its own scattered block). A decode item's
// page is little work, and a whole page's prefetches at once (128 lines of float32 K and V) stalled
// it: spread over that work, two bursts per query vector (`some`), decode attention over 30 layers'
// pools took 1.9-2.4 instead of 2.7-3.3 ms of CPU time per layer at 32 x 512, 1.7-2.4 instead of
// 2.6-3.9 at 8 x 2048 (`bench_cpu_attention.py --layers=30`, five runs of each in turns; asking for
// every line at each key instead measured no better than one burst). Prompt pages (many queries)
// ask for the next page at once.
// Always inlined: GCC deems a function holding only prefetches pure, and drops calls to it.
struct Ahead {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t next = 0, lines = 0;

  template <typename KV>
  void set(const Walk<KV>& walk, int64_t page) {
    k = reinterpret_cast<const char*>(walk.k_page(page));
    v = reinterpret_cast<const char*>(walk.v_page(page));
    next = 0;
    lines = (walk.page_elems * static_cast<int64_t>(sizeof(KV)) + 63) / 64;
  }
  [[gnu::always_inline]] inline void some(int64_t n) {
    for (const int64_t end = std::min(lines, next + n); next < end; ++next) {
      __builtin_prefetch(k + 64 * next, 0, 2);
      __builtin_prefetch(v + 64 * next, 0, 2);
    }
  }
  [[gnu::always_inline]] inline void rest() { some(lines); }
};

#ifdef __AVX512F__
// The 16 lane sums of v[0..15] as one vector (lane j: the sum of v[j]), by pairwise shuffles and
// adds: 45 vector operations against about 8 for each of 16 separate reductions.
inline __m512 sums16(const __m512* v) {
  __m512 x[8], y[4];
  for (int p = 0; p < 8; ++p) {  // per 128-bit block: (a0+a2, b0+b2, a1+a3, b1+b3)
    x[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
  }
  for (int q = 0; q < 4; ++q) {  // per block: the block's sums of vectors 4q..4q+3
    y[q] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * q], x[2 * q + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * q], x[2 * q + 1], 0xEE));
  }
  // blocks (0 + 1, 2 + 3) of y[0], then of y[1]; then the same of those: block b holds vectors 4b..4b+3
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88), _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
}

// e^x for 16 floats, inlined (libmvec's expf is a call, around which a loop's vectors are spilled and
// reloaded): e^x = 2^n e^r, n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts) in [-0.35, 0.35],
// e^r by its Taylor polynomial of degree 7 (error below 1e-8 relative), 2^n applied by `scalef`
// (exact, down to denormals and zero). x is clamped to [-104, 88.7]: e^-104 is below the smallest
// float (0), so the kernel's "no key yet" score of -1e30 still gives 0.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 e = _mm512_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(e, n);
}

// How `key_scores` reduces a few keys' product vectors at once: 16 keys (one zmm each) by `sums16`.
struct KeySums {
  using V = __m512;
  static constexpr int kWidth = 16, kKeys = 16, kMaxHead = 1 << 30;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  // 16 bfloat16 values as floats: their bits shifted up (exact)
  static V load(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // out[0 : n] = the lane sums of acc[0 : n]
  static void store(const V* acc, float* out, int64_t n) {
    _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1), sums16(acc));
  }
};
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define FASTGEN_ATTENTION_KEY_SUMS 1
// The lane sums of a, b, c and d as one vector (lane j: the sum of the j-th), by three horizontal
// adds and one of the halves: against about six operations for each separate reduction.
inline __m128 sums4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// ... with AVX2: 4 keys (one ymm each) by `sums4`, at head sizes up to 64 (the query's vectors and
// the four keys' sums then fit the 16 registers).
struct KeySums {
  using V = __m256;
  static constexpr int kWidth = 8, kKeys = 4, kMaxHead = 64;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(const V* acc, float* out, int64_t n) {
    const __m128 s = sums4(acc[0], acc[1], acc[2], acc[3]);
    if (n == 4) return _mm_storeu_ps(out, s);
    float t[4];
    _mm_storeu_ps(t, s);
    std::copy(t, t + n, out);
  }
};
#endif

#if defined(__AVX512F__) || defined(FASTGEN_ATTENTION_KEY_SUMS)
// sc[j] = q . k[j] for keys j in [begin, end), KeySums::kKeys keys at a time: each key's products
// accumulate over D in a vector, and the keys' vectors reduce together (`KeySums::store`) instead of
// one horizontal sum per key. On a 2-core AVX2 EPYC, decode 32 x 512 over 30 layers' pools
// (`bench_cpu_attention.py --layers=30`): see docs/benchmarks/cpu_step_profile.md.
template <int kD, typename KV>
inline void key_scores(const float* __restrict q, const KV* __restrict k, int64_t begin, int64_t end,
                       float* __restrict sc) {
  using S = KeySums;
  static_assert(kD % S::kWidth == 0, "head size in whole vectors");
  typename S::V qv[kD / S::kWidth];
  for (int c = 0; c < kD / S::kWidth; ++c) qv[c] = S::load(q + S::kWidth * c);
  for (int64_t j0 = begin; j0 < end; j0 += S::kKeys) {
    typename S::V acc[S::kKeys];
    for (int jj = 0; jj < S::kKeys; ++jj) {
      const KV* row = k + std::min<int64_t>(j0 + jj, end - 1) * kD;  // past the end: a repeat
      acc[jj] = S::mul(qv[0], S::load(row));
      for (int c = 1; c < kD / S::kWidth; ++c) acc[jj] = S::fmadd(qv[c], S::load(row + S::kWidth * c), acc[jj]);
    }
    S::store(acc, sc + j0, std::min<int64_t>(S::kKeys, end - j0));
  }
}
#endif

// sc[j] = q . k[j] for keys j in [begin, end): `key_scores` where AVX-512 (16 keys at a time) or AVX2
// (4, head sizes up to 64) and a head size in whole vectors allow, else one dot product per key.
template <int kD>
inline void scores(const float* q, const float* k, int64_t begin, int64_t end, float* sc, int64_t D) {
#if defined(__AVX512F__) || defined(FASTGEN_ATTENTION_KEY_SUMS)
  if constexpr (kD > 0 && kD % KeySums::kWidth == 0 && kD <= KeySums::kMaxHead) {
    return key_scores<kD>(q, k, begin, end, sc);
  }
#endif
  for (int64_t j = begin; j < end; ++j) sc[j] = dot<kD>(q, k + j * D, D);
}

#if defined(__AVX512F__)
// ... of bfloat16 keys, widened in registers as they are read (`page_by_group` with AVX-512).
template <int kD>
inline void scores(const float* q, const uint16_t* k, int64_t begin, int64_t end, float* sc, int64_t) {
  static_assert(kD > 0 && kD % KeySums::kWidth == 0, "head size in whole vectors");
  key_scores<kD>(q, k, begin, end, sc);
}

// Decode pages of bfloat16 are read as they are, each row widened in registers, where AVX-512 and a
// head size in whole vectors allow; elsewhere a page is first widened into a float copy. Widened in
// registers, decode over 30 layers' bf16 pools took 0.82-0.87 of the CPU time of the copy (8 x 512,
// 8 x 2048, 32 x 512, 1 x 2048; `bench_cpu_attention.py --layers=30 --kv_dtype=bfloat16`, two rounds
// in turns, a 2-core Zen 4).
template <typename KV, int kD>
constexpr bool kWidensInRegisters = std::is_same_v<KV, uint16_t> && kD > 0 && kD % 16 == 0;
#else
template <typename KV, int kD>
constexpr bool kWidensInRegisters = false;
#endif

// One page for NQ (2-4) query vectors that see the same keys (one decode row's KV group): the same
// steps as `page_by_dots`, each done for every query before the next, so the queries' chains of
// dependent work (scores, their reduction, max, exponentials, P.V) overlap instead of running one
// after another, and each V row is loaded once for all of them. On cached pages (one layer, SmolLM2's
// three queries per KV head) decode 32 x 512 took 0.97-1.12 ms of CPU time against 1.28-1.29 one
// query at a time; over 30 layers' pools, where the reads bound it, no change showed
// (`bench_cpu_attention.py [--layers=30]`, alternating runs).
template <int kD, int NQ, typename KV>
void page_by_group(const Params& p, Queries& w, const KV* k, const KV* v, int64_t begin, int64_t end,
                   int64_t ps, Ahead& ahead) {
  const int64_t stride = (ps + 15) / 16 * 16;  // a query's scores row (masked stores stop at `end`)
  float* sc = w.scores.data();
  ahead.some((ahead.lines + 1) / 2);
  for (int q = 0; q < NQ; ++q) scores<kD>(&w.q[q * kD], k, begin, end, sc + q * stride, kD);
  if (p.softcap > 0.0f) {
    const float inv = 1.0f / p.softcap;
    for (int q = 0; q < NQ; ++q)
      for (int64_t j = begin; j < end; ++j) sc[q * stride + j] = p.softcap * std::tanh(sc[q * stride + j] * inv);
  }
  float m_new[NQ], alpha[NQ], sum[NQ];
  for (int q = 0; q < NQ; ++q) {
    m_new[q] = w.m[q];
    for (int64_t j = begin; j < end; ++j) m_new[q] = std::max(m_new[q], sc[q * stride + j]);
  }
  for (int q = 0; q < NQ; ++q) {
    float* row = sc + q * stride;
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = begin; j < end; ++j) {
      row[j] = std::exp(row[j] - m_new[q]);
      total += row[j];
    }
    sum[q] = total;
  }
#pragma omp simd
  for (int q = 0; q < NQ; ++q) alpha[q] = std::exp(w.m[q] - m_new[q]);
  ahead.rest();
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<KV, uint16_t>) {  // P.V over bf16 rows widened in registers
    constexpr int kV = kD / 16;
    __m512 t[NQ][kV];
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q) {
#pragma GCC unroll 8
      for (int c = 0; c < kV; ++c) {
        t[q][c] = _mm512_mul_ps(_mm512_loadu_ps(&w.acc[q * kD + 16 * c]), _mm512_set1_ps(alpha[q]));
      }
    }
    for (int64_t j = begin; j < end; ++j) {
      __m512 row[kV];
#pragma GCC unroll 8
      for (int c = 0; c < kV; ++c) row[c] = KeySums::load(v + j * kD + 16 * c);
#pragma GCC unroll 4
      for (int q = 0; q < NQ; ++q) {
        const __m512 pj = _mm512_set1_ps(sc[q * stride + j]);
#pragma GCC unroll 8
        for (int c = 0; c < kV; ++c) t[q][c] = _mm512_fmadd_ps(pj, row[c], t[q][c]);
      }
    }
#pragma GCC unroll 4
    for (int q = 0; q < NQ; ++q) {
#pragma GCC unroll 8
      for (int c = 0; c < kV; ++c) _mm512_storeu_ps(&w.acc[q * kD + 16 * c], t[q][c]);
    }
  } else
#endif
  {
    float t[NQ][kD];
    for (int q = 0; q < NQ; ++q) {
#pragma omp simd
      for (int64_t d = 0; d < kD; ++d) t[q][d] = w.acc[q * kD + d] * alpha[q];
    }
    for (int64_t j = begin; j < end; ++j) {
      const float* __restrict vj = v + j * kD;
      for (int q = 0; q < NQ; ++q) {
        const float pj = sc[q * stride + j];
#pragma omp simd
        for (int64_t d = 0; d < kD; ++d) t[q][d] += pj * vj[d];
      }
    }
    for (int q = 0; q < NQ; ++q) std::memcpy(&w.acc[q * kD], t[q], sizeof t[q]);
  }
  for (int q = 0; q < NQ; ++q) {
    w.l[q] = w.l[q] * alpha[q] + sum[q];
    w.m[q] = m_new[q];
  }
}

// The page by `page_by_group` when the item's queries see the same keys (w.grouped): true if it did.
template <int kD, typename R>
bool by_group(const Params& p, Queries& w, const R* k, const R* v, int64_t first, int64_t ps, Ahead& ahead) {
  if (!w.grouped) return false;
  const int64_t begin = std::max<int64_t>(w.lo[0], first) - first;
  const int64_t end = std::min<int64_t>(w.hi[0], first + ps) - first;
  if (begin >= end) return true;
  switch (w.count) {
    case 2: page_by_group<kD, 2>(p, w, k, v, begin, end, ps, ahead); break;
    case 3: page_by_group<kD, 3>(p, w, k, v, begin, end, ps, ahead); break;
    default: page_by_group<kD, 4>(p, w, k, v, begin, end, ps, ahead); break;
  }
  return true;
}

// One page (keys first..first + ps, rows k, v [ps, D]) for few query vectors (decode): per query,
// its scores by dot products over D (16 keys at a time with AVX-512 and a head size in whole
// vectors), their exponentials, and the online softmax update; 2-4 queries that see the same keys
// go together (`page_by_group`) while their output rows fit in registers (kPvQueries rows of 64).
template <int kD, typename KV>
void page_by_dots(const Params& p, Queries& w, const KV* k_page, const KV* v_page, int64_t first, int64_t ps,
                  int64_t D, Ahead& ahead) {
  if constexpr (kWidensInRegisters<KV, kD>) {
    if (by_group<kD>(p, w, k_page, v_page, first, ps, ahead)) return;
  }
  const float* k = page_rows(k_page, ps * D, w.k_buf.data());
  const float* v = page_rows(v_page, ps * D, w.v_buf.data());
  if constexpr (kD > 0) {
    if (by_group<kD>(p, w, k, v, first, ps, ahead)) return;
  }
  float* sc = w.scores.data();
  const int64_t share = (ahead.lines + 2 * w.count - 1) / std::max<int64_t>(1, 2 * w.count);
  for (int64_t i = 0; i < w.count; ++i) {
    ahead.some(share);
    // Keys [begin, end) of this page, relative to the page's first key.
    const int64_t begin = std::max<int64_t>(w.lo[i], first) - first;
    const int64_t end = std::min<int64_t>(w.hi[i], first + ps) - first;
    if (begin >= end) continue;
    const float* qv = &w.q[i * D];
    scores<kD>(qv, k, begin, end, sc, D);
    if (p.softcap > 0.0f) {
      const float inv = 1.0f / p.softcap;
      for (int64_t j = begin; j < end; ++j) sc[j] = p.softcap * std::tanh(sc[j] * inv);
    }
    float m_new = w.m[i];
    for (int64_t j = begin; j < end; ++j) m_new = std::max(m_new, sc[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = begin; j < end; ++j) {
      sc[j] = std::exp(sc[j] - m_new);
      sum += sc[j];
    }
    const float alpha = std::exp(w.m[i] - m_new);
    ahead.some(share);
    scale_add_rows<kD>(&w.acc[i * D], alpha, sc, 1, v, begin, end, D);
    w.l[i] = w.l[i] * alpha + sum;
    w.m[i] = m_new;
  }
}

// st[j, :] = k[j] . qt[:, 0:kQueryTile] for keys j in [j0, min(j0 + kKeyTile, end)): a small matrix
// product, each key's value broadcast against a vector of kQueryTile queries (no horizontal sums).
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define FASTGEN_ATTENTION_AVX2_TILES 1
// AVX2 (16 registers): the tiles below in registers by hand. Written as arrays, the 8 keys' sums
// (16 vectors) and the P.V rows of two queries (16) outgrew the registers, and GCC kept them on the
// stack: a `perf record` of prompt attention put a quarter of its samples on those stores.
static_assert(kQueryTile == 16, "a tile's queries are two vectors");

// e^x for 8 floats, inlined (libmvec's expf is a call: 6.6% of prompt attention's samples): e^x =
// 2^n e^r, n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts) in [-0.35, 0.35], e^r by its
// Taylor polynomial of degree 7 (error below 1e-8 relative), 2^n built in the exponent bits. x is
// clamped to [-87.3, 88]; below -87.3 (e^x under float's smallest normal, 1.2e-38) the result is 0.
inline __m256 exp8(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 e = _mm256_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) {
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(c));
  }
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(keep, _mm256_mul_ps(e, _mm256_castsi256_ps(bits)));
}

// score_tile for four keys at a time: their sums against the tile's 16 queries in 8 registers.
inline void score_tile_avx2(const float* __restrict qt, int64_t stride, const float* __restrict k, int64_t j0,
                            int64_t end, float* __restrict st, int64_t D) {
  for (int64_t j = j0; j < std::min(j0 + kKeyTile, end); j += 4) {
    const float* rows[4];
    for (int jj = 0; jj < 4; ++jj) rows[jj] = k + std::min(j + jj, end - 1) * D;
    __m256 lo[4], hi[4];
    for (int jj = 0; jj < 4; ++jj) lo[jj] = hi[jj] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      __m256 q0 = _mm256_loadu_ps(qt + d * stride), q1 = _mm256_loadu_ps(qt + d * stride + 8);
      fastgen_kernels::in_register(q0);  // not a memory operand of each FMA below
      fastgen_kernels::in_register(q1);
      for (int jj = 0; jj < 4; ++jj) {
        const __m256 kd = _mm256_broadcast_ss(rows[jj] + d);
        lo[jj] = _mm256_fmadd_ps(kd, q0, lo[jj]);
        hi[jj] = _mm256_fmadd_ps(kd, q1, hi[jj]);
      }
    }
    for (int jj = 0; jj < 4 && j + jj < end; ++jj) {
      _mm256_storeu_ps(st + (j + jj) * kQueryTile, lo[jj]);
      _mm256_storeu_ps(st + (j + jj) * kQueryTile + 8, hi[jj]);
    }
  }
}

// pv_tile for four queries x 16 of the head's values at a time (8 registers), over the page's keys.
inline void pv_tile_avx2(float* __restrict acc, const float* __restrict alpha, const float* __restrict p,
                         const float* __restrict v, int64_t begin, int64_t end, int64_t n, int64_t D) {
  for (int64_t i0 = 0; i0 < n; i0 += 4) {
    const int64_t m = std::min<int64_t>(4, n - i0);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m256 lo[4], hi[4];
      for (int i = 0; i < 4; ++i) {
        if (i < m) {
          const __m256 a = _mm256_set1_ps(alpha[i0 + i]);
          lo[i] = _mm256_mul_ps(a, _mm256_loadu_ps(acc + (i0 + i) * D + d0));
          hi[i] = _mm256_mul_ps(a, _mm256_loadu_ps(acc + (i0 + i) * D + d0 + 8));
        } else {
          lo[i] = hi[i] = _mm256_setzero_ps();
        }
      }
      for (int64_t j = begin; j < end; ++j) {
        __m256 v0 = _mm256_loadu_ps(v + j * D + d0), v1 = _mm256_loadu_ps(v + j * D + d0 + 8);
        fastgen_kernels::in_register(v0);
        fastgen_kernels::in_register(v1);
        const float* pj = p + j * kQueryTile + i0;  // i0 + 3 < kQueryTile: whole groups of four
        for (int i = 0; i < 4; ++i) {
          const __m256 w = _mm256_broadcast_ss(pj + i);
          lo[i] = _mm256_fmadd_ps(w, v0, lo[i]);
          hi[i] = _mm256_fmadd_ps(w, v1, hi[i]);
        }
      }
      for (int i = 0; i < m; ++i) {
        _mm256_storeu_ps(acc + (i0 + i) * D + d0, lo[i]);
        _mm256_storeu_ps(acc + (i0 + i) * D + d0 + 8, hi[i]);
      }
    }
  }
}
#endif

template <int kD>
inline void score_tile(const float* __restrict qt, int64_t stride, const float* __restrict k, int64_t j0,
                       int64_t end, float* __restrict st, int64_t D) {
#ifdef FASTGEN_ATTENTION_AVX2_TILES
  if constexpr (kD > 0 && kD % 16 == 0) return score_tile_avx2(qt, stride, k, j0, end, st, kD);
#endif
  const int64_t n = kD > 0 ? kD : D;
  float acc[kKeyTile][kQueryTile] = {};
  const float* rows[kKeyTile];
  for (int64_t jj = 0; jj < kKeyTile; ++jj) rows[jj] = k + std::min(j0 + jj, end - 1) * n;
  for (int64_t d = 0; d < n; ++d) {
    const float* __restrict q = qt + d * stride;
    for (int64_t jj = 0; jj < kKeyTile; ++jj) {
      const float kd = rows[jj][d];
#pragma omp simd
      for (int64_t i = 0; i < kQueryTile; ++i) acc[jj][i] += kd * q[i];
    }
  }
  for (int64_t jj = 0; jj < std::min(kKeyTile, end - j0); ++jj) {
    std::memcpy(st + (j0 + jj) * kQueryTile, acc[jj], sizeof acc[jj]);
  }
}

// acc[i] = acc[i] * alpha[i] + sum_j p[j, i] v[j] for a tile's queries i < n over keys [begin, end)
// (p [keys, kQueryTile], acc [n, D]): kPvQueries queries at a time, so each V row loaded serves
// several queries and their output rows stay in registers across the keys.
template <int kD>
inline void pv_tile(float* __restrict acc, const float* __restrict alpha, const float* __restrict p,
                    const float* __restrict v, int64_t begin, int64_t end, int64_t n, int64_t D) {
#ifdef FASTGEN_ATTENTION_AVX2_TILES
  if constexpr (kD > 0 && kD % 16 == 0) return pv_tile_avx2(acc, alpha, p, v, begin, end, n, kD);
#endif
  if constexpr (kD > 0) {
    for (int64_t i0 = 0; i0 < n; i0 += kPvQueries) {
      const int64_t m = std::min(kPvQueries, n - i0);
      float t[kPvQueries][kD];
      for (int64_t i = 0; i < kPvQueries; ++i) {
        const float a = i < m ? alpha[i0 + i] : 0.0f;
        const float* src = acc + std::min(i0 + i, n - 1) * kD;
#pragma omp simd
        for (int64_t d = 0; d < kD; ++d) t[i][d] = src[d] * a;
      }
      for (int64_t j = begin; j < end; ++j) {
        const float* __restrict vj = v + j * kD;
        const float* __restrict pj = p + j * kQueryTile + i0;  // i0 + i < kQueryTile: whole groups
        for (int64_t i = 0; i < kPvQueries; ++i) {
          const float wj = pj[i];
#pragma omp simd
          for (int64_t d = 0; d < kD; ++d) t[i][d] += wj * vj[d];
        }
      }
      for (int64_t i = 0; i < m; ++i) std::memcpy(acc + (i0 + i) * kD, t[i], sizeof t[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) scale_add_rows<0>(acc + i * D, alpha[i], p + i, kQueryTile, v, begin, end, D);
  }
}

// One page for many query vectors (prompt rows): per tile of kQueryTile queries, the scores against
// the page's keys as kKeyTile x kQueryTile matrix products, then the online softmax vectorised over
// the tile's queries and P.V accumulated per query.
template <int kD>
void page_by_tiles(const Params& p, Queries& w, const float* k, const float* v, int64_t first, int64_t ps,
                   int64_t D) {
  float* st = w.scores.data();  // [keys, kQueryTile]
  for (int64_t t = 0; t < w.count; t += kQueryTile) {
    const int32_t* lo = &w.lo[t];
    const int32_t* hi = &w.hi[t];
    int64_t begin = ps, end = 0;  // the keys of this page that some query of the tile sees
    for (int64_t i = 0; i < kQueryTile; ++i) {
      const int64_t b = std::max<int64_t>(lo[i], first) - first, e = std::min<int64_t>(hi[i], first + ps) - first;
      if (b < e) begin = std::min(begin, b), end = std::max(end, e);
    }
    if (begin >= end) continue;
    for (int64_t j0 = begin; j0 < end; j0 += kKeyTile) score_tile<kD>(&w.qt[t], w.padded, k, j0, end, st, D);
    float m_new[kQueryTile], sum[kQueryTile], alpha[kQueryTile];
    std::memcpy(m_new, &w.m[t], sizeof m_new);
    const float cap = p.softcap, inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
    for (int64_t j = begin; j < end; ++j) {
      const int32_t key = static_cast<int32_t>(first + j);
      float* row = st + j * kQueryTile;
#pragma omp simd
      for (int64_t i = 0; i < kQueryTile; ++i) {
        const float x = cap > 0.0f ? cap * std::tanh(row[i] * inv_cap) : row[i];
        row[i] = key >= lo[i] && key < hi[i] ? x : kMinScore;
        m_new[i] = std::max(m_new[i], row[i]);
      }
    }
#if defined(__AVX512F__)
    static_assert(kQueryTile == 16, "a tile's queries are one vector");
    {
      const __m512 m = _mm512_loadu_ps(m_new), none = _mm512_set1_ps(0.5f * kMinScore);
      _mm512_storeu_ps(alpha, exp16(_mm512_sub_ps(_mm512_loadu_ps(&w.m[t]), m)));
      __m512 total = _mm512_setzero_ps();
      for (int64_t j = begin; j < end; ++j) {
        float* row = st + j * kQueryTile;
        const __m512 x = _mm512_loadu_ps(row);
        const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, none, _CMP_GT_OQ), exp16(_mm512_sub_ps(x, m)));
        _mm512_storeu_ps(row, e);
        total = _mm512_add_ps(total, e);
      }
      _mm512_storeu_ps(sum, total);
    }
#elif defined(FASTGEN_ATTENTION_AVX2_TILES)
    {
      const __m256 none = _mm256_set1_ps(0.5f * kMinScore);
      __m256 total[2];
      for (int h = 0; h < 2; ++h) {
        const __m256 m = _mm256_loadu_ps(m_new + 8 * h);
        _mm256_storeu_ps(alpha + 8 * h, exp8(_mm256_sub_ps(_mm256_loadu_ps(&w.m[t + 8 * h]), m)));
        total[h] = _mm256_setzero_ps();
        for (int64_t j = begin; j < end; ++j) {
          float* row = st + j * kQueryTile + 8 * h;
          const __m256 x = _mm256_loadu_ps(row);
          const __m256 e = _mm256_and_ps(_mm256_cmp_ps(x, none, _CMP_GT_OQ), exp8(_mm256_sub_ps(x, m)));
          _mm256_storeu_ps(row, e);
          total[h] = _mm256_add_ps(total[h], e);
        }
        _mm256_storeu_ps(sum + 8 * h, total[h]);
      }
    }
#else
    {
#pragma omp simd
      for (int64_t i = 0; i < kQueryTile; ++i) {
        alpha[i] = std::exp(w.m[t + i] - m_new[i]);
        sum[i] = 0.0f;
      }
      for (int64_t j = begin; j < end; ++j) {
        float* row = st + j * kQueryTile;
#pragma omp simd
        for (int64_t i = 0; i < kQueryTile; ++i) {
          row[i] = row[i] > 0.5f * kMinScore ? std::exp(row[i] - m_new[i]) : 0.0f;
          sum[i] += row[i];
        }
      }
    }
#endif
    // A query that sees none of these keys has alpha 1 and weights 0: its state stays as it was.
    const int64_t n = std::min(kQueryTile, w.count - t);
    pv_tile<kD>(&w.acc[t * D], alpha, st, v, begin, end, n, D);
    for (int64_t i = 0; i < n; ++i) {
      w.l[t + i] = w.l[t + i] * alpha[i] + sum[i];
      w.m[t + i] = m_new[i];
    }
  }
}

// `next`: the item this thread runs after this one (null: none), whose first pages the last pages
// here ask for, so a thread's reads run on from one item into the next instead of starting cold
// (`bench_cpu_attention.py --layers=30`, wall ms a layer, two rounds in turns: decode 8 x 128
// 0.059-0.062 against 0.064-0.071, 8 x 512 0.262-0.270 against 0.277-0.279, 32 x 128 0.265-0.275
// against 0.312-0.321, 8 x 2048 0.983-0.987 against 1.000-1.145, on a 2-core Zen 4).
template <typename KV, int kD>
void attend(const Params& p, const Item& item, Partial* partial, const Item* next) {
  const Shapes& s = p.shape;
  const int64_t D = kD > 0 ? kD : s.head_dim, ps = s.page_size, G = s.num_q_heads / s.num_kv_heads;
  const int64_t R = item.num_rows * G;  // query vectors in this item
  const bool tiled = R >= kQueryTile;
  const int64_t seq_rows = p.cu_q_lens[item.seq + 1] - p.cu_q_lens[item.seq];
  const int64_t kv_len = p.kv_lens[item.seq];
  const Walk<KV> own = walk_of<KV>(p, item);

  thread_local Queries w;
  w.reset(R, tiled ? (R + kQueryTile - 1) / kQueryTile * kQueryTile : R, D, ps);
  for (int64_t r = 0; r < item.num_rows; ++r) {
    const int64_t row = p.cu_q_lens[item.seq] + item.first_row + r;
    const int64_t pos = kv_len - seq_rows + item.first_row + r;
    const int64_t hi = std::min<int64_t>({pos + 1, kv_len, item.key_end});
    const int64_t lo = std::max<int64_t>({0, pos - p.window + 1, item.key_begin});
    for (int64_t g = 0; g < G; ++g) {
      const int64_t i = r * G + g;
      w.lo[i] = static_cast<int32_t>(lo);
      w.hi[i] = static_cast<int32_t>(hi);
      const float* src = p.q + (row * s.num_q_heads + item.kv_head * G + g) * D;
      if (tiled) {  // the tiles read the queries transposed only
        for (int64_t d = 0; d < D; ++d) w.qt[d * w.padded + i] = src[d] * p.sm_scale;
      } else {
        for (int64_t d = 0; d < D; ++d) w.q[i * D + d] = src[d] * p.sm_scale;
      }
    }
  }
  // `page_by_group` (compiled head sizes only) while the queries' output rows fit in registers.
  w.grouped = kD > 0 && R >= 2 && R <= 4 && R * D <= kPvQueries * 64;
  for (int64_t i = 1; w.grouped && i < R; ++i) w.grouped = w.lo[i] == w.lo[0] && w.hi[i] == w.hi[0];
  for (int64_t page = own.first; page < own.first + kPrefetchPages && page < own.end; ++page) {
    Ahead first;
    first.set(own, page);
    first.rest();
  }
  const Walk<KV> then = next != nullptr ? walk_of<KV>(p, *next) : Walk<KV>{};
  for (int64_t page = own.first; page < own.end; ++page) {
    Ahead ahead;  // the page kPrefetchPages on: this item's, past its last the next item's
    const int64_t want = page + kPrefetchPages, later = then.first + (want - own.end);
    if (want < own.end) {
      ahead.set(own, want);
    } else if (later < then.end) {
      ahead.set(then, later);
    }
    if (tiled) {
      ahead.rest();  // many queries: the page's work is long beside the prefetches (no gain spreading them)
      const float* k = page_rows(own.k_page(page), ps * D, w.k_buf.data());
      const float* v = page_rows(own.v_page(page), ps * D, w.v_buf.data());
      page_by_tiles<kD>(p, w, k, v, page * ps, ps, D);
    } else {
      page_by_dots<kD>(p, w, own.k_page(page), own.v_page(page), page * ps, ps, D, ahead);
    }
    ahead.rest();
  }
  if (partial != nullptr) {
    std::copy_n(w.m.begin(), R, partial->m);
    std::copy_n(w.l.begin(), R, partial->l);
    std::copy_n(w.acc.begin(), R * D, partial->acc);
    return;
  }
  for (int64_t i = 0; i < R; ++i) {
    const int64_t row = p.cu_q_lens[item.seq] + item.first_row + i / G;
    const float inv = w.l[i] > 0.0f ? 1.0f / w.l[i] : 0.0f;
    float* dst = p.out + (row * s.num_q_heads + item.kv_head * G + i % G) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = w.acc[i * D + d] * inv;
  }
}

// The kernel for a KV dtype and head size: head sizes 64 and 128 get their own unrolled copy.
template <typename KV>
void (*attend_for(int64_t head_dim))(const Params&, const Item&, Partial*, const Item*) {
  if (head_dim == 64) return attend<KV, 64>;
  if (head_dim == 128) return attend<KV, 128>;
  return attend<KV, 0>;
}

// One call's work items, their split items' partial results and the kernel to run on each (the pool's
// helpers reach it only through `run_items`, which returns when every item is done).
struct Shared {
  std::vector<Item> items;
  std::vector<float> partials;  // split items' (m, l, acc), see Item::split
  Params params;
  void (*run)(const Params&, const Item&, Partial*, const Item*);

  Partial partial(const Item& item) {
    const int64_t R = item.num_rows * (params.shape.num_q_heads / params.shape.num_kv_heads);
    float* base = partials.data() + item.split;
    return {base, base + R, base + 2 * R};
  }

  // Item i; `next`: the item this thread runs after it (-1: none).
  void run_item(int64_t i, int64_t next) {
    Partial split = items[i].split >= 0 ? partial(items[i]) : Partial{};
    run(params, items[i], items[i].split >= 0 ? &split : nullptr, next >= 0 ? &items[next] : nullptr);
  }
};

// Work items: (sequence, KV head, block of rows), and when there are too few of them to keep every
// thread busy, each block's keys split into page-aligned ranges (flash-decoding); the split items
// leave partial results that `combine` merges.
void make_items(Shared& w, int64_t seqs, int64_t threads) {
  const Params& p = w.params;
  const Shapes& s = p.shape;
  for (int32_t seq = 0; seq < seqs; ++seq) {
    const int32_t rows = p.cu_q_lens[seq + 1] - p.cu_q_lens[seq];
    if (rows <= 0 || p.cu_q_lens[seq + 1] > s.num_rows) continue;
    for (int32_t first = 0; first < rows; first += kBlockRows) {
      for (int32_t h = 0; h < s.num_kv_heads; ++h) {
        w.items.push_back({seq, h, first, std::min<int32_t>(kBlockRows, rows - first), 0,
                           std::numeric_limits<int64_t>::max(), -1});
      }
    }
  }
  const int64_t base = static_cast<int64_t>(w.items.size());
  if (base == 0 || base >= kItemsPerThread * threads) return;
  const int64_t want = (kItemsPerThread * threads + base - 1) / base;  // splits per item wanted
  std::vector<Item> items;
  const int64_t G = s.num_q_heads / s.num_kv_heads;
  for (const Item& item : w.items) {
    auto [lo, hi] = visible_keys(p, item.seq, item.first_row, item.num_rows);
    const int64_t splits = std::min(want, (hi - lo) / kMinSplitKeys);
    if (splits < 2) {
      items.push_back(item);
      continue;
    }
    const int64_t R = item.num_rows * G, ps = s.page_size;
    const int64_t chunk = ((hi - lo + splits - 1) / splits + ps - 1) / ps * ps;
    for (int64_t begin = lo / ps * ps; begin < hi; begin += chunk) {
      Item part = item;
      part.key_begin = begin;
      part.key_end = begin + chunk;
      part.split = static_cast<int64_t>(w.partials.size());
      w.partials.resize(w.partials.size() + R * (2 + s.head_dim));
      items.push_back(part);
    }
  }
  w.items = std::move(items);
}

// Merges the partial results of split items (consecutive items of one block) into the output.
void combine(Shared& w) {
  const Shapes& s = w.params.shape;
  const int64_t G = s.num_q_heads / s.num_kv_heads, D = s.head_dim;
  std::vector<float> out;
  for (size_t first = 0; first < w.items.size();) {
    const Item& item = w.items[first];
    size_t last = first + 1;
    if (item.split < 0) {
      first = last;
      continue;
    }
    while (last < w.items.size() && w.items[last].split >= 0 && w.items[last].seq == item.seq &&
           w.items[last].kv_head == item.kv_head && w.items[last].first_row == item.first_row) {
      ++last;
    }
    for (int64_t i = 0; i < item.num_rows * G; ++i) {
      float m = kMinScore, l = 0.0f;
      for (size_t j = first; j < last; ++j) m = std::max(m, w.partial(w.items[j]).m[i]);
      out.assign(D, 0.0f);
      for (size_t j = first; j < last; ++j) {
        const Partial part = w.partial(w.items[j]);
        const float scale = std::exp(part.m[i] - m);
        l += part.l[i] * scale;
        for (int64_t d = 0; d < D; ++d) out[d] += part.acc[i * D + d] * scale;
      }
      const int64_t row = w.params.cu_q_lens[item.seq] + item.first_row + i / G;
      float* dst = w.params.out + (row * s.num_q_heads + item.kv_head * G + i % G) * D;
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      for (int64_t d = 0; d < D; ++d) dst[d] = out[d] * inv;
    }
    first = last;
  }
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> kv_lens,
                ffi::Buffer<ffi::S32> page_indices, ffi::Buffer<ffi::S32> cu_q_lens,
                ffi::Buffer<ffi::S32> num_seqs, ffi::Buffer<ffi::S32> sliding_window, float sm_scale,
                float logit_softcap, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions();
  auto kd = k_pages.dimensions();
  auto pd = page_indices.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || pd.size() != 2 || v_pages.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("ragged paged attention: bad ranks");
  }
  if (k_pages.element_type() != v_pages.element_type()) {
    return ffi::Error::InvalidArgument("ragged paged attention: K and V pages differ in dtype");
  }
  Shapes shape{qd[0], qd[1], qd[2], kd[0], kd[1], kd[2], pd[0], pd[1]};
  if (shape.num_q_heads % shape.num_kv_heads || kd[3] != shape.head_dim) {
    return ffi::Error::InvalidArgument("ragged paged attention: head shapes do not match");
  }
  Shared work;
  if (k_pages.element_type() == ffi::DataType::F32) {
    work.run = attend_for<float>(shape.head_dim);
  } else if (k_pages.element_type() == ffi::DataType::BF16) {
    work.run = attend_for<uint16_t>(shape.head_dim);
  } else {
    return ffi::Error::InvalidArgument("ragged paged attention: KV pages must be f32 or bf16");
  }
  float* result = out->typed_data();
  std::memset(result, 0, sizeof(float) * shape.num_rows * shape.num_q_heads * shape.head_dim);
  const int64_t seqs = std::min<int64_t>(num_seqs.typed_data()[0], shape.max_seqs);
  work.params = Params{q.typed_data(), k_pages.untyped_data(), v_pages.untyped_data(),
                       kv_lens.typed_data(), page_indices.typed_data(), cu_q_lens.typed_data(),
                       result, shape, sm_scale, logit_softcap, sliding_window.typed_data()[0]};
  make_items(work, seqs, pool.num_threads() + 1);
  fastgen_kernels::run_items(pool, static_cast<int64_t>(work.items.size()),
                             [&work](int64_t i, int64_t next) { work.run_item(i, next); });
  combine(work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastgenRaggedPagedAttention, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::AnyBuffer>()         // k_pages
                                  .Arg<ffi::AnyBuffer>()         // v_pages
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_indices
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_seqs
                                  .Arg<ffi::Buffer<ffi::S32>>()  // sliding_window
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("logit_softcap")
                                  .Ret<ffi::Buffer<ffi::F32>>());
