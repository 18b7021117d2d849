// Decode and NMS on CUDA, axis-aligned and rotated, shared by the torch ops (extensions.cpp) and the TensorRT
// plugins, and the rotated IoU matrix.
// Every entry point follows CUB's convention: called with workspace == nullptr it only returns the
// workspace bytes it needs (TensorRT asks for that at build time); otherwise it enqueues the work on
// `stream` and returns 0. Inputs and outputs are float32, row-major, on the device.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace odtk {
namespace cuda {

// exp() of a larger log-ratio overflows fp16 and gives absurd boxes anyway (odtk.box.BBOX_XFORM_CLIP,
// float(math.log(1000 / 16)))
constexpr float kBoxXformClip = 4.135166556742356f;

// One pyramid level: per image, keep scores > threshold, the top_n best, and turn their anchor deltas into
// boxes (x1, y1, x2, y2), clipped to [0, image_w] x [0, image_h] when image_h, image_w > 0.
//   scores  [batch, A*C, height, width]  sigmoid probabilities, channel = anchor * C + class
//   boxes   [batch, A*4, height, width]  deltas (dx, dy, dw, dh), channel = anchor * 4 + k
//   cell_anchors [A, 4]  anchors of the cell at (0, 0); cell (y, x) adds (x, y, x, y) * stride
// Outputs, sorted by decreasing score, equal scores by increasing flat anchor index ((y * W + x) * A + a) * C + c
// (odtk.box.top_k's order), zero padded: out_scores [batch, top_n], out_boxes [batch, top_n, 4], out_classes
// [batch, top_n] (class index as float). The candidate counts of the whole batch are read back on the host with
// one stream synchronisation, so the sorts only touch the candidates. threshold >= 0 (the sort keys take the
// scores' bits as unsigned integers). The workspace grows with the batch (the candidates' indices, 4 bytes per
// score).
size_t decode(int batch, const float* scores, const float* boxes, const float* cell_anchors, int num_anchors,
              int num_classes, int height, int width, float stride, float threshold, int top_n, int image_h,
              int image_w, float* out_scores, float* out_boxes, float* out_classes, void* workspace,
              size_t workspace_size, cudaStream_t stream);

// Class-aware NMS per image over `count` candidates (all levels concatenated; score <= 0 is padding):
// visited by decreasing score, equal scores in input order (decode's: level, then anchor order; a stable sort), a
// box is dropped when its IoU with a kept box of the same class is above iou_threshold (torchvision.ops.nms's
// rule); the first `detections` kept boxes are written, zero padded.
//   scores [batch, count], boxes [batch, count, 4], classes [batch, count]
//   out_scores [batch, detections], out_boxes [batch, detections, 4], out_classes [batch, detections]
size_t nms(int batch, const float* scores, const float* boxes, const float* classes, int count,
           float iou_threshold, int detections, float* out_scores, float* out_boxes, float* out_classes,
           void* workspace, size_t workspace_size, cudaStream_t stream);

// Rotated boxes (x1, y1, x2, y2, theta): the box before rotation and its angle in radians, turned about its centre
// as odtk.rotated turns it (rotated.h). IoU is the area of the two rectangles' intersection polygon (float32)
// over their union; 0 when a box has no width or height.

// decode for rotated anchors, as decode: cell_anchors [A, 5] (theta kept by the grid shift), boxes
// [batch, A*6, height, width] with channel = anchor * 6 + k for (dx, dy, dw, dh, sin, cos); out_boxes
// [batch, top_n, 5]: the box before rotation decoded as decode's, theta = atan2(sin, cos) + the anchor's theta (not
// wrapped). With image_h, image_w > 0 the box is shifted so that its centre lies in the image, its size kept.
size_t decode_rotated(int batch, const float* scores, const float* boxes, const float* cell_anchors,
                      int num_anchors, int num_classes, int height, int width, float stride, float threshold,
                      int top_n, int image_h, int image_w, float* out_scores, float* out_boxes, float* out_classes,
                      void* workspace, size_t workspace_size, cudaStream_t stream);

// nms on rotated boxes [batch, count, 5] -> out_boxes [batch, detections, 5]: the same visiting order and rule,
// with the rotated IoU.
size_t nms_rotated(int batch, const float* scores, const float* boxes, const float* classes, int count,
                   float iou_threshold, int detections, float* out_scores, float* out_boxes, float* out_classes,
                   void* workspace, size_t workspace_size, cudaStream_t stream);

// IoU of every box of a [n, 5] with every box of b [m, 5] -> out [n, m], row-major.
size_t iou_rotated(int n, const float* a, int m, const float* b, float* out, void* workspace, size_t workspace_size,
                   cudaStream_t stream);

}  // namespace cuda
}  // namespace odtk
