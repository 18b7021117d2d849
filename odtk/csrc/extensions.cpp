// odtk._C: the CUDA decode/NMS kernels (axis-aligned and rotated) and the rotated IoU matrix as functions on torch
// CUDA tensors and, when built with TensorRT, the Engine (ONNX -> TensorRT engine with the decode/NMS plugins,
// plan save/load, inference).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/kernels.h"
#ifdef ODTK_WITH_TENSORRT
#include "engine.h"
#endif

namespace {

void check_input(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions, got ", t.dim());
}

// A workspace of the size the kernel asks for, from PyTorch's caching allocator.
at::Tensor workspace_like(const at::Tensor& t, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, t.options().dtype(at::kByte));
}

// One level's decode: axis-aligned (cell anchors [A, 4], deltas [B, A*4, H, W] -> boxes [B, top_n, 4]) or rotated
// (cell anchors [A, 5], deltas [B, A*6, H, W] -> boxes [B, top_n, 5]).
std::vector<at::Tensor> decode_level(bool rotated, at::Tensor scores, at::Tensor boxes, at::Tensor cell_anchors,
                                     double stride, double threshold, int64_t top_n, int64_t image_h,
                                     int64_t image_w) {
  const int64_t anchor_size = rotated ? 5 : 4, deltas = rotated ? 6 : 4;
  check_input(scores, "scores", 4);
  check_input(boxes, "boxes", 4);
  check_input(cell_anchors, "cell_anchors", 2);
  const int64_t batch = scores.size(0), height = scores.size(2), width = scores.size(3);
  const int64_t anchors = cell_anchors.size(0);
  TORCH_CHECK(cell_anchors.size(1) == anchor_size, "cell_anchors must be [A, ", anchor_size, "]");
  TORCH_CHECK(boxes.size(0) == batch && boxes.size(1) == anchors * deltas && boxes.size(2) == height &&
              boxes.size(3) == width, "boxes must be [B, A*", deltas, ", H, W] like scores");
  TORCH_CHECK(scores.size(1) % anchors == 0, "scores channels must be a multiple of the anchor count");
  TORCH_CHECK(top_n > 0, "top_n must be positive");
  const int64_t classes = scores.size(1) / anchors;
  c10::cuda::CUDAGuard guard(scores.device());
  scores = scores.contiguous();
  boxes = boxes.contiguous();
  cell_anchors = cell_anchors.contiguous();
  auto out_scores = at::empty({batch, top_n}, scores.options());
  auto out_boxes = at::empty({batch, top_n, anchor_size}, scores.options());
  auto out_classes = at::empty({batch, top_n}, scores.options());
  auto kernel = rotated ? odtk::cuda::decode_rotated : odtk::cuda::decode;
  auto call = [&](void* workspace, size_t size) {
    return kernel(batch, scores.data_ptr<float>(), boxes.data_ptr<float>(), cell_anchors.data_ptr<float>(), anchors,
                  classes, height, width, stride, threshold, top_n, image_h, image_w, out_scores.data_ptr<float>(),
                  out_boxes.data_ptr<float>(), out_classes.data_ptr<float>(), workspace, size,
                  at::cuda::getCurrentCUDAStream());
  };
  size_t bytes = call(nullptr, 0);
  auto workspace = workspace_like(scores, bytes);
  call(workspace.data_ptr(), bytes);
  return {out_scores, out_boxes, out_classes};
}

std::vector<at::Tensor> decode(at::Tensor scores, at::Tensor boxes, at::Tensor cell_anchors, double stride,
                               double threshold, int64_t top_n, int64_t image_h, int64_t image_w) {
  return decode_level(false, scores, boxes, cell_anchors, stride, threshold, top_n, image_h, image_w);
}

std::vector<at::Tensor> decode_rotated(at::Tensor scores, at::Tensor boxes, at::Tensor cell_anchors, double stride,
                                       double threshold, int64_t top_n, int64_t image_h, int64_t image_w) {
  return decode_level(true, scores, boxes, cell_anchors, stride, threshold, top_n, image_h, image_w);
}

// Class-aware NMS of boxes [B, N, 4] (axis-aligned) or [B, N, 5] (rotated).
std::vector<at::Tensor> nms_boxes(bool rotated, at::Tensor scores, at::Tensor boxes, at::Tensor classes,
                                  double iou_threshold, int64_t detections) {
  const int64_t box_size = rotated ? 5 : 4;
  check_input(scores, "scores", 2);
  check_input(boxes, "boxes", 3);
  check_input(classes, "classes", 2);
  const int64_t batch = scores.size(0), count = scores.size(1);
  TORCH_CHECK(boxes.size(0) == batch && boxes.size(1) == count && boxes.size(2) == box_size,
              "boxes must be [B, N, ", box_size, "]");
  TORCH_CHECK(classes.sizes() == scores.sizes(), "classes must be [B, N] like scores");
  TORCH_CHECK(detections > 0, "detections must be positive");
  c10::cuda::CUDAGuard guard(scores.device());
  scores = scores.contiguous();
  boxes = boxes.contiguous();
  // the axis-aligned kernel reads float4
  if (!rotated && reinterpret_cast<uintptr_t>(boxes.data_ptr()) % 16) boxes = boxes.clone();
  classes = classes.contiguous();
  auto out_scores = at::empty({batch, detections}, scores.options());
  auto out_boxes = at::empty({batch, detections, box_size}, scores.options());
  auto out_classes = at::empty({batch, detections}, scores.options());
  if (count == 0) return {out_scores.zero_(), out_boxes.zero_(), out_classes.zero_()};
  auto kernel = rotated ? odtk::cuda::nms_rotated : odtk::cuda::nms;
  auto call = [&](void* workspace, size_t size) {
    return kernel(batch, scores.data_ptr<float>(), boxes.data_ptr<float>(), classes.data_ptr<float>(), count,
                  iou_threshold, detections, out_scores.data_ptr<float>(), out_boxes.data_ptr<float>(),
                  out_classes.data_ptr<float>(), workspace, size, at::cuda::getCurrentCUDAStream());
  };
  size_t bytes = call(nullptr, 0);
  auto workspace = workspace_like(scores, bytes);
  call(workspace.data_ptr(), bytes);
  return {out_scores, out_boxes, out_classes};
}

std::vector<at::Tensor> nms(at::Tensor scores, at::Tensor boxes, at::Tensor classes, double iou_threshold,
                            int64_t detections) {
  return nms_boxes(false, scores, boxes, classes, iou_threshold, detections);
}

std::vector<at::Tensor> nms_rotated(at::Tensor scores, at::Tensor boxes, at::Tensor classes, double iou_threshold,
                                    int64_t detections) {
  return nms_boxes(true, scores, boxes, classes, iou_threshold, detections);
}

at::Tensor iou_rotated(at::Tensor a, at::Tensor b) {
  check_input(a, "a", 2);
  check_input(b, "b", 2);
  TORCH_CHECK(a.size(1) == 5 && b.size(1) == 5, "a and b must be [N, 5] and [M, 5] (x1, y1, x2, y2, theta)");
  TORCH_CHECK(a.device() == b.device(), "a and b must be on the same device");
  TORCH_CHECK(a.size(0) <= INT32_MAX && b.size(0) <= INT32_MAX, "too many boxes");
  c10::cuda::CUDAGuard guard(a.device());
  a = a.contiguous();
  b = b.contiguous();
  const int n = static_cast<int>(a.size(0)), m = static_cast<int>(b.size(0));
  auto out = at::empty({n, m}, a.options());
  auto call = [&](void* workspace, size_t size) {
    return odtk::cuda::iou_rotated(n, a.data_ptr<float>(), m, b.data_ptr<float>(), out.data_ptr<float>(), workspace,
                                   size, at::cuda::getCurrentCUDAStream());
  };
  size_t bytes = call(nullptr, 0);
  auto workspace = workspace_like(a, bytes);
  call(workspace.data_ptr(), bytes);
  return out;
}

#ifdef ODTK_WITH_TENSORRT
std::unique_ptr<odtk::Engine> build_engine(py::bytes onnx, std::vector<std::vector<int>> size_opts, bool dynamic_size,
                                           std::vector<std::vector<float>> anchors, std::vector<float> strides,
                                           float score_threshold, int top_n, float nms_threshold, int detections,
                                           bool fp16, bool int8, std::vector<int> batch_opts, size_t workspace_bytes,
                                           std::string metadata, bool verbose) {
  TORCH_CHECK(batch_opts.size() == 3, "batch_opts must be (min, opt, max)");
  TORCH_CHECK(size_opts.size() == 3 && size_opts[0].size() == 2 && size_opts[1].size() == 2 &&
              size_opts[2].size() == 2, "size_opts must be ((height, width) min, opt, max)");
  odtk::BuildOptions options;
  odtk::InputSize* sizes[] = {&options.min_size, &options.opt_size, &options.max_size};
  for (int k = 0; k < 3; ++k) *sizes[k] = odtk::InputSize{size_opts[k][0], size_opts[k][1]};
  options.dynamic_size = dynamic_size;
  options.anchors = std::move(anchors);
  options.strides = std::move(strides);
  options.score_threshold = score_threshold;
  options.top_n = top_n;
  options.nms_threshold = nms_threshold;
  options.detections = detections;
  options.fp16 = fp16;
  options.int8 = int8;
  options.min_batch = batch_opts[0];
  options.opt_batch = batch_opts[1];
  options.max_batch = batch_opts[2];
  options.workspace_bytes = workspace_bytes;
  options.metadata = std::move(metadata);
  options.verbose = verbose;
  std::string model = onnx;
  py::gil_scoped_release release;   // a build takes minutes
  return std::make_unique<odtk::Engine>(model, options);
}

// images [B, 3, H, W]: the engine's size, or for a dynamic-size engine any size in its profile (Engine::infer
// checks which, and sets TensorRT's input shape to this batch's).
std::vector<at::Tensor> engine_infer(odtk::Engine& engine, at::Tensor images) {
  check_input(images, "images", 4);
  TORCH_CHECK(images.size(1) == 3, "images must be [B, 3, H, W]");
  c10::cuda::CUDAGuard guard(images.device());
  images = images.contiguous();
  const int64_t batch = images.size(0), detections = engine.max_detections();
  auto scores = at::empty({batch, detections}, images.options());
  auto boxes = at::empty({batch, detections, engine.box_size()}, images.options());
  auto classes = at::empty({batch, detections}, images.options());
  engine.infer(static_cast<int>(batch), static_cast<int>(images.size(2)), static_cast<int>(images.size(3)),
               images.data_ptr<float>(), scores.data_ptr<float>(), boxes.data_ptr<float>(),
               classes.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  return {scores, boxes, classes};
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "odtk CUDA kernels (decode, NMS, axis-aligned and rotated; rotated IoU) and, when built with "
            "TensorRT, the TensorRT Engine";
  m.def("decode", &decode, "Per-level decode on CUDA: (scores [B,A*C,H,W], boxes [B,A*4,H,W], cell_anchors [A,4], "
        "stride, threshold, top_n, image_h, image_w) -> scores [B,top_n], boxes [B,top_n,4], classes [B,top_n]",
        py::arg("scores"), py::arg("boxes"), py::arg("cell_anchors"), py::arg("stride"), py::arg("threshold"),
        py::arg("top_n"), py::arg("image_h") = 0, py::arg("image_w") = 0);
  m.def("nms", &nms, "Class-aware NMS on CUDA: (scores [B,N], boxes [B,N,4], classes [B,N], iou_threshold, "
        "detections) -> scores [B,D], boxes [B,D,4], classes [B,D]",
        py::arg("scores"), py::arg("boxes"), py::arg("classes"), py::arg("iou_threshold"), py::arg("detections"));
  m.def("decode_rotated", &decode_rotated, "Per-level rotated decode on CUDA: (scores [B,A*C,H,W], boxes "
        "[B,A*6,H,W], cell_anchors [A,5], stride, threshold, top_n, image_h, image_w) -> scores [B,top_n], boxes "
        "[B,top_n,5], classes [B,top_n]",
        py::arg("scores"), py::arg("boxes"), py::arg("cell_anchors"), py::arg("stride"), py::arg("threshold"),
        py::arg("top_n"), py::arg("image_h") = 0, py::arg("image_w") = 0);
  m.def("nms_rotated", &nms_rotated, "Class-aware rotated NMS on CUDA: (scores [B,N], boxes [B,N,5], classes [B,N], "
        "iou_threshold, detections) -> scores [B,D], boxes [B,D,5], classes [B,D]",
        py::arg("scores"), py::arg("boxes"), py::arg("classes"), py::arg("iou_threshold"), py::arg("detections"));
  m.def("iou_rotated", &iou_rotated, "Rotated IoU matrix on CUDA: (a [N,5], b [M,5]) -> [N,M]", py::arg("a"),
        py::arg("b"));
#ifdef ODTK_WITH_TENSORRT
  m.attr("tensorrt_version") = odtk::Engine::version();
  py::class_<odtk::Engine>(m, "Engine", "TensorRT engine: raw-heads network + odtk decode/NMS plugins")
      .def_static("build", &build_engine, "Build from raw-heads ONNX bytes; size_opts: (height, width) min, opt, "
                  "max (three equal for a fixed-size ONNX)", py::arg("onnx"), py::arg("size_opts"),
                  py::arg("dynamic_size"), py::arg("anchors"), py::arg("strides"), py::arg("score_threshold"),
                  py::arg("top_n"), py::arg("nms_threshold"), py::arg("detections"), py::arg("fp16"),
                  py::arg("int8"), py::arg("batch_opts"), py::arg("workspace_bytes") = size_t(1) << 30,
                  py::arg("metadata") = "", py::arg("verbose") = false)
      .def_static("load", [](const std::string& path, bool verbose) {
             return std::make_unique<odtk::Engine>(path, verbose);
           }, "Load a plan written by save()", py::arg("path"), py::arg("verbose") = false)
      .def("save", &odtk::Engine::save, py::arg("path"))
      .def("infer", &engine_infer, "images [B,3,H,W] CUDA float32 -> scores [B,D], boxes [B,D,box_size], "
           "classes [B,D]", py::arg("images"))
      .def_property_readonly("input_size", &odtk::Engine::input_size,
                             "(height, width): fixed, or a dynamic-size engine's of the last infer")
      .def_property_readonly("dynamic_size", &odtk::Engine::dynamic_size)
      .def_property_readonly("size_profile", &odtk::Engine::size_profile,
                             "((height, width) min, opt, max) of the input")
      .def_property_readonly("stride", &odtk::Engine::stride)
      .def_property_readonly("max_batch", &odtk::Engine::max_batch)
      .def_property_readonly("max_detections", &odtk::Engine::max_detections)
      .def_property_readonly("box_size", &odtk::Engine::box_size, "4, or 5 for rotated boxes (x1, y1, x2, y2, theta)")
      .def_property_readonly("metadata", &odtk::Engine::metadata);
#else
  m.attr("tensorrt_version") = py::none();
#endif
}
