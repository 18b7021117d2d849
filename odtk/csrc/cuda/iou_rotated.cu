// The IoU matrix of two sets of rotated boxes (odtk.rotated.rotated_box_iou on the GPU).
#include <algorithm>
#include <stdexcept>

#include "kernels.h"
#include "rotated.h"
#include "workspace.h"

namespace odtk {
namespace cuda {
namespace {

// Each box's corners, area and reach, once (the pair kernel would otherwise take N*M sines and cosines).
__global__ void make_quads(const float* boxes, int count, rotated::Quad* quads) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) quads[i] = rotated::make_quad(boxes + 5 * static_cast<size_t>(i));
}

// One thread per pair, row-major: consecutive threads share a row of `a` and read consecutive boxes of `b`.
__global__ void iou_pairs(const rotated::Quad* a, const rotated::Quad* b, int n, int m, float* out) {
  const size_t pairs = static_cast<size_t>(n) * m;
  for (size_t k = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; k < pairs;
       k += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[k] = rotated::iou(a[k / m], b[k % m]);
}

}  // namespace

size_t iou_rotated(int n, const float* a, int m, const float* b, float* out, void* workspace, size_t workspace_size,
                   cudaStream_t stream) {
  Workspace ws(workspace);
  auto* quads_a = ws.take<rotated::Quad>(n);
  auto* quads_b = ws.take<rotated::Quad>(m);
  if (ws.sizing()) return ws.used();
  if (workspace_size < ws.used()) throw std::invalid_argument("odtk iou_rotated: workspace too small");
  if (n == 0 || m == 0) return 0;

  const int threads = 256;
  make_quads<<<(n + threads - 1) / threads, threads, 0, stream>>>(a, n, quads_a);
  make_quads<<<(m + threads - 1) / threads, threads, 0, stream>>>(b, m, quads_b);
  // a grid-stride loop: enough blocks to fill any GPU, without one thread per pair of a huge matrix
  const size_t pairs = static_cast<size_t>(n) * m;
  const int blocks = static_cast<int>(std::min<size_t>((pairs + threads - 1) / threads, 65536));
  iou_pairs<<<blocks, threads, 0, stream>>>(quads_a, quads_b, n, m, out);
  check(cudaGetLastError(), "odtk iou_rotated: iou kernel");
  return 0;
}

}  // namespace cuda
}  // namespace odtk
