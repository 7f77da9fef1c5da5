// C++ API tests of flash_mla.hpp, in one binary (each .cu including the kernels costs a
// compile per architecture), run by CTest in two modes:
//
//   test_mla_decode checks   argument checks and workspace sizing: pure host code, runs
//                            everywhere (validate() and every check run before any CUDA call)
//   test_mla_decode gpu      correctness against a float host reference: bf16 and fp16,
//                            h_q 16 and 128, s_q 1 and 2, causal and not, every kernel the
//                            device and the build support, 64-token pages and cases of 16,
//                            32, 128 and 256 tokens per page; exits 77 (CTest: skipped)
//                            without a GPU of compute capability >= 8.0
//
// The GPU cases poison what the kernel must not read: NaN in unused cache slots, pages and
// padding, junk block_table entries past each request's pages, NaN around a strided q.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <flash_mla/flash_mla.hpp>
#include <flash_mla/input_check.cuh>

namespace {

using flash_mla::DecodeParams;
using flash_mla::DType;
using flash_mla::kHeadDim;
using flash_mla::kHeadDimV;
using flash_mla::KernelChoice;
using flash_mla::kMetaInts;
using flash_mla::MetadataParams;
using flash_mla::Status;

constexpr int kExitSkip = 77;
constexpr int kDefaultPage = 64;  ///< DecodeParams::page_size when left alone
const int kPageSizes[] = {16, 32, 64, 128, 256};
int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok && failures++ < 30) std::fprintf(stderr, "FAILED: %s\n", what.c_str());
}

/// `st` is an error whose message mentions `needle`.
void expect_error(const Status& st, const std::string& needle, const std::string& what) {
  if (st.ok()) {
    expect(false, what + ": expected an error mentioning '" + needle + "', got success");
  } else {
    expect(st.message.find(needle) != std::string::npos,
           what + ": error '" + st.message + "' does not mention '" + needle + "'");
  }
}

// ------------------------------------------------------------------------------------------
// checks: host only
// ------------------------------------------------------------------------------------------

void* fake_ptr(uintptr_t offset = 0) { return reinterpret_cast<void*>(uintptr_t(1) << 20 | offset); }

/// A DecodeParams that validate() accepts. The pointers are never dereferenced.
DecodeParams valid_params() {
  DecodeParams p;
  p.dtype = DType::kBF16;
  p.batch = 3;
  p.seqlen_q = 2;
  p.num_heads_q = 16;
  p.num_heads_kv = 1;
  p.num_blocks = 10;
  p.max_blocks_per_seq = 4;
  p.softmax_scale = 1.f / 24.f;
  p.q = fake_ptr();
  p.q_head_stride = kHeadDim;
  p.q_seq_stride = 16 * kHeadDim;
  p.q_batch_stride = 2 * 16 * kHeadDim;
  p.k_cache = fake_ptr();
  p.k_head_stride = kHeadDim;
  p.k_token_stride = kHeadDim;
  p.k_block_stride = kDefaultPage * kHeadDim;
  p.block_table = static_cast<const int32_t*>(fake_ptr());
  p.block_table_stride = 4;
  p.cache_seqlens = static_cast<const int32_t*>(fake_ptr());
  p.tile_scheduler_metadata = static_cast<const int32_t*>(fake_ptr());
  p.num_sm_parts = 5;
  p.num_splits = static_cast<const int32_t*>(fake_ptr());
  p.out = fake_ptr();
  p.lse = static_cast<float*>(fake_ptr());
  p.o_accum = static_cast<float*>(fake_ptr());
  p.lse_accum = static_cast<float*>(fake_ptr());
  p.max_splits = 8;
  return p;
}

void check_decode_params() {
  expect(flash_mla::validate(valid_params()).ok(), "valid params pass: " + flash_mla::validate(valid_params()).message);

  struct Bad {
    const char* needle;
    std::function<void(DecodeParams&)> mutate;
  };
  const Bad bad[] = {
      {"dtype", [](DecodeParams& p) { p.dtype = static_cast<DType>(7); }},
      {"batch", [](DecodeParams& p) { p.batch = -1; }},
      {"seqlen_q", [](DecodeParams& p) { p.seqlen_q = 0; }},
      {"num_heads_q", [](DecodeParams& p) { p.num_heads_q = 0; }},
      {"num_heads_kv", [](DecodeParams& p) { p.num_heads_kv = 0; }},
      {"multiple of num_heads_kv", [](DecodeParams& p) { p.num_heads_kv = 3; }},
      {"num_heads_kv must be <= 65535", [](DecodeParams& p) { p.num_heads_q = p.num_heads_kv = 70000; }},
      {"seqlen_q * num_heads_q", [](DecodeParams& p) { p.seqlen_q = 8, p.num_heads_q = 1 << 20; }},
      {"seqlen_q * num_heads_q", [](DecodeParams& p) { p.seqlen_q = 1 << 20, p.num_heads_q = 1 << 20; }},
      {"num_sm_parts", [](DecodeParams& p) { p.num_sm_parts = 0; }},
      {"num_sm_parts", [](DecodeParams& p) { p.num_sm_parts = 65536; }},
      {"max_splits", [](DecodeParams& p) { p.max_splits = 7; }},
      {"max_splits", [](DecodeParams& p) { p.batch = INT_MAX, p.max_splits = INT_MAX; }},
      {"num_blocks", [](DecodeParams& p) { p.num_blocks = -1; }},
      {"max_blocks_per_seq", [](DecodeParams& p) { p.max_blocks_per_seq = -1; }},
      {"softmax_scale", [](DecodeParams& p) { p.softmax_scale = 0.f; }},
      {"softmax_scale", [](DecodeParams& p) { p.softmax_scale = -1.f; }},
      {"softmax_scale", [](DecodeParams& p) { p.softmax_scale = std::numeric_limits<float>::quiet_NaN(); }},
      {"softmax_scale", [](DecodeParams& p) { p.softmax_scale = std::numeric_limits<float>::infinity(); }},
      {"q is null", [](DecodeParams& p) { p.q = nullptr; }},
      {"k_cache is null", [](DecodeParams& p) { p.k_cache = nullptr; }},
      {"block_table is null", [](DecodeParams& p) { p.block_table = nullptr; }},
      {"cache_seqlens is null", [](DecodeParams& p) { p.cache_seqlens = nullptr; }},
      {"tile_scheduler_metadata is null", [](DecodeParams& p) { p.tile_scheduler_metadata = nullptr; }},
      {"num_splits is null", [](DecodeParams& p) { p.num_splits = nullptr; }},
      {"out is null", [](DecodeParams& p) { p.out = nullptr; }},
      {"lse is null", [](DecodeParams& p) { p.lse = nullptr; }},
      {"o_accum is null", [](DecodeParams& p) { p.o_accum = nullptr; }},
      {"lse_accum is null", [](DecodeParams& p) { p.lse_accum = nullptr; }},
      {"q must be 2-byte aligned", [](DecodeParams& p) { p.q = fake_ptr(1); }},
      {"k_cache must be 16-byte aligned", [](DecodeParams& p) { p.k_cache = fake_ptr(8); }},
      {"out must be 16-byte aligned", [](DecodeParams& p) { p.out = fake_ptr(8); }},
      {"o_accum must be 16-byte aligned", [](DecodeParams& p) { p.o_accum = static_cast<float*>(fake_ptr(4)); }},
      {"lse must be 4-byte aligned", [](DecodeParams& p) { p.lse = static_cast<float*>(fake_ptr(2)); }},
      {"block_table must be 4-byte aligned", [](DecodeParams& p) { p.block_table = static_cast<const int32_t*>(fake_ptr(2)); }},
      {"k_cache strides", [](DecodeParams& p) { p.k_token_stride = kHeadDim + 4; }},
      {"k_cache strides", [](DecodeParams& p) { p.k_block_stride = 8 * kHeadDim + 2; }},
      {"strides must be >= 0", [](DecodeParams& p) { p.q_seq_stride = -kHeadDim; }},
      {"strides must be >= 0", [](DecodeParams& p) { p.k_head_stride = -8; }},
      {"page_size", [](DecodeParams& p) { p.page_size = 48; }},
      {"page_size", [](DecodeParams& p) { p.page_size = 0; }},
      {"page_size", [](DecodeParams& p) { p.page_size = 1; }},
      {"page_size", [](DecodeParams& p) { p.page_size = 8; }},
      {"page_size", [](DecodeParams& p) { p.page_size = 65; }},
      {"page_size", [](DecodeParams& p) { p.page_size = 512; }},
      {"page_size", [](DecodeParams& p) { p.page_size = -64; }},
  };
  int i = 0;
  for (const Bad& b : bad) {
    DecodeParams p = valid_params();
    b.mutate(p);
    const std::string what = "validate case " + std::to_string(i++) + " (" + b.needle + ")";
    expect_error(flash_mla::validate(p), b.needle, what);
    // mla_decode checks before it touches the device: same error, no GPU needed.
    expect_error(flash_mla::mla_decode(p), b.needle, "mla_decode, " + what);
  }

  // batch == 0: nothing is read or written, null pointers are fine, mla_decode is a no-op.
  DecodeParams empty;
  empty.batch = 0;
  empty.seqlen_q = 1;
  empty.num_heads_q = empty.num_heads_kv = 1;
  empty.num_sm_parts = 1;
  empty.max_splits = 1;
  empty.softmax_scale = 0.5f;
  expect(flash_mla::validate(empty).ok(), "batch 0 with null pointers passes validate");
  expect(flash_mla::mla_decode(empty).ok(), "batch 0 mla_decode is a no-op");
  empty.page_size = 48;
  expect_error(flash_mla::validate(empty), "page_size", "batch 0 with page_size 48");
}

/// FP8 inputs: an FP8 cache needs descale_k and row strides of whole 16-byte chunks; an FP8 q
/// needs descale_q and an FP8 cache (and may be 1-byte aligned); a descale given for a 16-bit
/// input, or missing for an FP8 one, is refused, by mla_decode too, before any CUDA call.
void check_fp8_params() {
  expect(DecodeParams{}.kv_dtype == flash_mla::KvDType::kSameAsQ, "DecodeParams::kv_dtype defaults to kSameAsQ");
  const auto fp8_cache = [] {
    DecodeParams p = valid_params();
    p.kv_dtype = flash_mla::KvDType::kFP8E4M3;
    p.descale_k = static_cast<const float*>(fake_ptr());
    return p;
  };
  const auto fp8_q = [&] {
    DecodeParams p = fp8_cache();
    p.dtype = DType::kFP8E4M3;
    p.descale_q = static_cast<const float*>(fake_ptr(4));
    p.q = fake_ptr(1);
    return p;
  };
  expect(flash_mla::validate(fp8_cache()).ok(), "FP8 cache with descale_k passes: " + flash_mla::validate(fp8_cache()).message);
  expect(flash_mla::validate(fp8_q()).ok(), "FP8 q and cache pass: " + flash_mla::validate(fp8_q()).message);
  DecodeParams fp16_q = fp8_cache();
  fp16_q.dtype = DType::kFP16;
  expect(flash_mla::validate(fp16_q).ok(), "fp16 q with an FP8 cache passes");
  DecodeParams byte_stride = fp8_cache();
  byte_stride.k_token_stride = kHeadDim + 16;  // padded rows: 16 bytes more
  expect(flash_mla::validate(byte_stride).ok(), "FP8 cache with a 16-byte row padding passes");

  struct Bad {
    const char* needle;
    std::function<DecodeParams()> make;
  };
  const Bad bad[] = {
      {"descale_k is null", [&] { DecodeParams p = fp8_cache(); p.descale_k = nullptr; return p; }},
      {"descale_k must be null", [] { DecodeParams p = valid_params(); p.descale_k = static_cast<const float*>(fake_ptr()); return p; }},
      {"descale_k must be 4-byte aligned", [&] { DecodeParams p = fp8_cache(); p.descale_k = static_cast<const float*>(fake_ptr(2)); return p; }},
      {"FP8 q needs an FP8 k_cache", [&] { DecodeParams p = fp8_q(); p.kv_dtype = flash_mla::KvDType::kSameAsQ; p.descale_k = nullptr; return p; }},
      {"descale_q is null", [&] { DecodeParams p = fp8_q(); p.descale_q = nullptr; return p; }},
      {"descale_q must be null", [&] { DecodeParams p = fp8_cache(); p.descale_q = static_cast<const float*>(fake_ptr()); return p; }},
      {"descale_q must be 4-byte aligned", [&] { DecodeParams p = fp8_q(); p.descale_q = static_cast<const float*>(fake_ptr(1)); return p; }},
      {"k_cache strides", [&] { DecodeParams p = fp8_cache(); p.k_token_stride = kHeadDim + 8; return p; }},
      {"kv_dtype", [&] { DecodeParams p = fp8_cache(); p.kv_dtype = static_cast<flash_mla::KvDType>(5); return p; }},
      {"q must be 2-byte aligned", [&] { DecodeParams p = fp8_cache(); p.q = fake_ptr(1); return p; }},
  };
  int i = 0;
  for (const Bad& b : bad) {
    const DecodeParams p = b.make();
    const std::string what = "FP8 case " + std::to_string(i++) + " (" + b.needle + ")";
    expect_error(flash_mla::validate(p), b.needle, what);
    expect_error(flash_mla::mla_decode(p), b.needle, "mla_decode, " + what);
  }
}

/// Page sizes: 64 by default; 16, 32, 64, 128 and 256 accepted (with the page stride they
/// imply, or a padded one); anything else refused by validate() with a message naming
/// page_size and the supported sizes, and by check_paged_inputs() before it launches.
void check_page_sizes() {
  expect(DecodeParams{}.page_size == 64, "DecodeParams::page_size defaults to 64");
  expect(flash_mla::InputCheckParams{}.page_size == 64, "InputCheckParams::page_size defaults to 64");
  expect(valid_params().page_size == kDefaultPage, "valid_params leaves page_size at its default");
  for (int page : kPageSizes) {
    expect(flash_mla::is_supported_page_size(page), "is_supported_page_size(" + std::to_string(page) + ")");
    DecodeParams p = valid_params();
    p.page_size = page;
    p.k_block_stride = int64_t(page) * kHeadDim;
    const Status st = flash_mla::validate(p);
    expect(st.ok(), "validate accepts page_size " + std::to_string(page) + ": " + st.message);
    p.k_block_stride = int64_t(page + 8) * kHeadDim;  // pages further apart than their size
    expect(flash_mla::validate(p).ok(), "validate accepts a padded page stride, page_size " + std::to_string(page));
  }
  for (int page : {0, 1, 8, 15, 17, 33, 48, 63, 65, 96, 192, 255, 257, 512, 1024, -16, -64, INT_MIN, INT_MAX}) {
    const std::string what = "page_size " + std::to_string(page);
    expect(!flash_mla::is_supported_page_size(page), "is_supported_page_size rejects " + what);
    DecodeParams p = valid_params();
    p.page_size = page;
    const Status st = flash_mla::validate(p);
    expect_error(st, "page_size", "validate, " + what);
    expect_error(st, "16, 32, 64, 128, 256", "validate lists the page sizes, " + what);
    expect_error(flash_mla::mla_decode(p), "page_size", "mla_decode, " + what);  // before any CUDA call
  }
  // check_paged_inputs refuses an unsupported page size before it launches anything.
  flash_mla::InputCheckParams ic;
  ic.block_table = static_cast<const int32_t*>(fake_ptr());
  ic.block_table_stride = 4;
  ic.cache_seqlens = static_cast<const int32_t*>(fake_ptr());
  ic.batch = 3;
  ic.max_blocks_per_seq = 4;
  ic.num_blocks = 10;
  ic.result = static_cast<int64_t*>(fake_ptr());
  for (int page : {0, 48, 512}) {
    ic.page_size = page;
    expect_error(flash_mla::check_paged_inputs(ic), "page_size",
                 "check_paged_inputs, page_size " + std::to_string(page));
  }
}

void check_metadata_params() {
  MetadataParams good;
  good.cache_seqlens = static_cast<const int32_t*>(fake_ptr());
  good.tile_scheduler_metadata = static_cast<int32_t*>(fake_ptr());
  good.num_splits = static_cast<int32_t*>(fake_ptr());
  good.batch = 4;
  good.num_sm_parts = 8;
  struct Bad {
    const char* needle;
    std::function<void(MetadataParams&)> mutate;
  };
  const Bad bad[] = {
      {"batch", [](MetadataParams& p) { p.batch = -1; }},
      {"num_sm_parts", [](MetadataParams& p) { p.num_sm_parts = 0; }},
      {"num_sm_parts", [](MetadataParams& p) { p.num_sm_parts = 65536; }},
      {"cache_seqlens is null", [](MetadataParams& p) { p.cache_seqlens = nullptr; }},
      {"tile_scheduler_metadata", [](MetadataParams& p) { p.tile_scheduler_metadata = nullptr; }},
      {"num_splits", [](MetadataParams& p) { p.num_splits = nullptr; }},
      {"4-byte aligned", [](MetadataParams& p) { p.num_splits = static_cast<int32_t*>(fake_ptr(2)); }},
  };
  int i = 0;
  for (const Bad& b : bad) {
    MetadataParams p = good;
    b.mutate(p);
    expect_error(flash_mla::get_mla_metadata(p), b.needle, "get_mla_metadata case " + std::to_string(i++));
  }
}

void check_sizes() {
  flash_mla::SplitWorkspaceSize ws;
  Status st = flash_mla::get_split_workspace_size(3, 2, 16, 10, &ws);
  expect(st.ok(), "get_split_workspace_size ok: " + st.message);
  expect(ws.max_splits == 13, "max_splits = batch + num_sm_parts");
  expect(ws.max_splits == flash_mla::split_workspace_splits(3, 10), "agrees with split_workspace_splits");
  expect(ws.o_accum_bytes == size_t(13) * 32 * kHeadDimV * 4, "o_accum bytes");
  expect(ws.lse_accum_bytes == size_t(13) * 32 * 4, "lse_accum bytes");
  // The sizes make a DecodeParams that validate() accepts.
  DecodeParams p = valid_params();
  st = flash_mla::get_split_workspace_size(p.batch, p.seqlen_q, p.num_heads_q, p.num_sm_parts, &ws);
  p.max_splits = ws.max_splits;
  expect(st.ok() && flash_mla::validate(p).ok(), "sized workspace validates");
  st = flash_mla::get_split_workspace_size(0, 1, 1, 1, &ws);
  expect(st.ok() && ws.max_splits == 1 && ws.o_accum_bytes == kHeadDimV * 4, "batch 0 workspace");

  expect_error(flash_mla::get_split_workspace_size(-1, 1, 16, 4, &ws), "batch", "workspace batch < 0");
  expect_error(flash_mla::get_split_workspace_size(2, 0, 16, 4, &ws), "seqlen_q", "workspace s_q 0");
  expect_error(flash_mla::get_split_workspace_size(2, 1, 0, 4, &ws), "num_heads_q", "workspace h_q 0");
  expect_error(flash_mla::get_split_workspace_size(2, 1, 16, 0, &ws), "num_sm_parts", "workspace parts 0");
  expect_error(flash_mla::get_split_workspace_size(2, 1, 16, 65536, &ws), "num_sm_parts", "workspace parts big");
  expect_error(flash_mla::get_split_workspace_size(2, 1, 16, 4, nullptr), "null", "workspace null out");

  int parts = 0;
  expect_error(flash_mla::get_num_sm_parts(0, 1, 16, 1, nullptr), "null", "get_num_sm_parts null out");
  expect_error(flash_mla::get_num_sm_parts(0, 0, 16, 1, &parts), "seqlen_q", "get_num_sm_parts s_q 0");
  expect_error(flash_mla::get_num_sm_parts(0, 1, 16, 3, &parts), "multiple", "get_num_sm_parts h_q % h_kv");
  expect(flash_mla::num_sm_parts(132, 16, 1) >= 1 && flash_mla::num_sm_parts(0, 0, 0) >= 1,
         "num_sm_parts is always >= 1");
}

/// A SparseDecodeParams that validate_sparse() accepts (V3.2 format, b 3, s_q 2, h_q 16, topk 64).
flash_mla::SparseDecodeParams valid_sparse_params() {
  flash_mla::SparseDecodeParams p;
  p.format = flash_mla::SparseKvFormat::kV32FP8;
  p.head_dim = 576;
  p.batch = 3;
  p.seqlen_q = 2;
  p.num_heads_q = 16;
  p.softmax_scale = 1.f / 24.f;
  p.q = fake_ptr();
  p.q_seq_stride = 16 * 576;
  p.q_head_stride = 576;
  p.cache.data = fake_ptr();
  p.cache.num_blocks = 10;
  p.cache.page_size = 61;
  p.cache.page_stride = 61 * 656;
  p.cache.token_stride = 656;
  p.cache.indices = static_cast<const int32_t*>(fake_ptr());
  p.cache.indices_batch_stride = 2 * 64;
  p.cache.indices_seq_stride = 64;
  p.cache.topk = 64;
  p.plan_seqlens = static_cast<const int32_t*>(fake_ptr());
  p.tile_scheduler_metadata = static_cast<const int32_t*>(fake_ptr());
  p.num_sm_parts = 5;
  p.num_splits = static_cast<const int32_t*>(fake_ptr());
  p.out = fake_ptr();
  p.lse = static_cast<float*>(fake_ptr());
  p.o_accum = static_cast<float*>(fake_ptr());
  p.lse_accum = static_cast<float*>(fake_ptr());
  p.max_splits = 3 * 2 + 5;
  return p;
}

/// Token-sparse decode: validate_sparse() (and so mla_decode_sparse()) accepts each format with
/// its head dim and refuses what the kernel cannot take, naming it; mla_decode() refuses a sink.
void check_sparse_params() {
  using flash_mla::SparseDecodeParams;
  using flash_mla::SparseKvFormat;
  expect(flash_mla::validate_sparse(valid_sparse_params()).ok(),
         "valid sparse params pass: " + flash_mla::validate_sparse(valid_sparse_params()).message);
  const auto with = [](std::function<void(SparseDecodeParams&)> mutate) {
    SparseDecodeParams p = valid_sparse_params();
    mutate(p);
    return p;
  };
  const SparseDecodeParams good[] = {
      with([](SparseDecodeParams& p) { p.format = SparseKvFormat::kModel1FP8; p.head_dim = 512; }),
      with([](SparseDecodeParams& p) { p.format = SparseKvFormat::kBF16; p.cache.token_stride = 1152; }),
      with([](SparseDecodeParams& p) { p.format = SparseKvFormat::kBF16; p.head_dim = 512; p.cache.token_stride = 1024; }),
      with([](SparseDecodeParams& p) { p.extra = p.cache; p.extra.page_size = 2; p.max_splits += 0; }),
      with([](SparseDecodeParams& p) { p.attn_sink = static_cast<const float*>(fake_ptr()); }),
      with([](SparseDecodeParams& p) { p.cache.topk = 0; }),
      with([](SparseDecodeParams& p) { p.batch = 0; p.q = nullptr; }),
      with([](SparseDecodeParams& p) { p.kernel = flash_mla::KernelChoice::kSm90; }),  // V3.2: the Hopper kernel
      with([](SparseDecodeParams& p) {  // bf16 of 576 channels: the Hopper kernel too
        p.format = SparseKvFormat::kBF16;
        p.cache.token_stride = 1152;
        p.kernel = flash_mla::KernelChoice::kSm90;
      }),
  };
  int i = 0;
  for (const SparseDecodeParams& p : good) {
    const Status st = flash_mla::validate_sparse(p);
    expect(st.ok(), "sparse good case " + std::to_string(i++) + ": " + st.message);
  }
  struct Bad {
    const char* needle;
    std::function<void(SparseDecodeParams&)> mutate;
  };
  const Bad bad[] = {
      {"head_dim", [](SparseDecodeParams& p) { p.head_dim = 512; }},
      {"head_dim", [](SparseDecodeParams& p) { p.format = SparseKvFormat::kModel1FP8; }},
      {"head_dim", [](SparseDecodeParams& p) { p.format = static_cast<SparseKvFormat>(9); }},
      {"sm90", [](SparseDecodeParams& p) {
         p.format = SparseKvFormat::kModel1FP8;
         p.head_dim = 512;
         p.kernel = flash_mla::KernelChoice::kSm90;
       }},
      {"sm90", [](SparseDecodeParams& p) {
         p.format = SparseKvFormat::kBF16;
         p.head_dim = 512;
         p.cache.token_stride = 1024;
         p.kernel = flash_mla::KernelChoice::kSm90;
       }},
      {"batch", [](SparseDecodeParams& p) { p.batch = -1; }},
      {"seqlen_q", [](SparseDecodeParams& p) { p.seqlen_q = 0; }},
      {"num_heads_q", [](SparseDecodeParams& p) { p.num_heads_q = 0; }},
      {"max_splits", [](SparseDecodeParams& p) { p.max_splits = 10; }},
      {"num_sm_parts", [](SparseDecodeParams& p) { p.num_sm_parts = 0; }},
      {"softmax_scale", [](SparseDecodeParams& p) { p.softmax_scale = 0.f; }},
      {"q is null", [](SparseDecodeParams& p) { p.q = nullptr; }},
      {"q must be 2-byte aligned", [](SparseDecodeParams& p) { p.q = fake_ptr(1); }},
      {"plan_seqlens is null", [](SparseDecodeParams& p) { p.plan_seqlens = nullptr; }},
      {"out must be 16-byte aligned", [](SparseDecodeParams& p) { p.out = fake_ptr(8); }},
      {"attn_sink must be 4-byte aligned", [](SparseDecodeParams& p) { p.attn_sink = static_cast<const float*>(fake_ptr(2)); }},
      {"cache.data is null", [](SparseDecodeParams& p) { p.cache.data = nullptr; }},
      {"cache.data must be 16-byte aligned", [](SparseDecodeParams& p) { p.cache.data = fake_ptr(8); }},
      {"cache.page_size", [](SparseDecodeParams& p) { p.cache.page_size = 0; }},
      {"cache.page_stride", [](SparseDecodeParams& p) { p.cache.page_stride = 61 * 656 + 8; }},
      {"cache.token_stride", [](SparseDecodeParams& p) { p.cache.token_stride = 584; }},
      {"cache.topk", [](SparseDecodeParams& p) { p.cache.topk = -1; }},
      {"cache.indices", [](SparseDecodeParams& p) { p.cache.indices = nullptr; }},
      {"cache.topk_length", [](SparseDecodeParams& p) { p.cache.topk_length = static_cast<const int32_t*>(fake_ptr(2)); }},
      {"extra.page_size", [](SparseDecodeParams& p) { p.extra = p.cache; p.extra.page_size = 0; }},
      {"extra.indices", [](SparseDecodeParams& p) { p.extra = p.cache; p.extra.indices = nullptr; }},
  };
  i = 0;
  for (const Bad& b : bad) {
    SparseDecodeParams p = valid_sparse_params();
    b.mutate(p);
    const std::string what = "sparse case " + std::to_string(i++) + " (" + b.needle + ")";
    expect_error(flash_mla::validate_sparse(p), b.needle, what);
    expect_error(flash_mla::mla_decode_sparse(p), b.needle, "mla_decode_sparse, " + what);
  }
  // The 512-dim format's token stride is fixed by the format: not checked.
  SparseDecodeParams m1 = with([](SparseDecodeParams& p) { p.format = SparseKvFormat::kModel1FP8; p.head_dim = 512; });
  m1.cache.token_stride = 584;
  expect(flash_mla::validate_sparse(m1).ok(), "512-dim format with token stride 584 passes");
  DecodeParams dense = valid_params();
  dense.attn_sink = static_cast<const float*>(fake_ptr());
  expect_error(flash_mla::validate(dense), "attn_sink", "mla_decode refuses attn_sink");
}

int run_checks() {
  check_decode_params();
  check_page_sizes();
  check_fp8_params();
  check_sparse_params();
  check_metadata_params();
  check_sizes();
  if (failures) {
    std::fprintf(stderr, "test_mla_decode checks: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_mla_decode checks: all passed\n");
  return 0;
}

// ------------------------------------------------------------------------------------------
// gpu: correctness against a host reference
// ------------------------------------------------------------------------------------------

#define CUDA_OK(call)                                                                            \
  do {                                                                                          \
    const cudaError_t err_ = (call);                                                            \
    if (err_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(size_t n) : count(n) { CUDA_OK(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T))); }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void upload(const std::vector<T>& host) {
    CUDA_OK(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(count);
    CUDA_OK(cudaMemcpy(host.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
};

float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
float to_float(__half x) { return __half2float(x); }
template <typename T> T from_float(float x);
template <> __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __half from_float<__half>(float x) { return __float2half(x); }

struct Case {
  DType dtype;
  int seqlen_q, num_heads_q, num_heads_kv;
  bool causal;
  std::vector<int32_t> seqlens;
  bool strided;  // padded q and k_cache strides (pages further apart than their size), q not 16-byte aligned
  int page = kDefaultPage;  // tokens per page of k_cache
};

std::string describe(const Case& c) {
  std::string s = std::string(c.dtype == DType::kBF16 ? "bf16" : "fp16") + " s_q=" + std::to_string(c.seqlen_q) +
                  " h_q=" + std::to_string(c.num_heads_q) + " h_kv=" + std::to_string(c.num_heads_kv) +
                  " causal=" + std::to_string(int(c.causal)) + (c.strided ? " strided" : "") +
                  (c.page != kDefaultPage ? " page=" + std::to_string(c.page) : std::string()) + " L=[";
  for (size_t i = 0; i < c.seqlens.size(); ++i) s += (i ? "," : "") + std::to_string(c.seqlens[i]);
  return s + "]";
}

/// Inputs of one case on the host, in the element type, with the layout the kernel reads.
template <typename T>
struct HostInputs {
  int batch = 0, max_pages = 0, num_blocks = 0, page = kDefaultPage;
  int64_t q_batch_stride = 0, q_seq_stride = 0, q_head_stride = 0, q_offset = 0;
  int64_t k_block_stride = 0, k_token_stride = 0, k_head_stride = 0;
  std::vector<T> q, k;
  std::vector<int32_t> block_table;

  const T* q_row(int i, int t, int h) const { return &q[q_offset + i * q_batch_stride + t * q_seq_stride + h * q_head_stride]; }
  const T* k_row(int i, int j, int kvh) const {
    const int block = block_table[size_t(i) * max_pages + j / page];
    return &k[block * k_block_stride + (j % page) * k_token_stride + kvh * k_head_stride];
  }
};

template <typename T>
HostInputs<T> make_inputs(const Case& c, std::mt19937& rng) {
  HostInputs<T> in;
  const int b = static_cast<int>(c.seqlens.size()), s_q = c.seqlen_q, h_q = c.num_heads_q, h_kv = c.num_heads_kv;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  in.batch = b;
  in.page = c.page;
  const int page = c.page;
  int needed = 0, widest = 0;
  for (int L : c.seqlens) {
    needed += (L + page - 1) / page;
    widest = std::max(widest, (L + page - 1) / page);
  }
  in.num_blocks = needed + 3;
  in.max_pages = widest + 2;  // junk columns past every request's pages

  // block_table: a random permutation of the pages, junk past each request's pages.
  std::vector<int32_t> pages(in.num_blocks);
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), rng);
  const int32_t junk[] = {-1, INT32_MIN, INT32_MAX, 1000000000, in.num_blocks};
  in.block_table.assign(size_t(b) * in.max_pages, 0);
  for (int i = 0, used = 0; i < b; ++i) {
    const int n = (c.seqlens[i] + page - 1) / page;
    for (int p = 0; p < in.max_pages; ++p) {
      in.block_table[size_t(i) * in.max_pages + p] = p < n ? pages[used++] : junk[rng() % 5];
    }
  }

  // Layouts: contiguous, or padded rows (NaN in the padding) with q 4 bytes past 16-byte alignment.
  const int pad = c.strided ? 64 : 0;
  in.q_head_stride = kHeadDim + pad;
  in.q_seq_stride = h_q * in.q_head_stride;
  in.q_batch_stride = s_q * in.q_seq_stride + pad;
  in.q_offset = c.strided ? 2 : 0;
  in.k_head_stride = kHeadDim;
  in.k_token_stride = h_kv * kHeadDim + pad;
  in.k_block_stride = page * in.k_token_stride + 2 * pad;

  std::normal_distribution<float> normal(0.f, 1.f);
  in.q.assign(size_t(in.q_offset + b * in.q_batch_stride), from_float<T>(nan));
  for (int i = 0; i < b; ++i)
    for (int t = 0; t < s_q; ++t)
      for (int h = 0; h < h_q; ++h) {
        T* row = &in.q[in.q_offset + i * in.q_batch_stride + t * in.q_seq_stride + h * in.q_head_stride];
        for (int d = 0; d < kHeadDim; ++d) row[d] = from_float<T>(normal(rng));
      }
  // Every cache slot that is not one of a request's first L tokens is NaN.
  in.k.assign(size_t(in.num_blocks) * in.k_block_stride, from_float<T>(nan));
  for (int i = 0; i < b; ++i)
    for (int j = 0; j < c.seqlens[i]; ++j)
      for (int kvh = 0; kvh < h_kv; ++kvh) {
        T* row = const_cast<T*>(in.k_row(i, j, kvh));
        for (int d = 0; d < kHeadDim; ++d) row[d] = from_float<T>(normal(rng));
      }
  return in;
}

struct Reference {
  std::vector<float> out;  // [b, s_q, h_q, 512]
  std::vector<float> lse;  // [b, h_q, s_q]; +inf: no visible key
};

template <typename T>
Reference reference(const Case& c, const HostInputs<T>& in, float scale) {
  const int b = in.batch, s_q = c.seqlen_q, h_q = c.num_heads_q, h_kv = c.num_heads_kv;
  Reference ref;
  ref.out.assign(size_t(b) * s_q * h_q * kHeadDimV, 0.f);
  ref.lse.assign(size_t(b) * h_q * s_q, INFINITY);
  std::vector<float> qf(kHeadDim), scores;
  for (int i = 0; i < b; ++i) {
    const int L = c.seqlens[i];
    for (int t = 0; t < s_q; ++t) {
      const int limit = c.causal && s_q > 1 ? L - s_q + t : L - 1;
      if (limit < 0) continue;
      for (int h = 0; h < h_q; ++h) {
        const int kvh = h / (h_q / h_kv);
        const T* q = in.q_row(i, t, h);
        for (int d = 0; d < kHeadDim; ++d) qf[d] = to_float(q[d]);
        scores.assign(limit + 1, 0.f);
        float smax = -INFINITY;
        for (int j = 0; j <= limit; ++j) {
          const T* k = in.k_row(i, j, kvh);
          float dot = 0.f;
          for (int d = 0; d < kHeadDim; ++d) dot += qf[d] * to_float(k[d]);
          scores[j] = dot * scale;
          smax = std::max(smax, scores[j]);
        }
        float* o = &ref.out[((size_t(i) * s_q + t) * h_q + h) * kHeadDimV];
        double sum = 0;
        for (int j = 0; j <= limit; ++j) {
          const float w = std::exp(scores[j] - smax);
          sum += w;
          const T* k = in.k_row(i, j, kvh);
          for (int d = 0; d < kHeadDimV; ++d) o[d] += w * to_float(k[d]);
        }
        for (int d = 0; d < kHeadDimV; ++d) o[d] = float(o[d] / sum);
        ref.lse[(size_t(i) * h_q + h) * s_q + t] = smax + float(std::log(sum));
      }
    }
  }
  return ref;
}

/// Compares against the reference like tests/python/conftest.py: per row relative L2 error
/// and per-element error relative to the row's max; lse absolute error; empty rows exact.
template <typename T>
bool compare(const Case& c, const std::vector<T>& out, const std::vector<float>& lse, const Reference& ref,
             const std::string& what) {
  const bool bf16 = c.dtype == DType::kBF16;
  const double rel_tol = bf16 ? 1e-2 : 3e-3, row_max_tol = bf16 ? 2e-2 : 6e-3, lse_tol = 2e-3;
  const int b = static_cast<int>(c.seqlens.size()), s_q = c.seqlen_q, h_q = c.num_heads_q;
  int bad = 0;
  double worst_rel = 0, worst_lse = 0;
  for (int i = 0; i < b; ++i)
    for (int t = 0; t < s_q; ++t)
      for (int h = 0; h < h_q; ++h) {
        const size_t orow = ((size_t(i) * s_q + t) * h_q + h) * kHeadDimV, li = (size_t(i) * h_q + h) * s_q + t;
        const bool empty = std::isinf(ref.lse[li]);
        double err2 = 0, ref2 = 0, ref_max = 0, err_max = 0;
        bool finite = true, zero = true;
        for (int d = 0; d < kHeadDimV; ++d) {
          const double g = to_float(out[orow + d]), r = ref.out[orow + d];
          finite = finite && std::isfinite(g);
          zero = zero && g == 0.0;
          err2 += (g - r) * (g - r);
          ref2 += r * r;
          ref_max = std::max(ref_max, std::fabs(r));
          err_max = std::max(err_max, std::fabs(g - r));
        }
        std::string problem;
        if (!finite) {
          problem = "non-finite out";
        } else if (empty) {
          if (!zero || lse[li] != INFINITY) problem = "row with no visible key: expected out = 0, lse = +inf";
        } else {
          const double rel = std::sqrt(err2 / std::max(ref2, 1e-30)), lse_err = std::fabs(double(lse[li]) - ref.lse[li]);
          worst_rel = std::max(worst_rel, rel);
          worst_lse = std::max(worst_lse, std::isfinite(lse_err) ? lse_err : 1e30);
          if (!(rel <= rel_tol)) problem = "relative error " + std::to_string(rel);
          else if (!(err_max <= row_max_tol * ref_max)) problem = "element error " + std::to_string(err_max);
          else if (!(lse_err <= lse_tol)) problem = "lse error " + std::to_string(lse_err);
        }
        if (!problem.empty() && bad++ < 5) {
          std::fprintf(stderr, "  %s: request %d token %d head %d (L = %d): %s (lse %g, reference %g)\n", what.c_str(),
                       i, t, h, c.seqlens[i], problem.c_str(), lse[li], ref.lse[li]);
        }
      }
  std::printf("  %-4s %-60s max row rel err %.2e, max lse err %.2e\n", bad ? "FAIL" : "ok", what.c_str(), worst_rel,
              worst_lse);
  return bad == 0;
}

/// Every kernel choice, kAuto first; those the device or the build lacks are reported n/a.
std::vector<KernelChoice> kernel_choices() {
  return {KernelChoice::kAuto, KernelChoice::kSm80Large, KernelChoice::kSm80Small, KernelChoice::kSm90};
}

template <typename T>
bool run_case(const Case& c, int device, std::mt19937& rng) {
  const int b = static_cast<int>(c.seqlens.size()), s_q = c.seqlen_q, h_q = c.num_heads_q, h_kv = c.num_heads_kv;
  const float scale = 1.f / std::sqrt(float(kHeadDim));
  HostInputs<T> in = make_inputs<T>(c, rng);
  DeviceBuffer<T> d_q(in.q), d_k(in.k);
  DeviceBuffer<int32_t> d_table(in.block_table), d_seqlens(c.seqlens);

  int parts = 0;
  Status st = flash_mla::get_num_sm_parts(device, s_q, h_q, h_kv, &parts);
  if (!st.ok()) {
    expect(false, describe(c) + ": get_num_sm_parts: " + st.message);
    return false;
  }
  DeviceBuffer<int32_t> d_meta(size_t(parts) * kMetaInts), d_splits(b + 1);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  MetadataParams mp;
  mp.cache_seqlens = d_seqlens.ptr;
  mp.tile_scheduler_metadata = d_meta.ptr;
  mp.num_splits = d_splits.ptr;
  mp.batch = b;
  mp.num_sm_parts = parts;
  mp.stream = stream;
  st = flash_mla::get_mla_metadata(mp);
  expect(st.ok(), describe(c) + ": get_mla_metadata: " + st.message);

  flash_mla::SplitWorkspaceSize ws;
  st = flash_mla::get_split_workspace_size(b, s_q, h_q, parts, &ws);
  expect(st.ok(), describe(c) + ": get_split_workspace_size: " + st.message);
  DeviceBuffer<T> d_out(size_t(b) * s_q * h_q * kHeadDimV);
  DeviceBuffer<float> d_lse(size_t(b) * h_q * s_q);
  DeviceBuffer<float> d_o_accum(ws.o_accum_bytes / sizeof(float)), d_lse_accum(ws.lse_accum_bytes / sizeof(float));

  DecodeParams p;
  p.dtype = c.dtype;
  p.batch = b;
  p.seqlen_q = s_q;
  p.num_heads_q = h_q;
  p.num_heads_kv = h_kv;
  p.num_blocks = in.num_blocks;
  p.max_blocks_per_seq = in.max_pages;
  p.page_size = c.page;
  p.softmax_scale = scale;
  p.causal = c.causal;
  p.q = d_q.ptr + in.q_offset;
  p.q_batch_stride = in.q_batch_stride;
  p.q_seq_stride = in.q_seq_stride;
  p.q_head_stride = in.q_head_stride;
  p.k_cache = d_k.ptr;
  p.k_block_stride = in.k_block_stride;
  p.k_token_stride = in.k_token_stride;
  p.k_head_stride = in.k_head_stride;
  p.block_table = d_table.ptr;
  p.block_table_stride = in.max_pages;
  p.cache_seqlens = d_seqlens.ptr;
  p.tile_scheduler_metadata = d_meta.ptr;
  p.num_sm_parts = parts;
  p.num_splits = d_splits.ptr;
  p.out = d_out.ptr;
  p.lse = d_lse.ptr;
  p.o_accum = d_o_accum.ptr;
  p.lse_accum = d_lse_accum.ptr;
  p.max_splits = ws.max_splits;
  p.stream = stream;

  bool ok = true;
  Reference ref = reference(c, in, scale);
  for (KernelChoice kernel : kernel_choices()) {
    KernelChoice resolved;
    const char* name = flash_mla::kernel_name(kernel);
    if (!flash_mla::resolve_kernel(kernel, device, &resolved).ok()) {
      std::printf("  n/a  %s kernel=%s (not available on this device or build)\n", describe(c).c_str(), name);
      continue;
    }
    // Poison the outputs so that a row the kernels forget to write is caught.
    CUDA_OK(cudaMemsetAsync(d_out.ptr, 0x7f, d_out.count * sizeof(T), stream));
    CUDA_OK(cudaMemsetAsync(d_lse.ptr, 0x7f, d_lse.count * sizeof(float), stream));
    p.kernel = kernel;
    st = flash_mla::mla_decode(p);
    if (!st.ok()) {
      expect(false, describe(c) + " kernel=" + name + ": mla_decode: " + st.message);
      ok = false;
      continue;
    }
    CUDA_OK(cudaStreamSynchronize(stream));
    const std::string what = describe(c) + " " + (kernel == KernelChoice::kAuto ? std::string("auto=") : "") +
                             flash_mla::kernel_name(resolved);
    ok = compare(c, d_out.download(), d_lse.download(), ref, what) && ok;
  }

  // Metadata reuse (the next layer of the same step): new q, same schedule, auto kernel.
  for (auto& x : in.q)
    if (!std::isnan(to_float(x))) x = from_float<T>(-to_float(x) * 0.5f);
  d_q.upload(in.q);
  ref = reference(c, in, scale);
  p.kernel = KernelChoice::kAuto;
  st = flash_mla::mla_decode(p);
  expect(st.ok(), describe(c) + ": second layer: " + st.message);
  CUDA_OK(cudaStreamSynchronize(stream));
  ok = compare(c, d_out.download(), d_lse.download(), ref, describe(c) + " layer 2") && ok;
  CUDA_OK(cudaStreamDestroy(stream));
  return ok;
}

int run_gpu() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("test_mla_decode gpu: no CUDA device, skipped\n");
    return kExitSkip;
  }
  int device = 0;
  CUDA_OK(cudaGetDevice(&device));
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, device));
  if (prop.major < 8) {
    std::printf("test_mla_decode gpu: %s is sm_%d%d (needs sm_80+), skipped\n", prop.name, prop.major, prop.minor);
    return kExitSkip;
  }
  std::printf("test_mla_decode gpu on %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount);

  std::mt19937 rng(20240607);
  std::vector<Case> cases;
  for (DType dtype : {DType::kBF16, DType::kFP16})
    for (int h_q : {16, 128})
      for (int s_q : {1, 2})
        for (bool causal : {false, true}) {
          // Lengths: empty, shorter than s_q, one page exactly, and two not multiples of 64.
          // Heavier shapes (h_q = 128) get shorter sequences to keep the host reference quick.
          const int long_len = h_q == 128 ? 700 + int(rng() % 300) : 1500 + int(rng() % 1500);
          std::vector<int32_t> lens = {0, 1, 64, 65 + int(rng() % 400), long_len};
          if (long_len % 64 == 0) lens.back() += 1;
          std::shuffle(lens.begin(), lens.end(), rng);
          cases.push_back({dtype, s_q, h_q, 1, causal, lens, (cases.size() % 2) == 1});
        }
  cases.push_back({DType::kBF16, 2, 32, 2, true, {129, 1000, 2}, true});  // two KV heads
  // Other page sizes: lengths 0, 1, page - 1, page + 1, a few pages plus an odd remainder, one
  // request of ~1,100-1,500 tokens (up to 94 pages of 16); bf16 h_q 128 s_q 1 (padded strides)
  // and fp16 h_q 16 s_q 2 causal (contiguous) per page size.
  for (int page : kPageSizes) {
    if (page == kDefaultPage) continue;
    for (int variant = 0; variant < 2; ++variant) {
      const int long_len = (variant == 0 ? 1100 : 1400) + 2 * int(rng() % 50) + 1;  // odd: no page multiple
      std::vector<int32_t> lens = {0, 1, page - 1, page + 1, 3 * page + 7, long_len};
      if (variant == 1) lens.push_back(64);  // a tile boundary inside a page of 128 / 256
      std::shuffle(lens.begin(), lens.end(), rng);
      Case c = variant == 0 ? Case{DType::kBF16, 1, 128, 1, false, lens, true}
                            : Case{DType::kFP16, 2, 16, 1, true, lens, false};
      c.page = page;
      cases.push_back(c);
    }
  }

  bool ok = true;
  for (const Case& c : cases) {
    ok = (c.dtype == DType::kBF16 ? run_case<__nv_bfloat16>(c, device, rng) : run_case<__half>(c, device, rng)) && ok;
  }
  const cudaError_t err = cudaDeviceSynchronize();
  expect(err == cudaSuccess, std::string("device error: ") + cudaGetErrorString(err));
  ok = ok && failures == 0;
  std::printf("test_mla_decode gpu: %s (%zu cases)\n", ok ? "all passed" : "FAILED", cases.size());
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "checks") return run_checks();
  if (mode == "gpu") return run_gpu();
  std::fprintf(stderr, "usage: %s checks|gpu\n", argv[0]);
  return 2;
}
