// Class-aware greedy NMS per image (odtk.box.nms / torchvision.ops.batched_nms on the GPU).
#include <stdexcept>

#include <cub/device/device_radix_sort.cuh>

#include "kernels.h"
#include "workspace.h"

namespace odtk {
namespace cuda {
namespace {

__global__ void iota(int* out, int count) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) out[i] = i;
}

// One block per image. Candidates are visited in score order; at step i every thread reads the same
// `removed[i]` (final since the previous barrier), so all threads agree on what is kept without shared state,
// and the threads split the later candidates to suppress. IoU is computed as torchvision's nms kernel does
// (same operations, no FMA), so borderline overlaps are decided the same way.
__global__ void nms_kernel(const float* sorted_scores, const int* sorted_indices, const float* boxes,
                           const float* classes, int count, float iou_threshold, int detections,
                           float4* sorted_boxes, float* sorted_classes, unsigned char* removed, float* out_scores,
                           float* out_boxes, float* out_classes) {
  const int b = blockIdx.x;
  const size_t base = static_cast<size_t>(b) * count;
  sorted_scores += base;
  sorted_indices += base;
  sorted_boxes += base;
  sorted_classes += base;
  removed += base;
  const float4* image_boxes = reinterpret_cast<const float4*>(boxes) + base;
  const float* image_classes = classes + base;
  out_scores += static_cast<size_t>(b) * detections;
  out_classes += static_cast<size_t>(b) * detections;
  float4* image_out = reinterpret_cast<float4*>(out_boxes) + static_cast<size_t>(b) * detections;

  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    int idx = sorted_indices[j];
    sorted_boxes[j] = image_boxes[idx];
    sorted_classes[j] = image_classes[idx];
    removed[j] = 0;
  }
  __syncthreads();

  int kept = 0;
  for (int i = 0; i < count && kept < detections; ++i) {
    float score = sorted_scores[i];
    if (score <= 0.f) break;   // zero padding from decode sorts last
    if (!removed[i]) {
      float4 a = sorted_boxes[i];
      float cls = sorted_classes[i];
      if (threadIdx.x == 0) {
        out_scores[kept] = score;
        out_classes[kept] = cls;
        image_out[kept] = a;
      }
      ++kept;
      float area_a = __fmul_rn(a.z - a.x, a.w - a.y);
      for (int j = i + 1 + threadIdx.x; j < count; j += blockDim.x) {
        if (removed[j] || sorted_classes[j] != cls) continue;
        float4 c = sorted_boxes[j];
        float w = fmaxf(0.f, fminf(a.z, c.z) - fmaxf(a.x, c.x));
        float h = fmaxf(0.f, fminf(a.w, c.w) - fmaxf(a.y, c.y));
        float inter = __fmul_rn(w, h);
        float area_c = __fmul_rn(c.z - c.x, c.w - c.y);
        if (__fdiv_rn(inter, area_a + area_c - inter) > iou_threshold) removed[j] = 1;
      }
    }
    __syncthreads();
  }
  for (int j = kept + threadIdx.x; j < detections; j += blockDim.x) {
    out_scores[j] = 0.f;
    out_classes[j] = 0.f;
    image_out[j] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

}  // namespace

size_t nms(int batch, const float* scores, const float* boxes, const float* classes, int count,
           float iou_threshold, int detections, float* out_scores, float* out_boxes, float* out_classes,
           void* workspace, size_t workspace_size, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(batch) * count;
  Workspace ws(workspace);
  int* indices = ws.take<int>(count);
  int* sorted_indices = ws.take<int>(total);
  float* sorted_scores = ws.take<float>(total);
  float4* sorted_boxes = ws.take<float4>(total);
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
  nms_kernel<<<batch, threads, 0, stream>>>(sorted_scores, sorted_indices, boxes, classes, count, iou_threshold,
                                            detections, sorted_boxes, sorted_classes, removed, out_scores,
                                            out_boxes, out_classes);
  check(cudaGetLastError(), "odtk nms: nms kernel");
  return 0;
}

}  // namespace cuda
}  // namespace odtk
