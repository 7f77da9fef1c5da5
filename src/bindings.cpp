// nanobind module flash_mla._C: DLPack arrays in, one round of checks, params structs out.
//
// Every check runs before any launch, shapes and dtypes before devices (so argument errors
// are testable with CPU tensors). Errors name the argument: TypeError for a wrong type or
// dtype, ValueError for a wrong shape, stride, value or device.
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <flash_mla/params.hpp>
#include <flash_mla/scheduler/plan.hpp>

#include "ext_api.hpp"

namespace nb = nanobind;
using Array = nb::ndarray<>;
using ReadOnlyArray = nb::ndarray<nb::ro>;
using flash_mla::kHeadDim;
using flash_mla::kHeadDimV;
using flash_mla::kMetaInts;
using flash_mla::kPageSize;

namespace {

[[noreturn]] void type_error(const std::string& msg) { throw nb::type_error(msg.c_str()); }
[[noreturn]] void value_error(const std::string& msg) { throw nb::value_error(msg.c_str()); }

constexpr nb::dlpack::dtype kBF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};
constexpr nb::dlpack::dtype kFP16{static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 16, 1};
constexpr nb::dlpack::dtype kFP32{static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 32, 1};
constexpr nb::dlpack::dtype kI32{static_cast<uint8_t>(nb::dlpack::dtype_code::Int), 32, 1};
constexpr nb::dlpack::dtype kI64{static_cast<uint8_t>(nb::dlpack::dtype_code::Int), 64, 1};

std::string dtype_name(nb::dlpack::dtype dt) {
  if (dt == kBF16) return "bfloat16";
  if (dt == kFP16) return "float16";
  if (dt == kFP32) return "float32";
  if (dt == kI32) return "int32";
  if (dt == kI64) return "int64";
  static const char* codes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  const std::string code = dt.code < 7 ? codes[dt.code] : "code" + std::to_string(dt.code);
  return code + std::to_string(dt.bits);
}

std::string shape_str(const Array& a) {
  std::string s = "(";
  for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

/// A named argument converted to a DLPack view.
struct Arg {
  const char* name;
  Array a;

  /// Inputs are imported read-only (producers that flag their buffers read-only, such as
  /// JAX, are accepted); `writable` arguments (outputs, workspace) must be writable.
  Arg(const char* n, nb::handle h, bool writable = false) : name(n) {
    ReadOnlyArray ro;
    if (writable) {
      if (nb::try_cast(h, a)) return;
      if (nb::try_cast(h, ro)) {
        type_error(prefix() + "the array is read-only; outputs and workspace must be writable buffers "
                   "(JAX arrays are immutable: pass a CuPy or torch buffer and import the result into JAX "
                   "with jax.dlpack.from_dlpack)");
      }
    } else if (nb::try_cast(h, ro)) {
      a = Array(ro);
      return;
    }
    std::string hint;
    if (nb::hasattr(h, "requires_grad") && nb::getattr(h, "requires_grad").equal(nb::bool_(true))) {
      hint = " (it requires grad: pass .detach())";
    }
    type_error(prefix() + "expected a tensor or array supporting DLPack, got " + nb::type_name(h.type()).c_str() + hint);
  }
  std::string prefix() const { return std::string(name) + ": "; }
  void dtype_in(std::initializer_list<nb::dlpack::dtype> allowed, const char* expected) const {
    for (auto dt : allowed)
      if (a.dtype() == dt) return;
    type_error(prefix() + "expected dtype " + expected + ", got " + dtype_name(a.dtype()));
  }
  void ndim(size_t n, const char* layout) const {
    if (a.ndim() != n) {
      value_error(prefix() + "expected " + std::to_string(n) + " dims " + layout + ", got shape " + shape_str(a));
    }
  }
  void dim(size_t i, int64_t expected, const std::string& what) const {
    if (static_cast<int64_t>(a.shape(i)) != expected) {
      value_error(prefix() + what + " (dim " + std::to_string(i) + ") must be " + std::to_string(expected) +
                  ", got shape " + shape_str(a));
    }
  }
  void last_dim_contiguous() const {
    if (a.ndim() > 0 && a.shape(a.ndim() - 1) > 1 && a.stride(a.ndim() - 1) != 1) {
      value_error(prefix() + "the last dim must be contiguous (stride 1), got stride " +
                  std::to_string(a.stride(a.ndim() - 1)));
    }
  }
  void contiguous() const {
    int64_t expected = 1;
    for (size_t i = a.ndim(); i-- > 0;) {
      if (a.shape(i) > 1 && a.stride(i) != expected) value_error(prefix() + "must be contiguous");
      expected *= static_cast<int64_t>(a.shape(i));
    }
  }
  int64_t stride(size_t i) const { return a.shape(i) > 1 ? a.stride(i) : 0; }
  int size(size_t i) const {
    if (a.shape(i) > static_cast<size_t>(INT32_MAX)) {
      value_error(prefix() + "dim " + std::to_string(i) + " is too large, got shape " + shape_str(a));
    }
    return static_cast<int>(a.shape(i));
  }
  bool aligned(uintptr_t bytes) const { return reinterpret_cast<uintptr_t>(a.data()) % bytes == 0; }
};

/// Device checks, after every shape and dtype check: all on one CUDA device. Returns its id.
int common_cuda_device(std::initializer_list<const Arg*> args) {
  int device = -1;
  const char* first = nullptr;
  for (const Arg* arg : args) {
    if (arg->a.device_type() != nb::device::cuda::value) {
      const int type = arg->a.device_type();
      const std::string where = type == nb::device::cpu::value ? "the CPU" : "device type " + std::to_string(type);
      value_error(arg->prefix() + "must be a CUDA tensor, got one on " + where);
    }
    if (device < 0) {
      device = arg->a.device_id();
      first = arg->name;
    } else if (arg->a.device_id() != device) {
      value_error(arg->prefix() + "is on cuda:" + std::to_string(arg->a.device_id()) + " but " + first +
                  " is on cuda:" + std::to_string(device));
    }
  }
  return device;
}

int positive_int(int64_t v, const char* name) {
  if (v <= 0 || v > (1 << 30)) value_error(std::string(name) + ": must be a positive int, got " + std::to_string(v));
  return static_cast<int>(v);
}

void check_seqlens(const Arg& seqlens) {
  seqlens.dtype_in({kI32}, "int32");
  seqlens.ndim(1, "(batch,)");
  seqlens.contiguous();
}

void check_metadata_out(const Arg& meta, const Arg& splits, int batch) {
  meta.dtype_in({kI32}, "int32");
  meta.ndim(2, "(num_sm_parts, 8)");
  meta.dim(1, kMetaInts, "ints per SM part");
  if (meta.size(0) < 1 || meta.size(0) > 65535) value_error(meta.prefix() + "num_sm_parts (dim 0) must be in [1, 65535]");
  meta.contiguous();
  splits.dtype_in({kI32}, "int32");
  splits.ndim(1, "(batch + 1,)");
  splits.dim(0, batch + 1, "batch + 1");
  splits.contiguous();
}

/// Everything flash_mla_with_kvcache needs from its inputs, checked.
struct DecodeInputs {
  Arg q, k_cache, block_table, cache_seqlens, meta, splits;
  flash_mla::DecodeParams params;
  int device = -1;

  /// check_device = false leaves the device check (and `device`) to the caller, which checks
  /// the outputs' shapes first and then the devices of all arrays together.
  DecodeInputs(nb::handle q_, nb::handle k_, nb::handle bt_, nb::handle sl_, int64_t head_dim_v, nb::handle meta_,
               nb::handle splits_, double softmax_scale, bool check_device = true)
      : q("q", q_), k_cache("k_cache", k_), block_table("block_table", bt_), cache_seqlens("cache_seqlens", sl_),
        meta("tile_scheduler_metadata", meta_), splits("num_splits", splits_) {
    q.dtype_in({kBF16, kFP16}, "bfloat16 or float16");
    q.ndim(4, "(batch, s_q, h_q, 576)");
    q.dim(3, kHeadDim, "head dim d");
    q.last_dim_contiguous();
    const int batch = q.size(0), seqlen_q = q.size(1), heads_q = q.size(2);
    if (seqlen_q < 1) value_error("q: s_q (dim 1) must be >= 1, got shape " + shape_str(q.a));
    if (heads_q < 1) value_error("q: h_q (dim 2) must be >= 1, got shape " + shape_str(q.a));

    if (k_cache.a.dtype() != q.a.dtype()) {
      type_error("k_cache: dtype must match q (" + dtype_name(q.a.dtype()) + "), got " + dtype_name(k_cache.a.dtype()));
    }
    k_cache.ndim(4, "(num_blocks, 64, h_kv, 576)");
    k_cache.dim(1, kPageSize, "page_block_size");
    k_cache.dim(3, kHeadDim, "head dim d");
    k_cache.last_dim_contiguous();
    const int heads_kv = k_cache.size(2);
    if (heads_kv < 1) value_error("k_cache: h_kv (dim 2) must be >= 1");
    if (heads_q % heads_kv != 0) {
      value_error("k_cache: h_q % h_kv must be 0, got h_q = " + std::to_string(heads_q) +
                  ", h_kv = " + std::to_string(heads_kv));
    }
    if (head_dim_v != kHeadDimV) value_error("head_dim_v: must be 512, got " + std::to_string(head_dim_v));

    block_table.dtype_in({kI32}, "int32");
    block_table.ndim(2, "(batch, max_blocks_per_seq)");
    block_table.dim(0, batch, "batch");
    block_table.last_dim_contiguous();
    check_seqlens(cache_seqlens);
    cache_seqlens.dim(0, batch, "batch");
    check_metadata_out(meta, splits, batch);
    if (!(softmax_scale > 0.0) || !std::isfinite(softmax_scale)) {
      value_error("softmax_scale: must be finite and > 0, got " + std::to_string(softmax_scale));
    }

    if (check_device) device = common_cuda_device({&q, &k_cache, &block_table, &cache_seqlens, &meta, &splits});

    auto& p = params;
    p.dtype = q.a.dtype() == kBF16 ? flash_mla::DType::kBF16 : flash_mla::DType::kFP16;
    p.batch = batch;
    p.seqlen_q = seqlen_q;
    p.num_heads_q = heads_q;
    p.num_heads_kv = heads_kv;
    p.num_blocks = k_cache.size(0);
    p.max_blocks_per_seq = block_table.size(1);
    p.softmax_scale = static_cast<float>(softmax_scale);
    p.q = q.a.data();
    p.q_batch_stride = q.stride(0);
    p.q_seq_stride = q.stride(1);
    p.q_head_stride = q.stride(2);
    p.k_cache = k_cache.a.data();
    p.k_block_stride = k_cache.stride(0);
    p.k_token_stride = k_cache.stride(1);
    p.k_head_stride = k_cache.stride(2);
    p.block_table = static_cast<const int32_t*>(block_table.a.data());
    p.block_table_stride = block_table.stride(0);
    p.cache_seqlens = static_cast<const int32_t*>(cache_seqlens.a.data());
    p.tile_scheduler_metadata = static_cast<const int32_t*>(meta.a.data());
    p.num_sm_parts = meta.size(0);
    p.num_splits = static_cast<const int32_t*>(splits.a.data());
    p.max_splits = workspace_splits();
  }

  int workspace_splits() const { return flash_mla::max_splits_of(params.batch, params.num_sm_parts); }
};

/// Sets the current CUDA device for the lifetime of the guard.
struct DeviceGuard {
  int previous = -1;
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous) != cudaSuccess) value_error("no CUDA device available");
    if (previous != device && cudaSetDevice(device) != cudaSuccess) value_error("cannot select cuda:" + std::to_string(device));
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous) cudaSetDevice(previous);
  }
};

void raise_if_failed(const flash_mla::Status& st) {
  if (!st.ok()) throw std::runtime_error("flash_mla: " + st.message);
}

flash_mla::KernelChoice kernel_choice(int kernel) {
  if (kernel < 0 || kernel > static_cast<int>(flash_mla::KernelChoice::kSm90)) {
    value_error("kernel: unknown kernel id " + std::to_string(kernel));
  }
  return static_cast<flash_mla::KernelChoice>(kernel);
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "flash-mla compiled module: argument checks, scheduler and decode launches";

  m.def("num_sm_parts", [](int64_t num_sms, int64_t rows_per_kv_head, int64_t heads_kv) {
    return flash_mla::num_sm_parts_for(positive_int(num_sms, "num_sms"),
                                       positive_int(rows_per_kv_head, "num_heads_per_head_k"),
                                       positive_int(heads_kv, "num_heads_k"));
  }, nb::arg("num_sms"), nb::arg("rows_per_kv_head"), nb::arg("num_heads_kv"));

  m.def("check_metadata_args", [](nb::handle seqlens_h, int64_t rows_per_kv_head, int64_t heads_kv) {
    Arg seqlens("cache_seqlens", seqlens_h);
    check_seqlens(seqlens);
    positive_int(rows_per_kv_head, "num_heads_per_head_k");
    positive_int(heads_kv, "num_heads_k");
    common_cuda_device({&seqlens});
  }, nb::arg("cache_seqlens"), nb::arg("num_heads_per_head_k"), nb::arg("num_heads_k"));

  m.def("get_mla_metadata", [](nb::handle seqlens_h, nb::handle meta_h, nb::handle splits_h, uintptr_t stream) {
    Arg seqlens("cache_seqlens", seqlens_h), meta("tile_scheduler_metadata", meta_h, true),
        splits("num_splits", splits_h, true);
    check_seqlens(seqlens);
    check_metadata_out(meta, splits, seqlens.size(0));
    const int device = common_cuda_device({&seqlens, &meta, &splits});
    flash_mla::MetadataParams p;
    p.cache_seqlens = static_cast<const int32_t*>(seqlens.a.data());
    p.tile_scheduler_metadata = static_cast<int32_t*>(meta.a.data());
    p.num_splits = static_cast<int32_t*>(splits.a.data());
    p.batch = seqlens.size(0);
    p.num_sm_parts = meta.size(0);
    p.stream = reinterpret_cast<cudaStream_t>(stream);
    DeviceGuard guard(device);
    raise_if_failed(flash_mla_ext::run_metadata(p));
  }, nb::arg("cache_seqlens"), nb::arg("tile_scheduler_metadata"), nb::arg("num_splits"), nb::arg("stream"));

  m.def("check_decode_inputs", [](nb::handle q, nb::handle k, nb::handle bt, nb::handle sl, int64_t head_dim_v,
                                  nb::handle meta, nb::handle splits, double softmax_scale, bool check_device) {
    DecodeInputs in(q, k, bt, sl, head_dim_v, meta, splits, softmax_scale, check_device);
    const auto& p = in.params;
    return std::make_tuple(p.batch, p.seqlen_q, p.num_heads_q, p.num_heads_kv, in.workspace_splits());
  }, nb::arg("q"), nb::arg("k_cache"), nb::arg("block_table"), nb::arg("cache_seqlens"), nb::arg("head_dim_v"),
     nb::arg("tile_scheduler_metadata"), nb::arg("num_splits"), nb::arg("softmax_scale"),
     nb::arg("check_device") = true,
     "Checks the inputs of a decode call; returns (batch, s_q, h_q, h_kv, workspace_splits).\n"
     "check_device=False skips the device check (mla_decode checks devices after the outputs).");

  m.def("mla_decode", [](nb::handle q, nb::handle k, nb::handle bt, nb::handle sl, int64_t head_dim_v, nb::handle meta,
                         nb::handle splits, nb::handle out_h, nb::handle lse_h, nb::handle o_accum_h,
                         nb::handle lse_accum_h, double softmax_scale, bool causal, int kernel, uintptr_t stream) {
    DecodeInputs in(q, k, bt, sl, head_dim_v, meta, splits, softmax_scale, /*check_device=*/false);
    auto& p = in.params;
    Arg out("out", out_h, true), lse("lse", lse_h, true), o_accum("o_accum", o_accum_h, true),
        lse_accum("lse_accum", lse_accum_h, true);
    const int64_t rows = static_cast<int64_t>(p.seqlen_q) * p.num_heads_q;
    if (out.a.dtype() != in.q.a.dtype()) type_error("out: dtype must match q");
    out.ndim(4, "(batch, s_q, h_q, 512)");
    out.dim(0, p.batch, "batch");
    out.dim(1, p.seqlen_q, "s_q");
    out.dim(2, p.num_heads_q, "h_q");
    out.dim(3, kHeadDimV, "head_dim_v");
    out.contiguous();
    lse.dtype_in({kFP32}, "float32");
    lse.ndim(3, "(batch, h_q, s_q)");
    lse.dim(0, p.batch, "batch");
    lse.dim(1, p.num_heads_q, "h_q");
    lse.dim(2, p.seqlen_q, "s_q");
    lse.contiguous();
    o_accum.dtype_in({kFP32}, "float32");
    o_accum.ndim(3, "(splits, s_q * h_q, 512)");
    if (o_accum.size(0) < in.workspace_splits()) {
      value_error("o_accum: needs at least " + std::to_string(in.workspace_splits()) + " splits (dim 0)");
    }
    o_accum.dim(1, rows, "s_q * h_q");
    o_accum.dim(2, kHeadDimV, "head_dim_v");
    o_accum.contiguous();
    lse_accum.dtype_in({kFP32}, "float32");
    lse_accum.ndim(2, "(splits, s_q * h_q)");
    lse_accum.dim(0, o_accum.size(0), "splits of o_accum");
    lse_accum.dim(1, rows, "s_q * h_q");
    lse_accum.contiguous();
    if (!out.aligned(16)) value_error("out: must be 16-byte aligned");
    if (!o_accum.aligned(16)) value_error("o_accum: must be 16-byte aligned");
    if (!lse.aligned(4) || !lse_accum.aligned(4)) value_error("lse, lse_accum: must be 4-byte aligned");
    const int device = common_cuda_device({&in.q, &in.k_cache, &in.block_table, &in.cache_seqlens, &in.meta,
                                           &in.splits, &out, &lse, &o_accum, &lse_accum});
    p.out = out.a.data();
    p.lse = static_cast<float*>(lse.a.data());
    p.o_accum = static_cast<float*>(o_accum.a.data());
    p.lse_accum = static_cast<float*>(lse_accum.a.data());
    p.max_splits = o_accum.size(0);
    p.causal = causal;
    p.kernel = kernel_choice(kernel);
    p.stream = reinterpret_cast<cudaStream_t>(stream);
    DeviceGuard guard(device);
    raise_if_failed(flash_mla_ext::run_decode(p));
  }, nb::arg("q"), nb::arg("k_cache"), nb::arg("block_table"), nb::arg("cache_seqlens"), nb::arg("head_dim_v"),
     nb::arg("tile_scheduler_metadata"), nb::arg("num_splits"), nb::arg("out"), nb::arg("lse"), nb::arg("o_accum"),
     nb::arg("lse_accum"), nb::arg("softmax_scale"), nb::arg("causal"), nb::arg("kernel"), nb::arg("stream"));

  m.def("host_plan", [](const std::vector<int32_t>& seqlens, int64_t num_sm_parts) {
    const flash_mla::HostPlan plan = flash_mla::host_plan(seqlens, positive_int(num_sm_parts, "num_sm_parts"));
    std::vector<std::vector<int32_t>> rows(plan.num_sm_parts);
    for (int i = 0; i < plan.num_sm_parts; ++i) rows[i].assign(plan.meta.begin() + i * kMetaInts, plan.meta.begin() + (i + 1) * kMetaInts);
    return std::make_tuple(rows, plan.num_splits);
  }, nb::arg("cache_seqlens"), nb::arg("num_sm_parts"), "The scheduler's plan computed on the host.");

  m.def("kernel_name", [](int device, int kernel) {
    std::string name;
    raise_if_failed(flash_mla_ext::kernel_name(device, kernel_choice(kernel), &name));
    return name;
  }, nb::arg("device"), nb::arg("kernel"));

  // ---- opt-in input validation and helpers of the framework-neutral API (flash_mla.ops) ----

  m.attr("INPUT_CHECK_WORDS") = flash_mla::kInputCheckWords;

  m.def("check_paged_inputs", [](nb::handle bt_h, nb::handle sl_h, int64_t num_blocks, nb::handle result_h,
                                 uintptr_t stream) {
    Arg block_table("block_table", bt_h), seqlens("cache_seqlens", sl_h), result("result", result_h, true);
    block_table.dtype_in({kI32}, "int32");
    block_table.ndim(2, "(batch, max_blocks_per_seq)");
    block_table.last_dim_contiguous();
    check_seqlens(seqlens);
    seqlens.dim(0, block_table.size(0), "batch (block_table rows)");
    if (num_blocks < 0 || num_blocks > INT32_MAX) {
      value_error("num_blocks: must be in [0, 2^31 - 1], got " + std::to_string(num_blocks));
    }
    result.dtype_in({kI64}, "int64");
    result.ndim(1, "(8,)");
    result.dim(0, flash_mla::kInputCheckWords, "length");
    result.contiguous();
    if (!result.aligned(8)) value_error("result: must be 8-byte aligned");
    const int device = common_cuda_device({&block_table, &seqlens, &result});
    flash_mla::InputCheckParams p;
    p.block_table = static_cast<const int32_t*>(block_table.a.data());
    p.block_table_stride = block_table.stride(0);
    p.cache_seqlens = static_cast<const int32_t*>(seqlens.a.data());
    p.batch = seqlens.size(0);
    p.max_blocks_per_seq = block_table.size(1);
    p.num_blocks = static_cast<int>(num_blocks);
    p.result = static_cast<int64_t*>(result.a.data());
    p.stream = reinterpret_cast<cudaStream_t>(stream);
    DeviceGuard guard(device);
    raise_if_failed(flash_mla_ext::run_input_check(p));
  }, nb::arg("block_table"), nb::arg("cache_seqlens"), nb::arg("num_blocks"), nb::arg("result"), nb::arg("stream"),
     "Launches the GPU check of the used block_table entries and cache_seqlens (see input_check.cuh);\n"
     "the verdict lands in result (int64[8]) on the stream.");

  m.def("workspace_splits", [](int64_t batch, int64_t num_sm_parts) {
    if (batch < 0 || batch > (1 << 30)) value_error("batch: must be in [0, 2^30], got " + std::to_string(batch));
    if (num_sm_parts < 1 || num_sm_parts > 65535) {
      value_error("num_sm_parts: must be in [1, 65535], got " + std::to_string(num_sm_parts));
    }
    return flash_mla::max_splits_of(static_cast<int>(batch), static_cast<int>(num_sm_parts));
  }, nb::arg("batch"), nb::arg("num_sm_parts"), "Splits (dim 0) the o_accum / lse_accum workspace needs.");

  m.def("device_sm_count", [](int device) {
    if (device < 0 && cudaGetDevice(&device) != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error("flash_mla: no CUDA device available");
    }
    int count = 0;
    const cudaError_t err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) {
      cudaGetLastError();
      value_error("device: cannot query cuda:" + std::to_string(device) + ": " + cudaGetErrorString(err));
    }
    return count;
  }, nb::arg("device") = -1, "Number of SMs of a CUDA device (-1: the current device).");
}
