// Engine: a TensorRT engine of an odtk raw-heads ONNX with the decode and NMS plugins appended, so it maps
// a normalised image batch input_1 [B, 3, H, W] to scores [B, D], boxes [B, D, 4], classes [B, D]. H and W are
// fixed, or, for a dynamic-size engine, any multiple of the stride within its optimisation profile. An ONNX with
// rotated heads (box_i [B, A*6, h, w], anchors of 5 values) gets the rotated plugins: boxes [B, D, 5].
// Plain C++ (TensorRT + CUDA runtime): used by the Python extension and by extras/cppapi.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace nvinfer1 {
class ICudaEngine;
class IExecutionContext;
class IRuntime;
}  // namespace nvinfer1

namespace odtk {

struct InputSize {
  int height = 0, width = 0;
};

struct BuildOptions {
  // The input's (height, width) profile. Fixed-size: the ONNX graph's own size, min = opt = max. Dynamic-size (an
  // ONNX with symbolic height and width): any size from min to max, tuned for opt.
  InputSize min_size, opt_size, max_size;
  bool dynamic_size = false;
  // per level: cell anchors [A * 4] (odtk.box.generate_anchors) or, rotated, [A * 5] (odtk.rotated)
  std::vector<std::vector<float>> anchors;
  std::vector<float> strides;                // per level
  float score_threshold = 0.05f;
  int top_n = 1000;
  float nms_threshold = 0.5f;
  int detections = 100;
  bool fp16 = true;                          // TensorRT < 11: builder flag; 11: the ONNX is already FP16
  bool int8 = false;                         // the ONNX carries Q/DQ nodes (explicit quantization)
  int min_batch = 1, opt_batch = 1, max_batch = 1;
  size_t workspace_bytes = size_t(1) << 30;
  std::string metadata;                      // opaque (odtk writes JSON), stored in the plan
  bool verbose = false;
};

class Engine {
 public:
  // Builds from ONNX bytes; throws std::runtime_error with TensorRT's messages when it cannot.
  Engine(const std::string& onnx, const BuildOptions& options);
  // Loads a plan written by save().
  explicit Engine(const std::string& plan_path, bool verbose = false);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Writes the plan: a small odtk header (magic, format, stride, dynamic flag, size profile, metadata) then
  // TensorRT's serialised engine.
  void save(const std::string& path) const;
  // input: device [batch, 3, height, width] float32 (a fixed-size engine's own size; a dynamic-size engine's within
  // its profile: std::invalid_argument otherwise); outputs: device buffers of [batch, D], [batch, D, box_size()],
  // [batch, D].
  void infer(int batch, int height, int width, const float* input, float* scores, float* boxes, float* classes,
             cudaStream_t stream);

  // {height, width}: a fixed-size engine's; a dynamic-size engine's of the last infer() (the profile's opt before)
  std::vector<int> input_size() const;
  bool dynamic_size() const { return dynamic_; }
  // {{min height, width}, {opt height, width}, {max height, width}}: one size three times when fixed
  std::vector<std::vector<int>> size_profile() const;
  int stride() const { return stride_; }  // largest level stride: inputs are padded to a multiple of it
  int max_batch() const;
  int max_detections() const;
  int box_size() const;                   // values per box: 4, or 5 for rotated boxes (x1, y1, x2, y2, theta)
  const std::string& metadata() const { return metadata_; }
  static std::string version();           // TensorRT version this was compiled against

 private:
  void deserialize(const void* data, size_t size);

  class Logger;
  std::unique_ptr<Logger> logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  std::string plan_;                      // TensorRT's serialised engine
  std::string metadata_;
  int stride_ = 0;
  bool dynamic_ = false;
  InputSize last_;                        // a dynamic-size engine's input of the last infer()
};

}  // namespace odtk
