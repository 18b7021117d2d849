// Helpers of the kernels' host code: CUDA error checks and workspace carving.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

namespace odtk {
namespace cuda {

// Throws "<what>: <CUDA's message>" on an error (plugins turn it into a failed enqueue, torch ops into a Python error).
inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// Carves one workspace buffer into aligned pieces; with a null base it only adds up the sizes.
class Workspace {
 public:
  explicit Workspace(void* base) : base_(static_cast<char*>(base)) {}

  // The next `count` elements of T, 256-byte aligned (what cudaMalloc gives and CUB expects).
  template <typename T>
  T* take(size_t count) {
    size_t bytes = (count * sizeof(T) + kAlign - 1) / kAlign * kAlign;
    T* ptr = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += bytes;
    return ptr;
  }
  // Raw bytes (CUB temporary storage).
  void* bytes(size_t count) { return take<char>(count); }
  size_t used() const { return used_; }
  bool sizing() const { return base_ == nullptr; }

 private:
  static constexpr size_t kAlign = 256;
  char* base_;
  size_t used_ = 0;
};

}  // namespace cuda
}  // namespace odtk
