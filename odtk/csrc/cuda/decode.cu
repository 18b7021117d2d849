// Per-level decode: score threshold, top-n by score, anchor deltas -> boxes (odtk.box.decode on the GPU).
#include <algorithm>
#include <stdexcept>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_select.cuh>
#include <thrust/iterator/counting_iterator.h>

#include "kernels.h"
#include "workspace.h"

namespace odtk {
namespace cuda {
namespace {

struct AboveThreshold {
  const float* scores;
  float threshold;
  __device__ bool operator()(int i) const { return scores[i] > threshold; }
};

__global__ void gather_scores(const float* scores, const int* indices, const int* count, float* out) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < *count) out[i] = scores[indices[i]];
}

// Box arithmetic in the same order and rounding as odtk.box.grid_anchors + delta2box (no FMA contraction),
// so the GPU boxes equal PyTorch's up to expf's last bits.
__global__ void decode_boxes(const float* sorted_scores, const int* sorted_indices, int kept, const float* deltas,
                             const float* cell_anchors, int num_classes, int height, int width, float stride,
                             int image_h, int image_w, int top_n, float* out_scores, float* out_boxes,
                             float* out_classes) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= top_n) return;
  float4* box_out = reinterpret_cast<float4*>(out_boxes) + i;
  if (i >= kept) {
    out_scores[i] = 0.f;
    out_classes[i] = 0.f;
    *box_out = make_float4(0.f, 0.f, 0.f, 0.f);
    return;
  }
  int pixels = height * width;
  int idx = sorted_indices[i];        // memory index in [A*C, H, W]
  int channel = idx / pixels, pixel = idx % pixels;
  int a = channel / num_classes, c = channel % num_classes;
  float sx = __fmul_rn(static_cast<float>(pixel % width), stride);
  float sy = __fmul_rn(static_cast<float>(pixel / width), stride);
  const float* cell = cell_anchors + 4 * a;
  float ax1 = __fadd_rn(sx, cell[0]), ay1 = __fadd_rn(sy, cell[1]);
  float ax2 = __fadd_rn(sx, cell[2]), ay2 = __fadd_rn(sy, cell[3]);
  float aw = __fsub_rn(ax2, ax1), ah = __fsub_rn(ay2, ay1);
  const float* d = deltas + 4 * a * pixels + pixel;
  float dx = d[0], dy = d[pixels], dw = d[2 * pixels], dh = d[3 * pixels];
  float cx = __fadd_rn(__fadd_rn(ax1, __fmul_rn(0.5f, aw)), __fmul_rn(dx, aw));
  float cy = __fadd_rn(__fadd_rn(ay1, __fmul_rn(0.5f, ah)), __fmul_rn(dy, ah));
  float w = __fmul_rn(expf(fminf(dw, kBoxXformClip)), aw);
  float h = __fmul_rn(expf(fminf(dh, kBoxXformClip)), ah);
  float x1 = __fsub_rn(cx, __fmul_rn(0.5f, w)), y1 = __fsub_rn(cy, __fmul_rn(0.5f, h));
  float x2 = __fadd_rn(cx, __fmul_rn(0.5f, w)), y2 = __fadd_rn(cy, __fmul_rn(0.5f, h));
  if (image_h > 0 && image_w > 0) {
    float fw = static_cast<float>(image_w), fh = static_cast<float>(image_h);
    x1 = fminf(fmaxf(x1, 0.f), fw);
    y1 = fminf(fmaxf(y1, 0.f), fh);
    x2 = fminf(fmaxf(x2, 0.f), fw);
    y2 = fminf(fmaxf(y2, 0.f), fh);
  }
  out_scores[i] = sorted_scores[i];
  out_classes[i] = static_cast<float>(c);
  *box_out = make_float4(x1, y1, x2, y2);
}

}  // namespace

size_t decode(int batch, const float* scores, const float* boxes, const float* cell_anchors, int num_anchors,
              int num_classes, int height, int width, float stride, float threshold, int top_n, int image_h,
              int image_w, float* out_scores, float* out_boxes, float* out_classes, void* workspace,
              size_t workspace_size, cudaStream_t stream) {
  const int n = num_anchors * num_classes * height * width;
  Workspace ws(workspace);
  int* indices = ws.take<int>(n);
  int* sorted_indices = ws.take<int>(n);
  float* keys = ws.take<float>(n);
  float* sorted_keys = ws.take<float>(n);
  int* count = ws.take<int>(1);
  // CUB's temporary storage for the largest problem (all n candidates) serves every smaller one
  thrust::counting_iterator<int> iota(0);
  size_t select_bytes = 0, sort_bytes = 0;
  check(cub::DeviceSelect::If(nullptr, select_bytes, iota, indices, count, n, AboveThreshold{scores, threshold},
                              stream), "odtk decode: select size");
  check(cub::DeviceRadixSort::SortPairsDescending(nullptr, sort_bytes, keys, sorted_keys, indices, sorted_indices,
                                                  n, 0, 32, stream), "odtk decode: sort size");
  void* select_tmp = ws.bytes(select_bytes);
  void* sort_tmp = ws.bytes(sort_bytes);
  if (ws.sizing()) return ws.used();
  if (workspace_size < ws.used()) throw std::invalid_argument("odtk decode: workspace too small");

  const int threads = 256;
  const size_t per_image = static_cast<size_t>(n);
  for (int b = 0; b < batch; ++b) {
    const float* image_scores = scores + b * per_image;
    check(cub::DeviceSelect::If(select_tmp, select_bytes, iota, indices, count, n,
                                AboveThreshold{image_scores, threshold}, stream), "odtk decode: select");
    int kept = 0;
    check(cudaMemcpyAsync(&kept, count, sizeof(int), cudaMemcpyDeviceToHost, stream),
          "odtk decode: count copy");
    check(cudaStreamSynchronize(stream), "odtk decode: count sync");
    if (kept > 0) {
      gather_scores<<<(kept + threads - 1) / threads, threads, 0, stream>>>(image_scores, indices, count, keys);
      check(cub::DeviceRadixSort::SortPairsDescending(sort_tmp, sort_bytes, keys, sorted_keys, indices,
                                                      sorted_indices, kept, 0, 32, stream),
            "odtk decode: sort");
    }
    decode_boxes<<<(top_n + threads - 1) / threads, threads, 0, stream>>>(
        sorted_keys, sorted_indices, std::min(kept, top_n), boxes + b * static_cast<size_t>(num_anchors) * 4 *
        height * width, cell_anchors, num_classes, height, width, stride, image_h, image_w, top_n,
        out_scores + b * top_n, out_boxes + b * top_n * 4, out_classes + b * top_n);
    check(cudaGetLastError(), "odtk decode: decode kernel");
  }
  return 0;
}

}  // namespace cuda
}  // namespace odtk
