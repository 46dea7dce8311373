// Writes a step's new K/V rows into the paged pool in place, an XLA FFI custom call (see write_kv.py).
//
// pages [KVH, P, ps, D] (any element type; the rows come in the same one), rows [T, KVH, D],
// slots i32[T]: row t goes to flat slot slots[t] (page * ps + offset) of every KV head; a slot
// outside [0, P * ps) is dropped (padding rows). The outputs alias the pages (the caller donates
// them), so a step writes T x KVH x D elements, not the pool.
//
// Why not XLA's scatter: XLA's CPU backend has no bfloat16 scatter and widens it to float32, which
// converts the whole pool to float32 and back on every step.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace {

namespace ffi = xla::ffi;

size_t element_bytes(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32:
      return 4;
    case ffi::DataType::BF16:
    case ffi::DataType::F16:
      return 2;
    default:
      return 0;
  }
}

ffi::Error Write(ffi::AnyBuffer pages, ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> slots,
                 ffi::Result<ffi::AnyBuffer> out) {
  auto pd = pages.dimensions(), rd = rows.dimensions();
  const size_t bytes = element_bytes(pages.element_type());
  if (pd.size() != 4 || rd.size() != 3 || slots.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("write_kv: pages [KVH, P, ps, D], rows [T, KVH, D], slots [T]");
  }
  if (!bytes || rows.element_type() != pages.element_type() || out->element_type() != pages.element_type()) {
    return ffi::Error::InvalidArgument("write_kv: pages and rows must be one of f32, bf16, f16");
  }
  const int64_t kvh = pd[0], slots_per_head = pd[1] * pd[2], D = pd[3], T = rd[0];
  auto od = out->dimensions();
  if (rd[1] != kvh || rd[2] != D || slots.dimensions()[0] != T || od.size() != 4 ||
      !std::equal(od.begin(), od.end(), pd.begin())) {
    return ffi::Error::InvalidArgument("write_kv: shapes do not match");
  }
  // The output aliases the pages (XLA copies pages the caller did not donate before the call); a
  // runtime that did not alias them would leave the output unwritten, so start it from the pages.
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != pages.untyped_data()) std::memcpy(dst, pages.untyped_data(), pages.size_bytes());
  const char* src = static_cast<const char*>(rows.untyped_data());
  const int32_t* slot = slots.typed_data();
  const size_t row_bytes = D * bytes;
  for (int64_t t = 0; t < T; ++t) {
    if (slot[t] < 0 || slot[t] >= slots_per_head) continue;
    for (int64_t h = 0; h < kvh; ++h) {
      std::memcpy(dst + (h * slots_per_head + slot[t]) * row_bytes, src + (t * kvh + h) * row_bytes, row_bytes);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FastgenWriteKv, Write,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // pages [KVH, P, ps, D]
                                  .Arg<ffi::AnyBuffer>()          // rows [T, KVH, D], the pages' type
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slots [T]
                                  .Ret<ffi::AnyBuffer>());        // the pages, aliased
