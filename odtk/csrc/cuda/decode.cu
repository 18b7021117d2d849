// Per-level decode: score threshold, top-n by score, anchor deltas -> boxes (odtk.box.decode on the GPU), and the
// same for rotated boxes (odtk.rotated.decode_rotated: 6 deltas per anchor, boxes (x1, y1, x2, y2, theta)).
// Candidates are ordered as odtk.box.top_k orders them: score descending, then flat anchor index ascending.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

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

// The sort key of a candidate: its score's bits above the bitwise complement of its flat anchor index. Scores are
// positive, so their bits order like the floats; one descending sort then gives odtk's order (odtk.box.top_k):
// score descending, then flat index ((y * W + x) * A + a) * C + c ascending. The key alone holds both.
__global__ void make_keys(const float* scores, const int* indices, const int* count, int pixels, int per_pixel,
                          unsigned long long* keys) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= *count) return;
  int idx = indices[i];               // memory index in [A*C, H, W]: channel * pixels + pixel
  unsigned flat = static_cast<unsigned>((idx % pixels) * per_pixel + idx / pixels);
  keys[i] = (static_cast<unsigned long long>(__float_as_uint(scores[idx])) << 32) | (~flat & 0xffffffffull);
}

// Box arithmetic in the same order and rounding as odtk.box.grid_anchors + delta2box (no FMA contraction),
// so the GPU boxes equal PyTorch's up to expf's last bits. Rotated: anchors (x1, y1, x2, y2, theta), deltas
// (dx, dy, dw, dh, sin, cos), the same arithmetic for the box before rotation, theta = atan2(sin, cos) + the
// anchor's theta, and the image clip moves the centre into the image (odtk.rotated.delta2box_rotated).
template <bool Rotated>
__global__ void decode_boxes(const unsigned long long* sorted_keys, int kept, const float* deltas,
                             const float* cell_anchors, int num_anchors, int num_classes, int height, int width,
                             float stride, int image_h, int image_w, int top_n, float* out_scores, float* out_boxes,
                             float* out_classes) {
  constexpr int kAnchor = Rotated ? 5 : 4, kDeltas = Rotated ? 6 : 4;
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= top_n) return;
  float* box_out = out_boxes + static_cast<size_t>(i) * kAnchor;   // a box has as many values as an anchor
  if (i >= kept) {
    out_scores[i] = 0.f;
    out_classes[i] = 0.f;
    for (int k = 0; k < kAnchor; ++k) box_out[k] = 0.f;
    return;
  }
  unsigned long long key = sorted_keys[i];
  int flat = static_cast<int>(~static_cast<unsigned>(key & 0xffffffffull));
  int per_pixel = num_anchors * num_classes, pixels = height * width;
  int pixel = flat / per_pixel, channel = flat % per_pixel;
  int a = channel / num_classes, c = channel % num_classes;
  float sx = __fmul_rn(static_cast<float>(pixel % width), stride);
  float sy = __fmul_rn(static_cast<float>(pixel / width), stride);
  const float* cell = cell_anchors + kAnchor * a;
  float ax1 = __fadd_rn(sx, cell[0]), ay1 = __fadd_rn(sy, cell[1]);
  float ax2 = __fadd_rn(sx, cell[2]), ay2 = __fadd_rn(sy, cell[3]);
  float aw = __fsub_rn(ax2, ax1), ah = __fsub_rn(ay2, ay1);
  const float* d = deltas + kDeltas * a * pixels + pixel;
  float dx = d[0], dy = d[pixels], dw = d[2 * pixels], dh = d[3 * pixels];
  float cx = __fadd_rn(__fadd_rn(ax1, __fmul_rn(0.5f, aw)), __fmul_rn(dx, aw));
  float cy = __fadd_rn(__fadd_rn(ay1, __fmul_rn(0.5f, ah)), __fmul_rn(dy, ah));
  float w = __fmul_rn(expf(fminf(dw, kBoxXformClip)), aw);
  float h = __fmul_rn(expf(fminf(dh, kBoxXformClip)), ah);
  float x1 = __fsub_rn(cx, __fmul_rn(0.5f, w)), y1 = __fsub_rn(cy, __fmul_rn(0.5f, h));
  float x2 = __fadd_rn(cx, __fmul_rn(0.5f, w)), y2 = __fadd_rn(cy, __fmul_rn(0.5f, h));
  if (image_h > 0 && image_w > 0) {
    float fw = static_cast<float>(image_w), fh = static_cast<float>(image_h);
    if constexpr (Rotated) {
      // the centre moves into the image, the size stays: clipping the corners would change a rotated shape
      float mx = __fmul_rn(0.5f, __fadd_rn(x1, x2)), my = __fmul_rn(0.5f, __fadd_rn(y1, y2));
      float shift_x = __fsub_rn(fminf(fmaxf(mx, 0.f), fw), mx), shift_y = __fsub_rn(fminf(fmaxf(my, 0.f), fh), my);
      x1 = __fadd_rn(x1, shift_x);
      y1 = __fadd_rn(y1, shift_y);
      x2 = __fadd_rn(x2, shift_x);
      y2 = __fadd_rn(y2, shift_y);
    } else {
      x1 = fminf(fmaxf(x1, 0.f), fw);
      y1 = fminf(fmaxf(y1, 0.f), fh);
      x2 = fminf(fmaxf(x2, 0.f), fw);
      y2 = fminf(fmaxf(y2, 0.f), fh);
    }
  }
  out_scores[i] = __uint_as_float(static_cast<unsigned>(key >> 32));
  out_classes[i] = static_cast<float>(c);
  if constexpr (Rotated) {
    box_out[0] = x1;
    box_out[1] = y1;
    box_out[2] = x2;
    box_out[3] = y2;
    box_out[4] = __fadd_rn(atan2f(d[4 * pixels], d[5 * pixels]), cell[4]);
  } else {
    *reinterpret_cast<float4*>(box_out) = make_float4(x1, y1, x2, y2);
  }
}

template <bool Rotated>
size_t decode_level(int batch, const float* scores, const float* boxes, const float* cell_anchors, int num_anchors,
                    int num_classes, int height, int width, float stride, float threshold, int top_n, int image_h,
                    int image_w, float* out_scores, float* out_boxes, float* out_classes, void* workspace,
                    size_t workspace_size, cudaStream_t stream) {
  constexpr int kBox = Rotated ? 5 : 4, kDeltas = Rotated ? 6 : 4;
  const int n = num_anchors * num_classes * height * width;
  const size_t per_image = static_cast<size_t>(n);
  Workspace ws(workspace);
  int* indices = ws.take<int>(per_image * batch);   // each image's candidates: all are selected before one sync
  int* counts = ws.take<int>(batch);
  unsigned long long* keys = ws.take<unsigned long long>(per_image);   // sorted image after image: reused
  unsigned long long* sorted_keys = ws.take<unsigned long long>(per_image);
  // CUB's temporary storage for the largest problem (all n candidates) serves every smaller one
  thrust::counting_iterator<int> iota(0);
  size_t select_bytes = 0, sort_bytes = 0;
  check(cub::DeviceSelect::If(nullptr, select_bytes, iota, indices, counts, n, AboveThreshold{scores, threshold},
                              stream), "odtk decode: select size");
  check(cub::DeviceRadixSort::SortKeysDescending(nullptr, sort_bytes, keys, sorted_keys, n, 0, 64, stream),
        "odtk decode: sort size");
  void* select_tmp = ws.bytes(select_bytes);
  void* sort_tmp = ws.bytes(sort_bytes);
  if (ws.sizing()) return ws.used();
  if (workspace_size < ws.used()) throw std::invalid_argument("odtk decode: workspace too small");

  const int threads = 256;
  for (int b = 0; b < batch; ++b) {
    check(cub::DeviceSelect::If(select_tmp, select_bytes, iota, indices + b * per_image, counts + b, n,
                                AboveThreshold{scores + b * per_image, threshold}, stream), "odtk decode: select");
  }
  // the sorts need each image's candidate count on the host: one copy and one synchronisation for the batch
  std::vector<int> kept(batch);
  check(cudaMemcpyAsync(kept.data(), counts, batch * sizeof(int), cudaMemcpyDeviceToHost, stream),
        "odtk decode: count copy");
  check(cudaStreamSynchronize(stream), "odtk decode: count sync");
  for (int b = 0; b < batch; ++b) {
    if (kept[b] > 0) {
      make_keys<<<(kept[b] + threads - 1) / threads, threads, 0, stream>>>(
          scores + b * per_image, indices + b * per_image, counts + b, height * width, num_anchors * num_classes,
          keys);
      check(cub::DeviceRadixSort::SortKeysDescending(sort_tmp, sort_bytes, keys, sorted_keys, kept[b], 0, 64,
                                                     stream), "odtk decode: sort");
    }
    decode_boxes<Rotated><<<(top_n + threads - 1) / threads, threads, 0, stream>>>(
        sorted_keys, std::min(kept[b], top_n),
        boxes + b * static_cast<size_t>(num_anchors) * kDeltas * height * width, cell_anchors, num_anchors,
        num_classes, height, width, stride, image_h, image_w, top_n, out_scores + b * top_n,
        out_boxes + static_cast<size_t>(b) * top_n * kBox, out_classes + b * top_n);
    check(cudaGetLastError(), "odtk decode: decode kernel");
  }
  return 0;
}

}  // namespace

size_t decode(int batch, const float* scores, const float* boxes, const float* cell_anchors, int num_anchors,
              int num_classes, int height, int width, float stride, float threshold, int top_n, int image_h,
              int image_w, float* out_scores, float* out_boxes, float* out_classes, void* workspace,
              size_t workspace_size, cudaStream_t stream) {
  return decode_level<false>(batch, scores, boxes, cell_anchors, num_anchors, num_classes, height, width, stride,
                             threshold, top_n, image_h, image_w, out_scores, out_boxes, out_classes, workspace,
                             workspace_size, stream);
}

size_t decode_rotated(int batch, const float* scores, const float* boxes, const float* cell_anchors,
                      int num_anchors, int num_classes, int height, int width, float stride, float threshold,
                      int top_n, int image_h, int image_w, float* out_scores, float* out_boxes, float* out_classes,
                      void* workspace, size_t workspace_size, cudaStream_t stream) {
  return decode_level<true>(batch, scores, boxes, cell_anchors, num_anchors, num_classes, height, width, stride,
                            threshold, top_n, image_h, image_w, out_scores, out_boxes, out_classes, workspace,
                            workspace_size, stream);
}

}  // namespace cuda
}  // namespace odtk
