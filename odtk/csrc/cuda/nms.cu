// Class-aware greedy NMS per image (odtk.box.nms / torchvision.ops.batched_nms on the GPU), and the same on
// rotated boxes (odtk.rotated.nms_rotated).
#include <stdexcept>

#include <cub/device/device_radix_sort.cuh>

#include "kernels.h"
#include "rotated.h"
#include "workspace.h"

namespace odtk {
namespace cuda {
namespace {

__global__ void iota(int* out, int count) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) out[i] = i;
}

// How the NMS kernel reads and compares boxes. Axis-aligned: (x1, y1, x2, y2) as a float4, IoU as torchvision's
// nms kernel computes it (same operations, no FMA), so borderline overlaps are decided the same way.
struct AxisAligned {
  static constexpr int kValues = 4;
  using Box = float4;
  __device__ static Box load(const float* box) { return *reinterpret_cast<const float4*>(box); }
  __device__ static float iou(const Box& a, const Box& c) {
    float w = fmaxf(0.f, fminf(a.z, c.z) - fmaxf(a.x, c.x));
    float h = fmaxf(0.f, fminf(a.w, c.w) - fmaxf(a.y, c.y));
    float inter = __fmul_rn(w, h);
    float area_a = __fmul_rn(a.z - a.x, a.w - a.y);
    float area_c = __fmul_rn(c.z - c.x, c.w - c.y);
    return __fdiv_rn(inter, area_a + area_c - inter);
  }
};

// Rotated: (x1, y1, x2, y2, theta), kept as corners (rotated.h) so each box's sine and cosine are taken once.
struct Rotated {
  static constexpr int kValues = 5;
  using Box = rotated::Quad;
  __device__ static Box load(const float* box) { return rotated::make_quad(box); }
  __device__ static float iou(const Box& a, const Box& c) { return rotated::iou(a, c); }
};

// One block per image. Candidates are visited in score order; at step i every thread reads the same
// `removed[i]` (final since the previous barrier), so all threads agree on what is kept without shared state,
// and the threads split the later candidates to suppress.
template <typename Shape>
__global__ void nms_kernel(const float* sorted_scores, const int* sorted_indices, const float* boxes,
                           const float* classes, int count, float iou_threshold, int detections,
                           typename Shape::Box* sorted_boxes, float* sorted_classes, unsigned char* removed,
                           float* out_scores, float* out_boxes, float* out_classes) {
  constexpr int kValues = Shape::kValues;
  const int b = blockIdx.x;
  const size_t base = static_cast<size_t>(b) * count;
  sorted_scores += base;
  sorted_indices += base;
  sorted_boxes += base;
  sorted_classes += base;
  removed += base;
  const float* image_boxes = boxes + base * kValues;
  const float* image_classes = classes + base;
  out_scores += static_cast<size_t>(b) * detections;
  out_classes += static_cast<size_t>(b) * detections;
  out_boxes += static_cast<size_t>(b) * detections * kValues;

  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    int idx = sorted_indices[j];
    sorted_boxes[j] = Shape::load(image_boxes + static_cast<size_t>(idx) * kValues);
    sorted_classes[j] = image_classes[idx];
    removed[j] = 0;
  }
  __syncthreads();

  int kept = 0;
  for (int i = 0; i < count && kept < detections; ++i) {
    float score = sorted_scores[i];
    if (score <= 0.f) break;   // zero padding from decode sorts last
    if (!removed[i]) {
      const typename Shape::Box a = sorted_boxes[i];
      float cls = sorted_classes[i];
      if (threadIdx.x == 0) {
        out_scores[kept] = score;
        out_classes[kept] = cls;
        const float* in = image_boxes + static_cast<size_t>(sorted_indices[i]) * kValues;
        for (int k = 0; k < kValues; ++k) out_boxes[kept * kValues + k] = in[k];
      }
      ++kept;
      for (int j = i + 1 + threadIdx.x; j < count; j += blockDim.x) {
        if (removed[j] || sorted_classes[j] != cls) continue;
        if (Shape::iou(a, sorted_boxes[j]) > iou_threshold) removed[j] = 1;
      }
    }
    __syncthreads();
  }
  for (int j = kept + threadIdx.x; j < detections; j += blockDim.x) {
    out_scores[j] = 0.f;
    out_classes[j] = 0.f;
    for (int k = 0; k < kValues; ++k) out_boxes[j * kValues + k] = 0.f;
  }
}

template <typename Shape>
size_t nms_boxes(int batch, const float* scores, const float* boxes, const float* classes, int count,
                 float iou_threshold, int detections, float* out_scores, float* out_boxes, float* out_classes,
                 void* workspace, size_t workspace_size, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(batch) * count;
  Workspace ws(workspace);
  int* indices = ws.take<int>(count);
  int* sorted_indices = ws.take<int>(total);
  float* sorted_scores = ws.take<float>(total);
  auto* sorted_boxes = ws.take<typename Shape::Box>(total);
  float* sorted_classes = ws.take<float>(total);
  unsigned char* removed = ws.take<unsigned char>(total);
  size_t sort_bytes = 0;
  check(cub::DeviceRadixSort::SortPairsDescending(nullptr, sort_bytes, scores, sorted_scores, indices,
                                                  sorted_indices, count, 0, 32, stream), "odtk nms: sort size");
  void* sort_tmp = ws.bytes(sort_bytes);
  if (ws.sizing()) return ws.used();
  if (workspace_size < ws.used()) throw std::invalid_argument("odtk nms: workspace too small");

  const int threads = 512;
  iota<<<(count + threads - 1) / threads, threads, 0, stream>>>(indices, count);
  for (int b = 0; b < batch; ++b) {
    const size_t offset = static_cast<size_t>(b) * count;
    check(cub::DeviceRadixSort::SortPairsDescending(sort_tmp, sort_bytes, scores + offset, sorted_scores + offset,
                                                    indices, sorted_indices + offset, count, 0, 32, stream),
          "odtk nms: sort");
  }
  nms_kernel<Shape><<<batch, threads, 0, stream>>>(sorted_scores, sorted_indices, boxes, classes, count,
                                                   iou_threshold, detections, sorted_boxes, sorted_classes, removed,
                                                   out_scores, out_boxes, out_classes);
  check(cudaGetLastError(), "odtk nms: nms kernel");
  return 0;
}

}  // namespace

size_t nms(int batch, const float* scores, const float* boxes, const float* classes, int count,
           float iou_threshold, int detections, float* out_scores, float* out_boxes, float* out_classes,
           void* workspace, size_t workspace_size, cudaStream_t stream) {
  return nms_boxes<AxisAligned>(batch, scores, boxes, classes, count, iou_threshold, detections, out_scores,
                                out_boxes, out_classes, workspace, workspace_size, stream);
}

size_t nms_rotated(int batch, const float* scores, const float* boxes, const float* classes, int count,
                   float iou_threshold, int detections, float* out_scores, float* out_boxes, float* out_classes,
                   void* workspace, size_t workspace_size, cudaStream_t stream) {
  return nms_boxes<Rotated>(batch, scores, boxes, classes, count, iou_threshold, detections, out_scores, out_boxes,
                            out_classes, workspace, workspace_size, stream);
}

}  // namespace cuda
}  // namespace odtk
