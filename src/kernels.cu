// Instantiates the header-only kernels once for the extension module.
#include <flash_mla/flash_mla.hpp>
#include <flash_mla/input_check.cuh>

#include "ext_api.hpp"

namespace flash_mla_ext {

flash_mla::Status run_metadata(const flash_mla::MetadataParams& params) { return flash_mla::get_mla_metadata(params); }

flash_mla::Status run_decode(const flash_mla::DecodeParams& params) { return flash_mla::mla_decode(params); }

flash_mla::Status run_sparse_decode(const flash_mla::SparseDecodeParams& params) {
  return flash_mla::mla_decode_sparse(params);
}

flash_mla::Status run_input_check(const flash_mla::InputCheckParams& params) {
  return flash_mla::check_paged_inputs(params);
}

flash_mla::Status kernel_name(int device, flash_mla::KernelChoice choice, std::string* name) {
  flash_mla::KernelChoice resolved;
  flash_mla::Status st = flash_mla::resolve_kernel(choice, device, &resolved);
  if (st.ok()) *name = flash_mla::kernel_name(resolved);
  return st;
}

}  // namespace flash_mla_ext
