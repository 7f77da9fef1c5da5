// nanobind module flash_mla._C: arrays in, one round of checks, params structs out.
//
// Two ways in, one set of checks:
// * DLPack arrays of any framework (flash_mla.ops; `mla_decode`, `get_mla_metadata`, ...);
// * torch tensors read directly (`torch_decode`, `torch_get_mla_metadata`, ...): shape, strides,
//   dtype, device and data pointer are read from the tensor's attributes, which costs a fraction
//   of a DLPack export. This is the eager path of flash_mla_with_kvcache; outputs are allocated
//   through a Python callable (torch.empty, graph-pool aware) once every check has passed.
//
// Every check runs before any launch, shapes and dtypes before devices (so argument errors
// are testable with CPU tensors). Errors name the argument: TypeError for a wrong type or
// dtype, ValueError for a wrong shape, stride, value or device.
#include <cmath>
#include <cstdint>
#include <optional>
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

namespace {

[[noreturn]] void type_error(const std::string& msg) { throw nb::type_error(msg.c_str()); }
[[noreturn]] void value_error(const std::string& msg) { throw nb::value_error(msg.c_str()); }

// ---------------------------------------------------------------------------------------------
// A checked view of one array argument, whatever framework it came from
// ---------------------------------------------------------------------------------------------

/// The element types the checks distinguish; kOther carries its name in View::other_dtype.
enum class DT : uint8_t { kBF16, kFP16, kFP32, kI32, kI64, kFP8, kOther };
constexpr int kKnownDTypes = static_cast<int>(DT::kOther);

const char* dt_name(DT dt) {
  switch (dt) {
    case DT::kBF16: return "bfloat16";
    case DT::kFP16: return "float16";
    case DT::kFP32: return "float32";
    case DT::kI32: return "int32";
    case DT::kI64: return "int64";
    case DT::kFP8: return "float8_e4m3fn";
    default: return "?";
  }
}

/// Dims kept per view (ranks above it are rejected by every rank check; messages elide them).
constexpr int kMaxDims = 8;

struct View {
  const char* name = "";
  void* data = nullptr;
  int ndim = 0;
  int64_t dims[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // elements
  DT dtype = DT::kOther;
  std::string other_dtype;  // name of a dtype outside DT
  bool cuda = false;
  int device_id = -1;
  std::string where;  // what the device is, for a non-CUDA array ("the CPU", ...)

  std::string prefix() const { return std::string(name) + ": "; }
  std::string dtype_str() const { return dtype == DT::kOther ? other_dtype : dt_name(dtype); }
  std::string shape_str() const {
    std::string s = "(";
    for (int i = 0; i < ndim && i < kMaxDims; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    if (ndim > kMaxDims) s += ", ...";
    return s + (ndim == 1 ? ",)" : ")");
  }
  void dtype_in(std::initializer_list<DT> allowed, const char* expected) const {
    for (DT dt : allowed)
      if (dtype == dt) return;
    type_error(prefix() + "expected dtype " + expected + ", got " + dtype_str());
  }
  void rank(int n, const char* layout) const {
    if (ndim != n) {
      value_error(prefix() + "expected " + std::to_string(n) + " dims " + layout + ", got shape " + shape_str());
    }
  }
  void dim(int i, int64_t expected, const std::string& what) const {
    if (dims[i] != expected) {
      value_error(prefix() + what + " (dim " + std::to_string(i) + ") must be " + std::to_string(expected) +
                  ", got shape " + shape_str());
    }
  }
  void last_dim_contiguous() const {
    if (ndim > 0 && ndim <= kMaxDims && dims[ndim - 1] > 1 && strides[ndim - 1] != 1) {
      value_error(prefix() + "the last dim must be contiguous (stride 1), got stride " +
                  std::to_string(strides[ndim - 1]));
    }
  }
  void contiguous() const {
    int64_t expected = 1;
    for (int i = ndim; i-- > 0;) {
      if (dims[i] > 1 && strides[i] != expected) value_error(prefix() + "must be contiguous");
      expected *= dims[i];
    }
  }
  /// Stride of dim i in elements; 0 for a dim of size <= 1 (its stride may be anything).
  int64_t stride(int i) const { return dims[i] > 1 ? strides[i] : 0; }
  int size(int i) const {
    if (dims[i] > static_cast<int64_t>(INT32_MAX)) {
      value_error(prefix() + "dim " + std::to_string(i) + " is too large, got shape " + shape_str());
    }
    return static_cast<int>(dims[i]);
  }
  bool aligned(uintptr_t bytes) const { return reinterpret_cast<uintptr_t>(data) % bytes == 0; }
};

/// Device checks, after every shape and dtype check: all on one CUDA device. Returns its id.
int common_cuda_device(std::initializer_list<const View*> views) {
  int device = -1;
  const char* first = nullptr;
  for (const View* v : views) {
    if (v == nullptr) continue;
    if (!v->cuda) value_error(v->prefix() + "must be a CUDA tensor, got one on " + v->where);
    if (device < 0) {
      device = v->device_id;
      first = v->name;
    } else if (v->device_id != device) {
      value_error(v->prefix() + "is on cuda:" + std::to_string(v->device_id) + " but " + first + " is on cuda:" +
                  std::to_string(device));
    }
  }
  return device;
}

// ---------------------------------------------------------------------------------------------
// DLPack arrays (flash_mla.ops, any framework)
// ---------------------------------------------------------------------------------------------

constexpr nb::dlpack::dtype kDlBF16{static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat), 16, 1};
constexpr nb::dlpack::dtype kDlFP16{static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 16, 1};
constexpr nb::dlpack::dtype kDlFP32{static_cast<uint8_t>(nb::dlpack::dtype_code::Float), 32, 1};
constexpr nb::dlpack::dtype kDlI32{static_cast<uint8_t>(nb::dlpack::dtype_code::Int), 32, 1};
constexpr nb::dlpack::dtype kDlI64{static_cast<uint8_t>(nb::dlpack::dtype_code::Int), 64, 1};
constexpr nb::dlpack::dtype kDlFP8{10, 8, 1};  // DLPack's kDLFloat8_e4m3fn

DT dt_of(nb::dlpack::dtype dt) {
  return dt == kDlBF16 ? DT::kBF16 : dt == kDlFP16 ? DT::kFP16 : dt == kDlFP32 ? DT::kFP32
       : dt == kDlI32  ? DT::kI32  : dt == kDlI64  ? DT::kI64  : dt == kDlFP8  ? DT::kFP8 : DT::kOther;
}

std::string dl_dtype_name(nb::dlpack::dtype dt) {
  static const char* fp8_codes[] = {"float8_e3m4",     "float8_e4m3", "float8_e4m3b11fnuz", "float8_e4m3fn",
                                    "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",    "float8_e8m0fnu"};
  if (dt.code >= 7 && dt.code <= 14 && dt.bits == 8) return fp8_codes[dt.code - 7];  // DLPack 1.1 codes
  static const char* codes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  const std::string code = dt.code < 7 ? codes[dt.code] : "code" + std::to_string(dt.code);
  return code + std::to_string(dt.bits);
}

/// A named argument converted to a DLPack view (kept alive as long as the Arg).
struct Arg {
  Array a;
  View v;

  /// Inputs are imported read-only (producers that flag their buffers read-only, such as
  /// JAX, are accepted); `writable` arguments (outputs, workspace) must be writable.
  Arg(const char* n, nb::handle h, bool writable = false) {
    v.name = n;
    import(h, writable);
    const nb::dlpack::dtype dt = a.dtype();
    v.dtype = dt_of(dt);
    if (v.dtype == DT::kOther) v.other_dtype = dl_dtype_name(dt);
    v.ndim = static_cast<int>(a.ndim());
    for (int i = 0; i < v.ndim && i < kMaxDims; ++i) {
      v.dims[i] = static_cast<int64_t>(a.shape(i));
      v.strides[i] = a.stride(i);
    }
    v.data = a.data();
    const int type = a.device_type();
    v.cuda = type == nb::device::cuda::value;
    v.device_id = a.device_id();
    if (!v.cuda) v.where = type == nb::device::cpu::value ? "the CPU" : "device type " + std::to_string(type);
  }

 private:
  void import(nb::handle h, bool writable) {
    ReadOnlyArray ro;
    if (writable) {
      if (nb::try_cast(h, a)) return;
      if (nb::try_cast(h, ro)) {
        type_error(v.prefix() + "the array is read-only; outputs and workspace must be writable buffers "
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
    type_error(v.prefix() + "expected a tensor or array supporting DLPack, got " + nb::type_name(h.type()).c_str() +
               hint);
  }
};

/// An argument that may be None (view() is then null).
struct OptionalArg {
  std::optional<Arg> arg;
  OptionalArg(const char* n, nb::handle h) {
    if (!h.is_none()) arg.emplace(n, h);
  }
  const View* view() const { return arg ? &arg->v : nullptr; }
};

// ---------------------------------------------------------------------------------------------
// torch tensors, read through their Python attributes (no DLPack export)
// ---------------------------------------------------------------------------------------------

/// torch objects handed over once by flash_mla._torch_ops (torch_setup); references are kept
/// for the life of the process (never released: they outlive the interpreter's teardown order).
struct TorchApi {
  PyTypeObject* tensor = nullptr;
  PyTypeObject* parameter = nullptr;
  PyObject* to_dlpack = nullptr;  // torch._C._to_dlpack where available (the C-level exporter)
  PyObject* dtypes[kKnownDTypes] = {};  // in DT order: bfloat16, float16, float32, int32, int64, float8_e4m3fn
  PyObject *s_shape = nullptr, *s_stride = nullptr, *s_data_ptr = nullptr, *s_dtype = nullptr, *s_is_cuda = nullptr,
           *s_get_device = nullptr, *s_requires_grad = nullptr, *s_device = nullptr, *s_type = nullptr;
  bool ready() const { return tensor != nullptr; }
} g_torch;

/// An owned reference from a CPython call; a null result raises the pending Python error.
class Ref {
 public:
  explicit Ref(PyObject* p) : p_(p) {
    if (p_ == nullptr) throw nb::python_error();
  }
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_DECREF(p_); }
  PyObject* get() const { return p_; }

 private:
  PyObject* p_;
};

int64_t py_int64(PyObject* o) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) throw nb::python_error();
  return v;
}

/// Exactly a torch.Tensor (or nn.Parameter): anything else (subclasses with their own
/// __torch_function__ / __torch_dispatch__, other objects) takes the custom-op path.
bool is_plain_tensor(nb::handle h) {
  const PyTypeObject* t = Py_TYPE(h.ptr());
  return t == g_torch.tensor || t == g_torch.parameter;
}

void read_int_tuple(PyObject* tuple, const char* what, int64_t* out, int n) {
  if (!PyTuple_Check(tuple)) type_error(std::string("torch returned a non-tuple ") + what);
  for (int i = 0; i < n; ++i) out[i] = py_int64(PyTuple_GET_ITEM(tuple, i));
}

/// The name of a dtype outside DT, as torch prints it without "torch." ("float64", "bool").
std::string torch_dtype_name(PyObject* o) {
  Ref dtype(PyObject_GetAttr(o, g_torch.s_dtype));
  Ref str(PyObject_Str(dtype.get()));
  const char* c = PyUnicode_AsUTF8(str.get());
  const std::string s = c != nullptr ? c : "?";
  return s.rfind("torch.", 0) == 0 ? s.substr(6) : s;
}

/// "the CPU" or "device type <torch's device type>", for the device error of a non-CUDA tensor.
std::string torch_device_where(PyObject* o) {
  Ref device(PyObject_GetAttr(o, g_torch.s_device));
  Ref type(PyObject_GetAttr(device.get(), g_torch.s_type));
  const char* c = PyUnicode_Check(type.get()) ? PyUnicode_AsUTF8(type.get()) : nullptr;
  const std::string t = c != nullptr ? c : "?";
  return t == "cpu" ? "the CPU" : "device type " + t;
}

/// Fills v from the DLPack capsule of torch._C._to_dlpack (one C call instead of seven
/// attribute reads). False (nothing raised) where that exporter refuses the tensor or gives
/// something unexpected: the caller then reads the attributes.
bool torch_view_from_capsule(PyObject* o, View& v) {
  PyObject* capsule = PyObject_CallOneArg(g_torch.to_dlpack, o);
  if (capsule == nullptr) {
    PyErr_Clear();
    return false;
  }
  Ref keep(capsule);  // torch's capsule destructor frees the export (it was not consumed)
  if (!PyCapsule_IsValid(capsule, "dltensor")) return false;
  const auto* t = static_cast<const nb::dlpack::dltensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  if (t == nullptr || t->ndim < 0) {
    PyErr_Clear();
    return false;
  }
  v.dtype = dt_of(t->dtype);
  v.ndim = t->ndim;
  const int n = v.ndim < kMaxDims ? v.ndim : kMaxDims;
  int64_t compact = 1;
  for (int i = v.ndim; i-- > 0;) {
    const int64_t size = t->shape[i];
    if (i < n) {
      v.dims[i] = size;
      v.strides[i] = t->strides != nullptr ? t->strides[i] : compact;
    }
    compact *= size;
  }
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  v.cuda = t->device.device_type == nb::device::cuda::value;
  v.device_id = t->device.device_id;
  if (v.dtype == DT::kOther) v.other_dtype = torch_dtype_name(o);
  if (!v.cuda) v.where = torch_device_where(o);
  return true;
}

View torch_view(const char* name, nb::handle h) {
  PyObject* o = h.ptr();
  View v;
  v.name = name;
  {
    Ref grad(PyObject_GetAttr(o, g_torch.s_requires_grad));
    if (grad.get() == Py_True) {
      type_error(v.prefix() + "the tensor requires grad; flash-mla computes no gradients: pass .detach()");
    }
  }
  if (g_torch.to_dlpack != nullptr && torch_view_from_capsule(o, v)) return v;
  {
    Ref dtype(PyObject_GetAttr(o, g_torch.s_dtype));
    for (int i = 0; i < kKnownDTypes; ++i) {
      if (dtype.get() != nullptr && dtype.get() == g_torch.dtypes[i]) v.dtype = static_cast<DT>(i);
    }
  }
  if (v.dtype == DT::kOther) v.other_dtype = torch_dtype_name(o);
  {
    Ref shape(PyObject_GetAttr(o, g_torch.s_shape));
    if (!PyTuple_Check(shape.get())) type_error(v.prefix() + "torch returned a non-tuple shape");
    v.ndim = static_cast<int>(PyTuple_GET_SIZE(shape.get()));
    const int n = v.ndim < kMaxDims ? v.ndim : kMaxDims;
    read_int_tuple(shape.get(), "shape", v.dims, n);
    Ref strides(PyObject_CallMethodNoArgs(o, g_torch.s_stride));
    if (PyTuple_Check(strides.get()) && PyTuple_GET_SIZE(strides.get()) < n) {
      type_error(v.prefix() + "torch returned fewer strides than dims");
    }
    read_int_tuple(strides.get(), "stride", v.strides, n);
  }
  {
    Ref ptr(PyObject_CallMethodNoArgs(o, g_torch.s_data_ptr));
    v.data = PyLong_AsVoidPtr(ptr.get());
    if (v.data == nullptr && PyErr_Occurred()) throw nb::python_error();
  }
  {
    Ref cuda(PyObject_GetAttr(o, g_torch.s_is_cuda));
    v.cuda = cuda.get() == Py_True;
  }
  if (v.cuda) {
    Ref index(PyObject_CallMethodNoArgs(o, g_torch.s_get_device));
    v.device_id = static_cast<int>(py_int64(index.get()));
  } else {
    v.where = torch_device_where(o);
  }
  return v;
}

/// data_ptr() of a tensor allocated by the torch side for this call (shape, dtype and device
/// are what was asked for: nothing else to check).
void* tensor_data(nb::handle t) {
  Ref ptr(PyObject_CallMethodNoArgs(t.ptr(), g_torch.s_data_ptr));
  void* d = PyLong_AsVoidPtr(ptr.get());
  if (d == nullptr && PyErr_Occurred()) throw nb::python_error();
  return d;
}

void require_torch() {
  if (!g_torch.ready()) throw std::runtime_error("flash_mla: torch_setup() was not called (import flash_mla.interface)");
}

// ---------------------------------------------------------------------------------------------
// checks shared by both ways in
// ---------------------------------------------------------------------------------------------

int positive_int(int64_t v, const char* name) {
  if (v <= 0 || v > (1 << 30)) value_error(std::string(name) + ": must be a positive int, got " + std::to_string(v));
  return static_cast<int>(v);
}

void check_seqlens(const View& seqlens) {
  seqlens.dtype_in({DT::kI32}, "int32");
  seqlens.rank(1, "(batch,)");
  seqlens.contiguous();
}

void check_metadata_out(const View& meta, const View& splits, int batch) {
  meta.dtype_in({DT::kI32}, "int32");
  meta.rank(2, "(num_sm_parts, 8)");
  meta.dim(1, kMetaInts, "ints per SM part");
  if (meta.size(0) < 1 || meta.size(0) > 65535) value_error(meta.prefix() + "num_sm_parts (dim 0) must be in [1, 65535]");
  meta.contiguous();
  splits.dtype_in({DT::kI32}, "int32");
  splits.rank(1, "(batch + 1,)");
  splits.dim(0, batch + 1, "batch + 1");
  splits.contiguous();
}

/// Everything flash_mla_with_kvcache needs from its inputs, checked (devices excepted: the
/// callers check them after the outputs' shapes, all arrays together). `meta` and `splits` may
/// be null: their checks are skipped and the params' metadata fields left unset.
struct DecodeInputs {
  flash_mla::DecodeParams params;

  /// descale_q / descale_k: null for None.
  DecodeInputs(const View& q, const View& k_cache, const View& block_table, const View& cache_seqlens,
               int64_t head_dim_v, const View* meta, const View* splits, double softmax_scale,
               const View* descale_q, const View* descale_k) {
    q.dtype_in({DT::kBF16, DT::kFP16, DT::kFP8}, "bfloat16, float16 or float8_e4m3fn");
    q.rank(4, "(batch, s_q, h_q, 576)");
    q.dim(3, kHeadDim, "head dim d");
    q.last_dim_contiguous();
    const int batch = q.size(0), seqlen_q = q.size(1), heads_q = q.size(2);
    if (seqlen_q < 1) value_error("q: s_q (dim 1) must be >= 1, got shape " + q.shape_str());
    if (heads_q < 1) value_error("q: h_q (dim 2) must be >= 1, got shape " + q.shape_str());

    const bool kv_fp8 = k_cache.dtype == DT::kFP8, q_fp8 = q.dtype == DT::kFP8;
    if (q_fp8 && !kv_fp8) {
      type_error("k_cache: a float8_e4m3fn q needs a float8_e4m3fn k_cache, got " + k_cache.dtype_str());
    }
    if (!kv_fp8 && k_cache.dtype != q.dtype) {
      type_error("k_cache: dtype must match q (" + q.dtype_str() + ") or be float8_e4m3fn, got " + k_cache.dtype_str());
    }
    check_descale(descale_k, kv_fp8, "descale_k", "a float8_e4m3fn k_cache");
    check_descale(descale_q, q_fp8, "descale_q", "a float8_e4m3fn q");
    k_cache.rank(4, "(num_blocks, page_block_size, h_kv, 576)");
    if (k_cache.dims[1] > 256 || !flash_mla::is_supported_page_size(static_cast<int>(k_cache.dims[1]))) {
      value_error("k_cache: page_block_size (dim 1) must be one of 16, 32, 64, 128, 256, got shape " +
                  k_cache.shape_str());
    }
    k_cache.dim(3, kHeadDim, "head dim d");
    k_cache.last_dim_contiguous();
    const int heads_kv = k_cache.size(2);
    if (heads_kv < 1) value_error("k_cache: h_kv (dim 2) must be >= 1");
    if (heads_q % heads_kv != 0) {
      value_error("k_cache: h_q % h_kv must be 0, got h_q = " + std::to_string(heads_q) +
                  ", h_kv = " + std::to_string(heads_kv));
    }
    if (head_dim_v != kHeadDimV) value_error("head_dim_v: must be 512, got " + std::to_string(head_dim_v));

    block_table.dtype_in({DT::kI32}, "int32");
    block_table.rank(2, "(batch, max_blocks_per_seq)");
    block_table.dim(0, batch, "batch");
    block_table.last_dim_contiguous();
    check_seqlens(cache_seqlens);
    cache_seqlens.dim(0, batch, "batch");
    if (meta != nullptr && splits != nullptr) check_metadata_out(*meta, *splits, batch);
    if (!(softmax_scale > 0.0) || !std::isfinite(softmax_scale)) {
      value_error("softmax_scale: must be finite and > 0, got " + std::to_string(softmax_scale));
    }

    auto& p = params;
    p.dtype = q_fp8 ? flash_mla::DType::kFP8E4M3 : q.dtype == DT::kBF16 ? flash_mla::DType::kBF16 : flash_mla::DType::kFP16;
    p.kv_dtype = kv_fp8 ? flash_mla::KvDType::kFP8E4M3 : flash_mla::KvDType::kSameAsQ;
    p.descale_q = descale_q != nullptr ? static_cast<const float*>(descale_q->data) : nullptr;
    p.descale_k = descale_k != nullptr ? static_cast<const float*>(descale_k->data) : nullptr;
    p.batch = batch;
    p.seqlen_q = seqlen_q;
    p.num_heads_q = heads_q;
    p.num_heads_kv = heads_kv;
    p.num_blocks = k_cache.size(0);
    p.max_blocks_per_seq = block_table.size(1);
    p.page_size = k_cache.size(1);
    p.softmax_scale = static_cast<float>(softmax_scale);
    p.q = q.data;
    p.q_batch_stride = q.stride(0);
    p.q_seq_stride = q.stride(1);
    p.q_head_stride = q.stride(2);
    p.k_cache = k_cache.data;
    p.k_block_stride = k_cache.stride(0);
    p.k_token_stride = k_cache.stride(1);
    p.k_head_stride = k_cache.stride(2);
    p.block_table = static_cast<const int32_t*>(block_table.data);
    p.block_table_stride = block_table.stride(0);
    p.cache_seqlens = static_cast<const int32_t*>(cache_seqlens.data);
    if (meta != nullptr && splits != nullptr) {
      p.tile_scheduler_metadata = static_cast<const int32_t*>(meta->data);
      p.num_sm_parts = meta->size(0);
      p.num_splits = static_cast<const int32_t*>(splits->data);
      p.max_splits = workspace_splits();
    }
  }

  int workspace_splits() const { return flash_mla::max_splits_of(params.batch, params.num_sm_parts); }

  /// A descale (float32, shape (1,), 4-byte aligned): required exactly when its input is FP8.
  static void check_descale(const View* d, bool needed, const char* name, const char* input) {
    if (d == nullptr) {
      if (needed) value_error(std::string(name) + ": required with " + input + " (float32 tensor of shape (1,))");
      return;
    }
    if (!needed) value_error(std::string(name) + ": only valid with " + input + "; leave it None");
    d->dtype_in({DT::kFP32}, "float32");
    d->rank(1, "(1,)");
    d->dim(0, 1, "size");
    if (!d->aligned(4)) value_error(d->prefix() + "must be 4-byte aligned");
  }
  int64_t rows() const { return static_cast<int64_t>(params.seqlen_q) * params.num_heads_q; }
};

/// out (batch, s_q, h_q, 512) in q's dtype (bfloat16 for an FP8 q) and lse (batch, h_q, s_q)
/// float32, contiguous.
void check_out(const View& out, const flash_mla::DecodeParams& p) {
  const DT out_dtype = p.dtype == flash_mla::DType::kFP16 ? DT::kFP16 : DT::kBF16;
  if (out.dtype != out_dtype) {
    type_error(std::string("out: dtype must be ") + dt_name(out_dtype) +
               (p.dtype == flash_mla::DType::kFP8E4M3 ? " (the output of an FP8 q)" : " (q's)") + ", got " +
               out.dtype_str());
  }
  out.rank(4, "(batch, s_q, h_q, 512)");
  out.dim(0, p.batch, "batch");
  out.dim(1, p.seqlen_q, "s_q");
  out.dim(2, p.num_heads_q, "h_q");
  out.dim(3, kHeadDimV, "head_dim_v");
  out.contiguous();
}

void check_lse(const View& lse, const flash_mla::DecodeParams& p) {
  lse.dtype_in({DT::kFP32}, "float32");
  lse.rank(3, "(batch, h_q, s_q)");
  lse.dim(0, p.batch, "batch");
  lse.dim(1, p.num_heads_q, "h_q");
  lse.dim(2, p.seqlen_q, "s_q");
  lse.contiguous();
}

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

/// SM count of a device, queried once per device and process.
int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};  // guarded by the GIL (only called from bound functions)
  if (device >= 0 && device < kMaxDevices && cache[device] > 0) return cache[device];
  int count = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    value_error("device: cannot query cuda:" + std::to_string(device) + ": " + cudaGetErrorString(err));
  }
  if (device >= 0 && device < kMaxDevices) cache[device] = count;
  return count;
}

uintptr_t stream_handle_of(nb::handle h) {
  const unsigned long long v = PyLong_AsUnsignedLongLong(h.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw nb::python_error();
  return static_cast<uintptr_t>(v);
}

// ---------------------------------------------------------------------------------------------
// the torch entry points
// ---------------------------------------------------------------------------------------------

/// flash_mla_with_kvcache on torch tensors. Returns (out, lse), or None when an argument is not
/// a plain torch.Tensor (the caller then takes the custom-op path, which handles the rest).
/// `prepare(q, out, lse, batch, s_q, h_q, workspace_splits, device)` runs after every check: it
/// returns (out, lse, workspace, stream) with the missing outputs (out / lse None) and the
/// float32 workspace of workspace_splits * s_q * h_q * 513 elements allocated on q's device
/// (cuda:device), and the handle of the stream to launch on.
nb::object torch_decode(nb::handle q_h, nb::handle k_h, nb::handle bt_h, nb::handle sl_h, int64_t head_dim_v,
                        nb::handle meta_h, nb::handle splits_h, nb::handle out_h, nb::handle lse_h, double softmax_scale,
                        bool causal, int kernel, nb::handle prepare, nb::handle dq_h, nb::handle dk_h) {
  require_torch();
  const bool has_out = !out_h.is_none(), has_lse = !lse_h.is_none();
  const bool has_dq = !dq_h.is_none(), has_dk = !dk_h.is_none();
  for (nb::handle h : {q_h, k_h, bt_h, sl_h, meta_h, splits_h}) {
    if (!is_plain_tensor(h)) return nb::none();
  }
  if ((has_out && !is_plain_tensor(out_h)) || (has_lse && !is_plain_tensor(lse_h))) return nb::none();
  if ((has_dq && !is_plain_tensor(dq_h)) || (has_dk && !is_plain_tensor(dk_h))) return nb::none();

  const View q = torch_view("q", q_h), k = torch_view("k_cache", k_h), bt = torch_view("block_table", bt_h),
             sl = torch_view("cache_seqlens", sl_h), meta = torch_view("tile_scheduler_metadata", meta_h),
             splits = torch_view("num_splits", splits_h);
  View out, lse, dq, dk;
  if (has_out) out = torch_view("out", out_h);
  if (has_lse) lse = torch_view("lse", lse_h);
  if (has_dq) dq = torch_view("descale_q", dq_h);
  if (has_dk) dk = torch_view("descale_k", dk_h);
  DecodeInputs in(q, k, bt, sl, head_dim_v, &meta, &splits, softmax_scale, has_dq ? &dq : nullptr,
                  has_dk ? &dk : nullptr);
  auto& p = in.params;
  if (has_out) {
    check_out(out, p);
    if (!out.aligned(16)) value_error("out: must be 16-byte aligned");
  }
  if (has_lse) {
    check_lse(lse, p);
    if (!lse.aligned(4)) value_error("lse, lse_accum: must be 4-byte aligned");
  }
  const flash_mla::KernelChoice choice = kernel_choice(kernel);
  const int device = common_cuda_device({&q, &k, &bt, &sl, &meta, &splits, has_out ? &out : nullptr,
                                         has_lse ? &lse : nullptr, has_dq ? &dq : nullptr, has_dk ? &dk : nullptr});

  // Every check passed: allocate what is missing (torch, on q's device) and launch.
  const int splits_n = in.workspace_splits();
  nb::object ready = nb::borrow(prepare)(q_h, out_h, lse_h, p.batch, p.seqlen_q, p.num_heads_q, splits_n, device);
  if (!PyTuple_Check(ready.ptr()) || PyTuple_GET_SIZE(ready.ptr()) != 4) {
    throw std::runtime_error("flash_mla: prepare() must return (out, lse, workspace, stream)");
  }
  nb::handle out_t = PyTuple_GET_ITEM(ready.ptr(), 0), lse_t = PyTuple_GET_ITEM(ready.ptr(), 1),
             ws_t = PyTuple_GET_ITEM(ready.ptr(), 2), stream_t = PyTuple_GET_ITEM(ready.ptr(), 3);
  p.out = has_out ? out.data : tensor_data(out_t);
  p.lse = static_cast<float*>(has_lse ? lse.data : tensor_data(lse_t));
  float* ws = static_cast<float*>(tensor_data(ws_t));
  p.o_accum = ws;
  p.lse_accum = ws + static_cast<int64_t>(splits_n) * in.rows() * kHeadDimV;
  p.max_splits = splits_n;
  p.causal = causal;
  p.kernel = choice;
  p.stream = reinterpret_cast<cudaStream_t>(stream_handle_of(stream_t));
  {
    DeviceGuard guard(device);
    raise_if_failed(flash_mla_ext::run_decode(p));
  }
  return nb::make_tuple(out_t, lse_t);
}

/// The checks of torch_decode without a launch (tensor subclasses accepted); meta / splits may
/// be None (their checks skipped). Returns (batch, s_q, h_q, h_kv, workspace_splits or 0).
std::tuple<int, int, int, int, int> torch_check_decode(nb::handle q_h, nb::handle k_h, nb::handle bt_h,
                                                       nb::handle sl_h, int64_t head_dim_v, nb::handle meta_h,
                                                       nb::handle splits_h, double softmax_scale, bool check_device,
                                                       nb::handle dq_h, nb::handle dk_h) {
  require_torch();
  const bool has_meta = !meta_h.is_none() && !splits_h.is_none();
  const bool has_dq = !dq_h.is_none(), has_dk = !dk_h.is_none();
  const View q = torch_view("q", q_h), k = torch_view("k_cache", k_h), bt = torch_view("block_table", bt_h),
             sl = torch_view("cache_seqlens", sl_h);
  View meta, splits, dq, dk;
  if (has_meta) {
    meta = torch_view("tile_scheduler_metadata", meta_h);
    splits = torch_view("num_splits", splits_h);
  }
  if (has_dq) dq = torch_view("descale_q", dq_h);
  if (has_dk) dk = torch_view("descale_k", dk_h);
  DecodeInputs in(q, k, bt, sl, head_dim_v, has_meta ? &meta : nullptr, has_meta ? &splits : nullptr, softmax_scale,
                  has_dq ? &dq : nullptr, has_dk ? &dk : nullptr);
  if (check_device) {
    common_cuda_device({&q, &k, &bt, &sl, has_meta ? &meta : nullptr, has_meta ? &splits : nullptr,
                        has_dq ? &dq : nullptr, has_dk ? &dk : nullptr});
  }
  const auto& p = in.params;
  return {p.batch, p.seqlen_q, p.num_heads_q, p.num_heads_kv, has_meta ? in.workspace_splits() : 0};
}

/// get_mla_metadata on a torch tensor. Returns (tile_scheduler_metadata, num_splits), or None
/// when cache_seqlens is not a plain torch.Tensor. `prepare(cache_seqlens, num_sm_parts, batch, device)`
/// runs after the checks and returns (meta, splits, stream): new int32 tensors (num_sm_parts, 8)
/// and (batch + 1,) on cache_seqlens' device, and the stream handle.
nb::object torch_get_mla_metadata(nb::handle sl_h, int64_t rows_per_kv_head, int64_t heads_kv, nb::handle prepare) {
  require_torch();
  if (!is_plain_tensor(sl_h)) return nb::none();
  const View sl = torch_view("cache_seqlens", sl_h);
  check_seqlens(sl);
  const int rows = positive_int(rows_per_kv_head, "num_heads_per_head_k");
  const int kv = positive_int(heads_kv, "num_heads_k");
  const int device = common_cuda_device({&sl});
  const int batch = sl.size(0);
  const int parts = flash_mla::num_sm_parts_for(sm_count(device), rows, kv);
  nb::object ready = nb::borrow(prepare)(sl_h, parts, batch, device);
  if (!PyTuple_Check(ready.ptr()) || PyTuple_GET_SIZE(ready.ptr()) != 3) {
    throw std::runtime_error("flash_mla: prepare() must return (meta, splits, stream)");
  }
  nb::handle meta_t = PyTuple_GET_ITEM(ready.ptr(), 0), splits_t = PyTuple_GET_ITEM(ready.ptr(), 1);
  flash_mla::MetadataParams p;
  p.cache_seqlens = static_cast<const int32_t*>(sl.data);
  p.tile_scheduler_metadata = static_cast<int32_t*>(tensor_data(meta_t));
  p.num_splits = static_cast<int32_t*>(tensor_data(splits_t));
  p.batch = batch;
  p.num_sm_parts = parts;
  p.stream = reinterpret_cast<cudaStream_t>(stream_handle_of(PyTuple_GET_ITEM(ready.ptr(), 2)));
  {
    DeviceGuard guard(device);
    raise_if_failed(flash_mla_ext::run_metadata(p));
  }
  return nb::make_tuple(meta_t, splits_t);
}

// ---------------------------------------------------------------------------------------------
// token-sparse decode (torch tensors)
// ---------------------------------------------------------------------------------------------

/// Bytes per token record of the FP8 token-sparse formats, as the last dim of k_cache.
constexpr int64_t kV32TokenBytes = 656;
constexpr int64_t kModel1TokenBytes = 584;

/// One cache of a token-sparse call and its index rows, checked (formats: SparseKvCache).
void check_sparse_cache_dtype(const View& k, DT dtype) {
  if (k.dtype != dtype) {
    type_error(k.prefix() + "expected dtype " + dt_name(dtype) +
               (dtype == DT::kFP8 ? " (or uint8 / int8 bytes) with is_fp8_kvcache=True" : " with is_fp8_kvcache=False") +
               ", got " + k.dtype_str());
  }
}

flash_mla::SparseKvCache sparse_cache(const View& k, const View& idx, const View* length, flash_mla::SparseKvFormat fmt,
                                      int64_t last_dim, DT dtype, int batch, int seqlen_q) {
  check_sparse_cache_dtype(k, dtype);
  k.rank(4, "(num_blocks, page_block_size, 1, record)");
  if (k.dims[2] != 1) value_error(k.prefix() + "h_kv (dim 2) must be 1 for token-sparse decode, got shape " + k.shape_str());
  k.dim(3, last_dim, "the token record");
  k.last_dim_contiguous();
  if (k.size(1) < 1) value_error(k.prefix() + "page_block_size (dim 1) must be >= 1, got shape " + k.shape_str());
  const int64_t elem = dtype == DT::kFP8 ? 1 : 2;
  flash_mla::SparseKvCache c;
  c.data = k.data;
  c.num_blocks = k.size(0);
  c.page_size = k.size(1);
  c.page_stride = k.stride(0) * elem;
  c.token_stride = k.stride(1) * elem;
  if (fmt == flash_mla::SparseKvFormat::kModel1FP8 && c.page_size > 1 && c.token_stride != kModel1TokenBytes) {
    value_error(k.prefix() + "the 512-dim format's token stride (dim 1) must be 584 bytes, got " +
                std::to_string(c.token_stride));
  }
  if (c.page_stride < 0 || c.token_stride < 0 || c.page_stride % 16 ||
      (fmt != flash_mla::SparseKvFormat::kModel1FP8 && c.token_stride % 16)) {
    value_error(k.prefix() + "page and token strides must be multiples of 16 bytes, got " +
                std::to_string(c.page_stride) + " and " + std::to_string(c.token_stride));
  }
  if (!k.aligned(16)) value_error(k.prefix() + "must be 16-byte aligned");
  idx.dtype_in({DT::kI32}, "int32");
  idx.rank(3, "(batch, s_q, topk)");
  idx.dim(0, batch, "batch");
  idx.dim(1, seqlen_q, "s_q");
  idx.last_dim_contiguous();
  c.indices = static_cast<const int32_t*>(idx.data);
  c.indices_batch_stride = idx.stride(0);
  c.indices_seq_stride = idx.stride(1);
  c.topk = idx.size(2);
  if (length != nullptr) {
    length->dtype_in({DT::kI32}, "int32");
    length->rank(1, "(batch,)");
    length->dim(0, batch, "batch");
    length->contiguous();
    c.topk_length = static_cast<const int32_t*>(length->data);
  }
  return c;
}

/// Everything the token-sparse form of flash_mla_with_kvcache needs from its inputs, checked
/// (devices excepted). An FP8 cache arrives as float8_e4m3fn (byte caches are viewed so).
struct SparseInputs {
  flash_mla::SparseDecodeParams params;

  SparseInputs(const View& q, const View& k, const View& idx, const View* topk_length, const View* extra_k,
               const View* extra_idx, const View* extra_length, const View* sink, int64_t head_dim_v,
               double softmax_scale, bool is_fp8) {
    q.dtype_in({DT::kBF16}, "bfloat16 (token-sparse decode)");
    q.rank(4, "(batch, s_q, h_q, d_qk)");
    q.last_dim_contiguous();
    const int batch = q.size(0), seqlen_q = q.size(1), heads_q = q.size(2), d = q.size(3);
    if (seqlen_q < 1) value_error("q: s_q (dim 1) must be >= 1, got shape " + q.shape_str());
    if (heads_q < 1) value_error("q: h_q (dim 2) must be >= 1, got shape " + q.shape_str());
    if (d != 576 && d != 512) value_error("q: d_qk (dim 3) must be 576 or 512, got shape " + q.shape_str());
    if (batch > 1 && seqlen_q > 1 && q.strides[0] != seqlen_q * q.strides[1]) {
      value_error("q: dims 0 and 1 must be mergeable (stride of dim 0 = s_q * stride of dim 1)");
    }
    if (head_dim_v != kHeadDimV) value_error("head_dim_v: must be 512, got " + std::to_string(head_dim_v));
    using F = flash_mla::SparseKvFormat;
    F fmt = F::kBF16;
    int64_t last = d;
    const DT k_dtype = is_fp8 ? DT::kFP8 : DT::kBF16;
    check_sparse_cache_dtype(k, k_dtype);
    if (is_fp8) {
      last = k.ndim == 4 ? k.dims[3] : 0;
      if (last == kV32TokenBytes && d == 576) {
        fmt = F::kV32FP8;
      } else if (last == kModel1TokenBytes && d == 512) {
        fmt = F::kModel1FP8;
      } else {
        value_error("k_cache: with is_fp8_kvcache=True the last dim must be 656 (V3.2 format, q's d_qk 576) or 584 "
                    "(512-dim format, q's d_qk 512), got shape " + k.shape_str() + " for q's d_qk " + std::to_string(d));
      }
    }
    if ((extra_k == nullptr) != (extra_idx == nullptr)) {
      value_error(extra_k == nullptr ? "extra_k_cache: required with extra_indices_in_kvcache"
                                     : "extra_indices_in_kvcache: required with extra_k_cache");
    }
    if (extra_length != nullptr && extra_k == nullptr) {
      value_error("extra_topk_length: only valid with extra_k_cache and extra_indices_in_kvcache");
    }
    auto& p = params;
    p.format = fmt;
    p.head_dim = d;
    p.cache = sparse_cache(k, idx, topk_length, fmt, last, k_dtype, batch, seqlen_q);
    if (extra_k != nullptr) p.extra = sparse_cache(*extra_k, *extra_idx, extra_length, fmt, last, k_dtype, batch, seqlen_q);
    if (sink != nullptr) {
      sink->dtype_in({DT::kFP32}, "float32");
      sink->rank(1, "(h_q,)");
      sink->dim(0, heads_q, "h_q");
      sink->contiguous();
      p.attn_sink = static_cast<const float*>(sink->data);
    }
    if (!(softmax_scale > 0.0) || !std::isfinite(softmax_scale)) {
      value_error("softmax_scale: must be finite and > 0, got " + std::to_string(softmax_scale));
    }
    p.batch = batch;
    p.seqlen_q = seqlen_q;
    p.num_heads_q = heads_q;
    p.softmax_scale = static_cast<float>(softmax_scale);
    p.q = q.data;
    p.q_seq_stride = q.stride(1);
    p.q_head_stride = q.stride(2);
    if (seqlen_q == 1) p.q_seq_stride = q.stride(0);  // dim 1 has size 1: request i is at i * stride(0)
  }

  /// Keys per query token the plan covers: topk of both caches.
  int keys() const { return params.cache.topk + (params.extra.data != nullptr ? params.extra.topk : 0); }
  int pairs() const { return params.batch * params.seqlen_q; }

  /// out: (batch, s_q, h_q, 512) bfloat16, contiguous, 16-byte aligned.
  void check_out(const View& out) const {
    const auto& p = params;
    if (out.dtype != DT::kBF16) type_error("out: dtype must be bfloat16, got " + out.dtype_str());
    out.rank(4, "(batch, s_q, h_q, 512)");
    out.dim(0, p.batch, "batch");
    out.dim(1, p.seqlen_q, "s_q");
    out.dim(2, p.num_heads_q, "h_q");
    out.dim(3, kHeadDimV, "head_dim_v");
    out.contiguous();
    if (!out.aligned(16)) value_error("out: must be 16-byte aligned");
  }

  /// The plan: plan_seqlens (batch * s_q,) and the metadata planned over it; sets the params.
  void take_plan(const View& plan, const View& meta, const View& splits) {
    check_seqlens(plan);
    plan.dim(0, pairs(), "batch * s_q");
    check_metadata_out(meta, splits, pairs());
    params.plan_seqlens = static_cast<const int32_t*>(plan.data);
    params.tile_scheduler_metadata = static_cast<const int32_t*>(meta.data);
    params.num_sm_parts = meta.size(0);
    params.num_splits = static_cast<const int32_t*>(splits.data);
  }
  int workspace_splits() const { return flash_mla::max_splits_of(pairs(), params.num_sm_parts); }

  void launch(int kernel, cudaStream_t stream, int device) {
    params.kernel = kernel_choice(kernel);
    params.stream = stream;
    DeviceGuard guard(device);
    raise_if_failed(flash_mla_ext::run_sparse_decode(params));
  }
};

/// The token-sparse flash_mla_with_kvcache on torch tensors (None arguments: absent). Without
/// plan_seqlens it only checks (devices included) and returns (batch, s_q, h_q, keys per query
/// token). Otherwise `prepare(q, out, lse, batch, s_q, h_q, workspace_splits, device)` returns
/// (out, lse, workspace, stream) as for torch_decode, with lse (batch, s_q, h_q); launches and
/// returns (out, lse).
nb::object torch_sparse_decode(nb::handle q_h, nb::handle k_h, nb::handle idx_h, nb::handle tl_h, nb::handle ek_h,
                               nb::handle eidx_h, nb::handle etl_h, nb::handle sink_h, int64_t head_dim_v,
                               double softmax_scale, bool is_fp8, nb::handle plan_h, nb::handle meta_h,
                               nb::handle splits_h, nb::handle out_h, nb::handle lse_h, int kernel, nb::handle prepare) {
  require_torch();
  const auto optional = [](const char* name, nb::handle h, View& v) -> const View* {
    if (h.is_none()) return nullptr;
    v = torch_view(name, h);
    return &v;
  };
  const View q = torch_view("q", q_h), k = torch_view("k_cache", k_h), idx = torch_view("indices", idx_h);
  View tl, ek, eidx, etl, sink, plan, meta, splits, out, lse;
  const View* tl_v = optional("topk_length", tl_h, tl);
  const View* ek_v = optional("extra_k_cache", ek_h, ek);
  const View* eidx_v = optional("extra_indices_in_kvcache", eidx_h, eidx);
  const View* etl_v = optional("extra_topk_length", etl_h, etl);
  const View* sink_v = optional("attn_sink", sink_h, sink);
  SparseInputs in(q, k, idx, tl_v, ek_v, eidx_v, etl_v, sink_v, head_dim_v, softmax_scale, is_fp8);
  auto& p = in.params;
  const View* out_v = optional("out", out_h, out);
  const View* lse_v = optional("lse", lse_h, lse);
  if (out_v != nullptr) in.check_out(out);
  if (lse_v != nullptr) {
    lse.dtype_in({DT::kFP32}, "float32");
    lse.rank(3, "(batch, h_q, s_q)");
    lse.dim(0, p.batch, "batch");
    lse.dim(1, p.num_heads_q, "h_q");
    lse.dim(2, p.seqlen_q, "s_q");
    // Written as (batch, s_q, h_q) memory: lse.transpose(1, 2) must be contiguous (checked when
    // launching: the Python API reads any other layout back through a copy).
    const bool bsh_memory = lse.stride(1) <= 1 && (lse.stride(2) == 0 || lse.stride(2) == p.num_heads_q) &&
                            (lse.stride(0) == 0 || lse.stride(0) == int64_t(p.seqlen_q) * p.num_heads_q);
    if (!plan_h.is_none() && !bsh_memory) {
      value_error("lse: token-sparse decode writes lse as (batch, s_q, h_q) memory: pass "
                  "torch.empty(batch, s_q, h_q).transpose(1, 2)");
    }
    if (!lse.aligned(4)) value_error("lse: must be 4-byte aligned");
  }
  const View* plan_v = optional("plan_seqlens", plan_h, plan);
  const View* meta_v = optional("tile_scheduler_metadata", meta_h, meta);
  const View* splits_v = optional("num_splits", splits_h, splits);
  if (plan_v != nullptr) {
    if (meta_v == nullptr || splits_v == nullptr) value_error("tile_scheduler_metadata, num_splits: required");
    in.take_plan(plan, meta, splits);
  }
  kernel_choice(kernel);
  const int device = common_cuda_device({&q, &k, &idx, tl_v, ek_v, eidx_v, etl_v, sink_v, out_v, lse_v, plan_v,
                                         meta_v, splits_v});
  if (plan_v == nullptr) return nb::make_tuple(p.batch, p.seqlen_q, p.num_heads_q, in.keys());

  const int splits_n = in.workspace_splits();
  nb::object ready = nb::borrow(prepare)(q_h, out_h, lse_h, p.batch, p.seqlen_q, p.num_heads_q, splits_n, device);
  if (!PyTuple_Check(ready.ptr()) || PyTuple_GET_SIZE(ready.ptr()) != 4) {
    throw std::runtime_error("flash_mla: prepare() must return (out, lse, workspace, stream)");
  }
  nb::handle out_t = PyTuple_GET_ITEM(ready.ptr(), 0), lse_t = PyTuple_GET_ITEM(ready.ptr(), 1),
             ws_t = PyTuple_GET_ITEM(ready.ptr(), 2), stream_t = PyTuple_GET_ITEM(ready.ptr(), 3);
  p.out = out_v != nullptr ? out.data : tensor_data(out_t);
  p.lse = static_cast<float*>(lse_v != nullptr ? lse.data : tensor_data(lse_t));
  float* ws = static_cast<float*>(tensor_data(ws_t));
  p.o_accum = ws;
  p.lse_accum = ws + static_cast<int64_t>(splits_n) * p.num_heads_q * kHeadDimV;
  p.max_splits = splits_n;
  in.launch(kernel, reinterpret_cast<cudaStream_t>(stream_handle_of(stream_t)), device);
  return nb::make_tuple(out_t, lse_t);
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
    check_seqlens(seqlens.v);
    positive_int(rows_per_kv_head, "num_heads_per_head_k");
    positive_int(heads_kv, "num_heads_k");
    common_cuda_device({&seqlens.v});
  }, nb::arg("cache_seqlens"), nb::arg("num_heads_per_head_k"), nb::arg("num_heads_k"));

  m.def("get_mla_metadata", [](nb::handle seqlens_h, nb::handle meta_h, nb::handle splits_h, uintptr_t stream) {
    Arg seqlens("cache_seqlens", seqlens_h), meta("tile_scheduler_metadata", meta_h, true),
        splits("num_splits", splits_h, true);
    check_seqlens(seqlens.v);
    check_metadata_out(meta.v, splits.v, seqlens.v.size(0));
    const int device = common_cuda_device({&seqlens.v, &meta.v, &splits.v});
    flash_mla::MetadataParams p;
    p.cache_seqlens = static_cast<const int32_t*>(seqlens.v.data);
    p.tile_scheduler_metadata = static_cast<int32_t*>(meta.v.data);
    p.num_splits = static_cast<int32_t*>(splits.v.data);
    p.batch = seqlens.v.size(0);
    p.num_sm_parts = meta.v.size(0);
    p.stream = reinterpret_cast<cudaStream_t>(stream);
    DeviceGuard guard(device);
    raise_if_failed(flash_mla_ext::run_metadata(p));
  }, nb::arg("cache_seqlens"), nb::arg("tile_scheduler_metadata"), nb::arg("num_splits"), nb::arg("stream"));

  m.def("check_decode_inputs", [](nb::handle q, nb::handle k, nb::handle bt, nb::handle sl, int64_t head_dim_v,
                                  nb::handle meta, nb::handle splits, double softmax_scale, bool check_device,
                                  nb::handle descale_q, nb::handle descale_k) {
    Arg aq("q", q), ak("k_cache", k), abt("block_table", bt), asl("cache_seqlens", sl),
        ameta("tile_scheduler_metadata", meta), asplits("num_splits", splits);
    OptionalArg adq("descale_q", descale_q), adk("descale_k", descale_k);
    DecodeInputs in(aq.v, ak.v, abt.v, asl.v, head_dim_v, &ameta.v, &asplits.v, softmax_scale, adq.view(), adk.view());
    if (check_device) common_cuda_device({&aq.v, &ak.v, &abt.v, &asl.v, &ameta.v, &asplits.v, adq.view(), adk.view()});
    const auto& p = in.params;
    return std::make_tuple(p.batch, p.seqlen_q, p.num_heads_q, p.num_heads_kv, in.workspace_splits());
  }, nb::arg("q"), nb::arg("k_cache"), nb::arg("block_table"), nb::arg("cache_seqlens"), nb::arg("head_dim_v"),
     nb::arg("tile_scheduler_metadata"), nb::arg("num_splits"), nb::arg("softmax_scale"),
     nb::arg("check_device") = true, nb::arg("descale_q").none() = nb::none(), nb::arg("descale_k").none() = nb::none(),
     "Checks the inputs of a decode call; returns (batch, s_q, h_q, h_kv, workspace_splits).\n"
     "check_device=False skips the device check (mla_decode checks devices after the outputs).");

  m.def("mla_decode", [](nb::handle q, nb::handle k, nb::handle bt, nb::handle sl, int64_t head_dim_v, nb::handle meta,
                         nb::handle splits, nb::handle out_h, nb::handle lse_h, nb::handle o_accum_h,
                         nb::handle lse_accum_h, double softmax_scale, bool causal, int kernel, uintptr_t stream,
                         nb::handle descale_q, nb::handle descale_k) {
    Arg aq("q", q), ak("k_cache", k), abt("block_table", bt), asl("cache_seqlens", sl),
        ameta("tile_scheduler_metadata", meta), asplits("num_splits", splits);
    OptionalArg adq("descale_q", descale_q), adk("descale_k", descale_k);
    DecodeInputs in(aq.v, ak.v, abt.v, asl.v, head_dim_v, &ameta.v, &asplits.v, softmax_scale, adq.view(), adk.view());
    auto& p = in.params;
    Arg out("out", out_h, true), lse("lse", lse_h, true), o_accum("o_accum", o_accum_h, true),
        lse_accum("lse_accum", lse_accum_h, true);
    const int64_t rows = in.rows();
    check_out(out.v, p);
    check_lse(lse.v, p);
    const View& oa = o_accum.v;
    const View& la = lse_accum.v;
    oa.dtype_in({DT::kFP32}, "float32");
    oa.rank(3, "(splits, s_q * h_q, 512)");
    if (oa.size(0) < in.workspace_splits()) {
      value_error("o_accum: needs at least " + std::to_string(in.workspace_splits()) + " splits (dim 0)");
    }
    oa.dim(1, rows, "s_q * h_q");
    oa.dim(2, kHeadDimV, "head_dim_v");
    oa.contiguous();
    la.dtype_in({DT::kFP32}, "float32");
    la.rank(2, "(splits, s_q * h_q)");
    la.dim(0, oa.size(0), "splits of o_accum");
    la.dim(1, rows, "s_q * h_q");
    la.contiguous();
    if (!out.v.aligned(16)) value_error("out: must be 16-byte aligned");
    if (!oa.aligned(16)) value_error("o_accum: must be 16-byte aligned");
    if (!lse.v.aligned(4) || !la.aligned(4)) value_error("lse, lse_accum: must be 4-byte aligned");
    const int device = common_cuda_device(
        {&aq.v, &ak.v, &abt.v, &asl.v, &ameta.v, &asplits.v, &out.v, &lse.v, &oa, &la, adq.view(), adk.view()});
    p.out = out.v.data;
    p.lse = static_cast<float*>(lse.v.data);
    p.o_accum = static_cast<float*>(oa.data);
    p.lse_accum = static_cast<float*>(la.data);
    p.max_splits = oa.size(0);
    p.causal = causal;
    p.kernel = kernel_choice(kernel);
    p.stream = reinterpret_cast<cudaStream_t>(stream);
    DeviceGuard guard(device);
    raise_if_failed(flash_mla_ext::run_decode(p));
  }, nb::arg("q"), nb::arg("k_cache"), nb::arg("block_table"), nb::arg("cache_seqlens"), nb::arg("head_dim_v"),
     nb::arg("tile_scheduler_metadata"), nb::arg("num_splits"), nb::arg("out"), nb::arg("lse"), nb::arg("o_accum"),
     nb::arg("lse_accum"), nb::arg("softmax_scale"), nb::arg("causal"), nb::arg("kernel"), nb::arg("stream"),
     nb::arg("descale_q").none() = nb::none(), nb::arg("descale_k").none() = nb::none());

  m.def("sparse_decode", [](nb::handle q, nb::handle k, nb::handle idx, nb::handle tl, nb::handle ek, nb::handle eidx,
                            nb::handle etl, nb::handle sink, nb::handle plan, nb::handle meta, nb::handle splits,
                            nb::handle out_h, nb::handle lse_h, nb::handle o_accum_h, nb::handle lse_accum_h,
                            double softmax_scale, bool is_fp8, int kernel, uintptr_t stream) {
    Arg aq("q", q), ak("k_cache", k), aidx("indices", idx);
    OptionalArg atl("topk_length", tl), aek("extra_k_cache", ek), aeidx("extra_indices_in_kvcache", eidx),
        aetl("extra_topk_length", etl), asink("attn_sink", sink);
    // One-byte caches (uint8 / int8, as engines allocate them) are FP8 bytes with is_fp8.
    const auto as_fp8 = [is_fp8](View v) {
      if (is_fp8 && v.dtype == DT::kOther && (v.other_dtype == "uint8" || v.other_dtype == "int8")) v.dtype = DT::kFP8;
      return v;
    };
    const View kv = as_fp8(ak.v);
    View ekv;
    if (aek.view() != nullptr) ekv = as_fp8(*aek.view());
    SparseInputs in(aq.v, kv, aidx.v, atl.view(), aek.view() != nullptr ? &ekv : nullptr, aeidx.view(), aetl.view(),
                    asink.view(), kHeadDimV, softmax_scale, is_fp8);
    Arg aplan("plan_seqlens", plan), ameta("tile_scheduler_metadata", meta), asplits("num_splits", splits);
    in.take_plan(aplan.v, ameta.v, asplits.v);
    Arg out("out", out_h, true), lse("lse", lse_h, true), o_accum("o_accum", o_accum_h, true),
        lse_accum("lse_accum", lse_accum_h, true);
    auto& p = in.params;
    in.check_out(out.v);
    lse.v.dtype_in({DT::kFP32}, "float32");
    lse.v.rank(3, "(batch, s_q, h_q)");
    lse.v.dim(0, p.batch, "batch");
    lse.v.dim(1, p.seqlen_q, "s_q");
    lse.v.dim(2, p.num_heads_q, "h_q");
    lse.v.contiguous();
    const View& oa = o_accum.v;
    const View& la = lse_accum.v;
    oa.dtype_in({DT::kFP32}, "float32");
    oa.rank(3, "(splits, h_q, 512)");
    if (oa.size(0) < in.workspace_splits()) {
      value_error("o_accum: needs at least " + std::to_string(in.workspace_splits()) + " splits (dim 0)");
    }
    oa.dim(1, p.num_heads_q, "h_q");
    oa.dim(2, kHeadDimV, "head_dim_v");
    oa.contiguous();
    la.dtype_in({DT::kFP32}, "float32");
    la.rank(2, "(splits, h_q)");
    la.dim(0, oa.size(0), "splits of o_accum");
    la.dim(1, p.num_heads_q, "h_q");
    la.contiguous();
    if (!oa.aligned(16)) value_error("o_accum: must be 16-byte aligned");
    if (!lse.v.aligned(4) || !la.aligned(4)) value_error("lse, lse_accum: must be 4-byte aligned");
    const int device = common_cuda_device({&aq.v, &kv, &aidx.v, atl.view(), aek.view(), aeidx.view(), aetl.view(),
                                           asink.view(), &aplan.v, &ameta.v, &asplits.v, &out.v, &lse.v, &oa, &la});
    p.out = out.v.data;
    p.lse = static_cast<float*>(lse.v.data);
    p.o_accum = static_cast<float*>(oa.data);
    p.lse_accum = static_cast<float*>(la.data);
    p.max_splits = oa.size(0);
    in.launch(kernel, reinterpret_cast<cudaStream_t>(stream), device);
  }, nb::arg("q"), nb::arg("k_cache"), nb::arg("indices"), nb::arg("topk_length").none(),
     nb::arg("extra_k_cache").none(), nb::arg("extra_indices_in_kvcache").none(), nb::arg("extra_topk_length").none(),
     nb::arg("attn_sink").none(), nb::arg("plan_seqlens"), nb::arg("tile_scheduler_metadata"), nb::arg("num_splits"),
     nb::arg("out"), nb::arg("lse"), nb::arg("o_accum"), nb::arg("lse_accum"), nb::arg("softmax_scale"),
     nb::arg("is_fp8_kvcache"), nb::arg("kernel"), nb::arg("stream"),
     "Token-sparse decode on DLPack arrays into caller-provided out / lse (batch, s_q, h_q) and workspace.");

  // ---- the torch path (flash_mla._torch_ops): tensors read without DLPack ----

  m.def("torch_setup", [](nb::handle tensor_type, nb::handle parameter_type, nb::handle bf16, nb::handle fp16,
                          nb::handle fp32, nb::handle i32, nb::handle i64, nb::handle to_dlpack, nb::handle fp8) {
    if (!PyType_Check(tensor_type.ptr()) || !PyType_Check(parameter_type.ptr())) {
      type_error("torch_setup: expected torch.Tensor and torch.nn.Parameter");
    }
    // Kept for the life of the process (see TorchApi).
    const auto keep = [](nb::handle h) {
      Py_INCREF(h.ptr());
      return h.ptr();
    };
    g_torch.parameter = reinterpret_cast<PyTypeObject*>(keep(parameter_type));
    g_torch.to_dlpack = to_dlpack.is_none() ? nullptr : keep(to_dlpack);
    PyObject* dtypes[kKnownDTypes] = {keep(bf16), keep(fp16), keep(fp32), keep(i32), keep(i64), nullptr};
    if (!fp8.is_none()) dtypes[static_cast<int>(DT::kFP8)] = keep(fp8);
    for (int i = 0; i < kKnownDTypes; ++i) g_torch.dtypes[i] = dtypes[i];
    const auto intern = [](const char* s) {
      PyObject* o = PyUnicode_InternFromString(s);
      if (o == nullptr) throw nb::python_error();
      return o;
    };
    g_torch.s_shape = intern("shape");
    g_torch.s_stride = intern("stride");
    g_torch.s_data_ptr = intern("data_ptr");
    g_torch.s_dtype = intern("dtype");
    g_torch.s_is_cuda = intern("is_cuda");
    g_torch.s_get_device = intern("get_device");
    g_torch.s_requires_grad = intern("requires_grad");
    g_torch.s_device = intern("device");
    g_torch.s_type = intern("type");
    g_torch.tensor = reinterpret_cast<PyTypeObject*>(keep(tensor_type));  // last: marks the API ready
  }, nb::arg("tensor_type"), nb::arg("parameter_type"), nb::arg("bfloat16"), nb::arg("float16"), nb::arg("float32"),
     nb::arg("int32"), nb::arg("int64"), nb::arg("to_dlpack").none(), nb::arg("float8_e4m3fn").none() = nb::none(),
     "Hands torch's Tensor types, dtypes and (optional, None: attributes only) its C-level DLPack\n"
     "exporter to the torch entry points (called once by flash_mla._torch_ops).");

  m.def("torch_decode", &torch_decode, nb::arg("q"), nb::arg("k_cache"), nb::arg("block_table"),
        nb::arg("cache_seqlens"), nb::arg("head_dim_v"), nb::arg("tile_scheduler_metadata"), nb::arg("num_splits"),
        nb::arg("out").none(), nb::arg("lse").none(), nb::arg("softmax_scale"), nb::arg("causal"), nb::arg("kernel"),
        nb::arg("prepare"), nb::arg("descale_q").none() = nb::none(), nb::arg("descale_k").none() = nb::none(),
        "Decode on torch tensors: checks everything once, calls prepare() for the missing outputs, the\n"
        "workspace and the stream, launches. Returns (out, lse), or None for arguments that are not\n"
        "plain torch.Tensors.");

  m.def("torch_check_decode", &torch_check_decode, nb::arg("q"), nb::arg("k_cache"), nb::arg("block_table"),
        nb::arg("cache_seqlens"), nb::arg("head_dim_v"), nb::arg("tile_scheduler_metadata").none(),
        nb::arg("num_splits").none(), nb::arg("softmax_scale"), nb::arg("check_device") = true,
        nb::arg("descale_q").none() = nb::none(), nb::arg("descale_k").none() = nb::none(),
        "The checks of torch_decode; returns (batch, s_q, h_q, h_kv, workspace_splits).");

  m.def("torch_sparse_decode", &torch_sparse_decode, nb::arg("q"), nb::arg("k_cache"), nb::arg("indices"),
        nb::arg("topk_length").none(), nb::arg("extra_k_cache").none(), nb::arg("extra_indices_in_kvcache").none(),
        nb::arg("extra_topk_length").none(), nb::arg("attn_sink").none(), nb::arg("head_dim_v"),
        nb::arg("softmax_scale"), nb::arg("is_fp8_kvcache"), nb::arg("plan_seqlens").none(),
        nb::arg("tile_scheduler_metadata").none(), nb::arg("num_splits").none(), nb::arg("out").none(),
        nb::arg("lse").none(), nb::arg("kernel"), nb::arg("prepare").none(),
        "Token-sparse decode on torch tensors. Without plan_seqlens: the checks only, returning\n"
        "(batch, s_q, h_q, keys per query token). Otherwise checks, prepare(), launch; returns (out, lse).");

  m.def("torch_get_mla_metadata", &torch_get_mla_metadata, nb::arg("cache_seqlens"), nb::arg("num_heads_per_head_k"),
        nb::arg("num_heads_k"), nb::arg("prepare"),
        "Scheduler metadata on a torch tensor: checks, prepare() for the outputs and stream, launch.\n"
        "Returns (tile_scheduler_metadata, num_splits), or None when cache_seqlens is not a plain torch.Tensor.");

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
                                 uintptr_t stream, int64_t page_size) {
    Arg abt("block_table", bt_h), asl("cache_seqlens", sl_h), ares("result", result_h, true);
    const View &block_table = abt.v, &seqlens = asl.v, &result = ares.v;
    block_table.dtype_in({DT::kI32}, "int32");
    block_table.rank(2, "(batch, max_blocks_per_seq)");
    block_table.last_dim_contiguous();
    check_seqlens(seqlens);
    seqlens.dim(0, block_table.size(0), "batch (block_table rows)");
    if (num_blocks < 0 || num_blocks > INT32_MAX) {
      value_error("num_blocks: must be in [0, 2^31 - 1], got " + std::to_string(num_blocks));
    }
    if (page_size > 256 || !flash_mla::is_supported_page_size(static_cast<int>(page_size))) {
      value_error("page_size: must be one of 16, 32, 64, 128, 256, got " + std::to_string(page_size));
    }
    result.dtype_in({DT::kI64}, "int64");
    result.rank(1, "(8,)");
    result.dim(0, flash_mla::kInputCheckWords, "length");
    result.contiguous();
    if (!result.aligned(8)) value_error("result: must be 8-byte aligned");
    const int device = common_cuda_device({&block_table, &seqlens, &result});
    flash_mla::InputCheckParams p;
    p.block_table = static_cast<const int32_t*>(block_table.data);
    p.block_table_stride = block_table.stride(0);
    p.cache_seqlens = static_cast<const int32_t*>(seqlens.data);
    p.batch = seqlens.size(0);
    p.max_blocks_per_seq = block_table.size(1);
    p.num_blocks = static_cast<int>(num_blocks);
    p.page_size = static_cast<int>(page_size);
    p.result = static_cast<int64_t*>(result.data);
    p.stream = reinterpret_cast<cudaStream_t>(stream);
    DeviceGuard guard(device);
    raise_if_failed(flash_mla_ext::run_input_check(p));
  }, nb::arg("block_table"), nb::arg("cache_seqlens"), nb::arg("num_blocks"), nb::arg("result"), nb::arg("stream"),
     nb::arg("page_size") = 64,
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
    return sm_count(device);
  }, nb::arg("device") = -1, "Number of SMs of a CUDA device (-1: the current device).");
}
