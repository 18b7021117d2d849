// Carves one workspace buffer into aligned pieces; with a null base it only adds up the sizes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace odtk {
namespace cuda {

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
