// Ragged paged attention on the CPU, an XLA FFI custom call (see ragged_paged_attention.py).
//
// Semantics are those of pallas_kernels/reference.py: slab rows cu_q_lens[s]..cu_q_lens[s + 1]
// belong to sequence s, whose kv_lens[s] keys (new tokens included, already written) live in the
// pages page_indices[s, :]. A row at position p sees keys k with k <= p, k < kv_len and, with a
// window w, k > p - w. Rows past cu_q_lens[num_seqs] come out as zeros.
//
// Work items are (sequence, KV head, block of query rows); they are spread over XLA's intra-op
// thread pool, the calling thread taking its share, so nothing waits on a pool that is busy. Each
// item walks its sequence's pages through the page table (no gather is materialised), one page at a
// time: for each of the block's rows x group query heads, its scores against the page's visible
// keys (dot products vectorised over head_dim), their exponentials (vectorised over keys through
// glibc's vector math), and an online softmax update of its running max, denominator and output.
// Head sizes 64 and 128 get their own instantiation with the size a compile-time constant, so the
// dot products unroll into a few vector FMAs and the output row being accumulated stays in
// registers across a page's keys (twice as fast at decode 32 x 128 as a run-time head size).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockRows = 16;  // query rows per work item

struct Shapes {
  int64_t num_rows, num_q_heads, head_dim;          // q [T, H, D]
  int64_t num_kv_heads, num_pages, page_size;       // pages [KVH, P, ps, D]
  int64_t max_seqs, width;                          // page_indices [S, W]
};

struct Item {
  int32_t seq, kv_head, first_row, num_rows;
};

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Rows [ps, D] of one page as floats: the page itself for f32, a converted copy for bf16.
inline const float* page_rows(const float* page, int64_t, float*) { return page; }
inline const float* page_rows(const uint16_t* page, int64_t n, float* buffer) {
  for (int64_t i = 0; i < n; ++i) buffer[i] = to_float(page[i]);
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

// acc = acc * alpha + sum_j w[j] v[j, :] over keys [begin, end). With kD > 0 the running row lives
// in registers (a local array of constant size) for the whole page instead of being reloaded and
// stored back for every key.
template <int kD>
inline void scale_add_rows(float* __restrict acc, float alpha, const float* __restrict w,
                           const float* __restrict v, int64_t begin, int64_t end, int64_t D) {
  if constexpr (kD > 0) {
    float t[kD];
#pragma omp simd
    for (int64_t d = 0; d < kD; ++d) t[d] = acc[d] * alpha;
    for (int64_t j = begin; j < end; ++j) {
      const float wj = w[j];
      const float* __restrict vj = v + j * kD;
#pragma omp simd
      for (int64_t d = 0; d < kD; ++d) t[d] += wj * vj[d];
    }
#pragma omp simd
    for (int64_t d = 0; d < kD; ++d) acc[d] = t[d];
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
    for (int64_t j = begin; j < end; ++j) {
      const float wj = w[j];
      const float* __restrict vj = v + j * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += wj * vj[d];
    }
  }
}

template <typename KV, int kD>
void attend(const Params& p, const Item& item) {
  const Shapes& s = p.shape;
  const int64_t D = kD > 0 ? kD : s.head_dim, ps = s.page_size, G = s.num_q_heads / s.num_kv_heads;
  const int64_t R = item.num_rows * G;  // query vectors in this item
  const int64_t seq_rows = p.cu_q_lens[item.seq + 1] - p.cu_q_lens[item.seq];
  const int64_t kv_len = p.kv_lens[item.seq];
  const KV* k_head = static_cast<const KV*>(p.k_pages) + item.kv_head * s.num_pages * ps * D;
  const KV* v_head = static_cast<const KV*>(p.v_pages) + item.kv_head * s.num_pages * ps * D;

  std::vector<float> qs(R * D), acc(R * D, 0.0f), m(R, kMinScore), l(R, 0.0f);
  std::vector<int64_t> lo(item.num_rows), hi(item.num_rows);
  std::vector<float> k_buf(ps * D), v_buf(ps * D), scores(ps);
  int64_t first_key = kv_len, last_key = 0;
  for (int64_t r = 0; r < item.num_rows; ++r) {
    const int64_t row = p.cu_q_lens[item.seq] + item.first_row + r;
    const int64_t pos = kv_len - seq_rows + item.first_row + r;
    hi[r] = std::min<int64_t>(pos + 1, kv_len);
    lo[r] = std::max<int64_t>(0, pos - p.window + 1);
    first_key = std::min(first_key, lo[r]);
    last_key = std::max(last_key, hi[r]);
    for (int64_t g = 0; g < G; ++g) {
      const float* src = p.q + (row * s.num_q_heads + item.kv_head * G + g) * D;
      float* dst = &qs[(r * G + g) * D];
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * p.sm_scale;
    }
  }
  const int32_t* pages = p.page_indices + item.seq * s.width;
  for (int64_t page = first_key / ps; page * ps < last_key && page < s.width; ++page) {
    const int64_t physical = std::clamp<int64_t>(pages[page], 0, s.num_pages - 1);
    const float* k = page_rows(k_head + physical * ps * D, ps * D, k_buf.data());
    const float* v = page_rows(v_head + physical * ps * D, ps * D, v_buf.data());
    for (int64_t r = 0; r < item.num_rows; ++r) {
      // Keys [begin, end) of this page, relative to the page's first key.
      const int64_t begin = std::max(lo[r], page * ps) - page * ps;
      const int64_t end = std::min(hi[r], (page + 1) * ps) - page * ps;
      if (begin >= end) continue;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t i = r * G + g;
        const float* qv = &qs[i * D];
        float* sc = scores.data();
        for (int64_t j = begin; j < end; ++j) sc[j] = dot<kD>(qv, k + j * D, D);
        if (p.softcap > 0.0f) {
          const float inv = 1.0f / p.softcap;
          for (int64_t j = begin; j < end; ++j) sc[j] = p.softcap * std::tanh(sc[j] * inv);
        }
        float m_new = m[i];
        for (int64_t j = begin; j < end; ++j) m_new = std::max(m_new, sc[j]);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = begin; j < end; ++j) {
          sc[j] = std::exp(sc[j] - m_new);
          sum += sc[j];
        }
        const float alpha = std::exp(m[i] - m_new);
        scale_add_rows<kD>(&acc[i * D], alpha, sc, v, begin, end, D);
        l[i] = l[i] * alpha + sum;
        m[i] = m_new;
      }
    }
  }
  for (int64_t r = 0; r < item.num_rows; ++r) {
    const int64_t row = p.cu_q_lens[item.seq] + item.first_row + r;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t i = r * G + g;
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      float* dst = p.out + (row * s.num_q_heads + item.kv_head * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = acc[i * D + d] * inv;
    }
  }
}

// The kernel for a KV dtype and head size: head sizes 64 and 128 get their own unrolled copy.
template <typename KV>
void (*attend_for(int64_t head_dim))(const Params&, const Item&) {
  if (head_dim == 64) return attend<KV, 64>;
  if (head_dim == 128) return attend<KV, 128>;
  return attend<KV, 0>;
}

// Work shared between the calling thread and the pool's tasks; a task that starts after the work
// is gone only touches this (kept alive by its shared_ptr), never the caller's stack.
struct Shared {
  std::vector<Item> items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable all_done;
  Params params;
  void (*run)(const Params&, const Item&);

  void work() {
    int64_t finished = 0;
    for (int64_t i; (i = next.fetch_add(1)) < static_cast<int64_t>(items.size());) {
      run(params, items[i]);
      ++finished;
    }
    if (finished && done.fetch_add(finished) + finished == static_cast<int64_t>(items.size())) {
      std::lock_guard<std::mutex> lock(mutex);
      all_done.notify_all();
    }
  }
};

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
  auto shared = std::make_shared<Shared>();
  if (k_pages.element_type() == ffi::DataType::F32) {
    shared->run = attend_for<float>(shape.head_dim);
  } else if (k_pages.element_type() == ffi::DataType::BF16) {
    shared->run = attend_for<uint16_t>(shape.head_dim);
  } else {
    return ffi::Error::InvalidArgument("ragged paged attention: KV pages must be f32 or bf16");
  }
  float* result = out->typed_data();
  std::memset(result, 0, sizeof(float) * shape.num_rows * shape.num_q_heads * shape.head_dim);
  const int32_t* cu = cu_q_lens.typed_data();
  const int64_t seqs = std::min<int64_t>(num_seqs.typed_data()[0], shape.max_seqs);
  for (int32_t seq = 0; seq < seqs; ++seq) {
    const int32_t rows = cu[seq + 1] - cu[seq];
    if (rows <= 0 || cu[seq + 1] > shape.num_rows) continue;
    for (int32_t first = 0; first < rows; first += kBlockRows) {
      for (int32_t h = 0; h < shape.num_kv_heads; ++h) {
        shared->items.push_back({seq, h, first, std::min<int32_t>(kBlockRows, rows - first)});
      }
    }
  }
  shared->params = Params{q.typed_data(), k_pages.untyped_data(), v_pages.untyped_data(),
                          kv_lens.typed_data(), page_indices.typed_data(), cu, result, shape,
                          sm_scale, logit_softcap, sliding_window.typed_data()[0]};
  const int64_t helpers =
      std::min<int64_t>(pool.num_threads(), static_cast<int64_t>(shared->items.size()) - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->work(); });
  shared->work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->all_done.wait(lock, [&] {
    return shared->done.load() == static_cast<int64_t>(shared->items.size());
  });
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
