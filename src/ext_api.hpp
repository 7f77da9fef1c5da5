// The compiled half of the extension (kernels.cu, nvcc) as seen by the bindings (g++):
// plain functions over the structs of flash_mla/params.hpp.
#pragma once

#include <string>

#include <flash_mla/params.hpp>

namespace flash_mla_ext {

flash_mla::Status run_metadata(const flash_mla::MetadataParams& params);
flash_mla::Status run_decode(const flash_mla::DecodeParams& params);
flash_mla::Status run_sparse_decode(const flash_mla::SparseDecodeParams& params);
flash_mla::Status kernel_name(int device, flash_mla::KernelChoice choice, std::string* name);
flash_mla::Status run_input_check(const flash_mla::InputCheckParams& params);

}  // namespace flash_mla_ext
