#include "decode_plugin.h"

#include <cuda_runtime_api.h>

#include <stdexcept>

#include "../cuda/kernels.h"
#include "../cuda/workspace.h"

namespace odtk {

using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

DecodePlugin::DecodePlugin(std::vector<float> cell_anchors, float stride, float score_threshold, int32_t top_n,
                           int32_t image_h, int32_t image_w)
    : anchors_(std::move(cell_anchors)), stride_(stride), score_threshold_(score_threshold), top_n_(top_n),
      image_size_{image_h, image_w} {
  check();
}

DecodePlugin::DecodePlugin(nvinfer1::PluginFieldCollection const* fields)
    : anchors_(field_values<float>(fields, "anchors", PluginFieldType::kFLOAT32)) {
  auto stride = field_values<float>(fields, "stride", PluginFieldType::kFLOAT32);
  auto threshold = field_values<float>(fields, "score_thresh", PluginFieldType::kFLOAT32);
  auto top_n = field_values<int32_t>(fields, "top_n", PluginFieldType::kINT32);
  auto size = field_values<int32_t>(fields, "image_size", PluginFieldType::kINT32);
  if (stride.size() != 1 || threshold.size() != 1 || top_n.size() != 1 || size.size() != 2)
    throw std::invalid_argument("OdtkDecode: fields anchors, stride, score_thresh, top_n, image_size required");
  stride_ = stride[0];
  score_threshold_ = threshold[0];
  top_n_ = top_n[0];
  image_size_[0] = size[0];
  image_size_[1] = size[1];
  check();
}

void DecodePlugin::check() const {
  if (anchors_.empty() || anchors_.size() % 4) throw std::invalid_argument("OdtkDecode: anchors must be A*4 floats");
  if (top_n_ <= 0 || stride_ <= 0) throw std::invalid_argument("OdtkDecode: top_n and stride must be positive");
}

std::vector<PluginField> DecodePlugin::field_names() {
  return {PluginField("anchors", nullptr, PluginFieldType::kFLOAT32, 0),
          PluginField("stride", nullptr, PluginFieldType::kFLOAT32, 1),
          PluginField("score_thresh", nullptr, PluginFieldType::kFLOAT32, 1),
          PluginField("top_n", nullptr, PluginFieldType::kINT32, 1),
          PluginField("image_size", nullptr, PluginFieldType::kINT32, 2)};
}

std::vector<PluginField> DecodePlugin::fields() {
  return {PluginField("anchors", anchors_.data(), PluginFieldType::kFLOAT32, static_cast<int32_t>(anchors_.size())),
          PluginField("stride", &stride_, PluginFieldType::kFLOAT32, 1),
          PluginField("score_thresh", &score_threshold_, PluginFieldType::kFLOAT32, 1),
          PluginField("top_n", &top_n_, PluginFieldType::kINT32, 1),
          PluginField("image_size", image_size_, PluginFieldType::kINT32, 2)};
}

// The cell anchors, then the kernel's workspace for a batch of input.d[0] (TensorRT asks with the largest).
size_t DecodePlugin::workspace_size(nvinfer1::Dims const& input) const {
  const int32_t num_anchors = static_cast<int32_t>(anchors_.size() / 4);
  cuda::Workspace ws(nullptr);
  ws.take<float>(anchors_.size());
  return ws.used() + cuda::decode(static_cast<int>(input.d[0]), nullptr, nullptr, nullptr, num_anchors, static_cast<int>(input.d[1]) / num_anchors,
                                  static_cast<int>(input.d[2]), static_cast<int>(input.d[3]), stride_,
                                  score_threshold_, top_n_, image_size_[0], image_size_[1], nullptr, nullptr, nullptr,
                                  nullptr, 0, nullptr);
}

void DecodePlugin::run(nvinfer1::Dims const& input, void const* const* inputs, void* const* outputs, void* workspace,
                       cudaStream_t stream) {
  const int32_t num_anchors = static_cast<int32_t>(anchors_.size() / 4);
  cuda::Workspace ws(workspace);
  float* anchors = ws.take<float>(anchors_.size());
  cuda::check(cudaMemcpyAsync(anchors, anchors_.data(), anchors_.size() * sizeof(float), cudaMemcpyHostToDevice,
                              stream), "OdtkDecode: anchors copy");
  cuda::decode(static_cast<int>(input.d[0]), static_cast<float const*>(inputs[0]), static_cast<float const*>(inputs[1]),
               anchors, num_anchors, static_cast<int>(input.d[1]) / num_anchors, static_cast<int>(input.d[2]),
               static_cast<int>(input.d[3]), stride_, score_threshold_, top_n_, image_size_[0], image_size_[1],
               static_cast<float*>(outputs[0]), static_cast<float*>(outputs[1]), static_cast<float*>(outputs[2]),
               static_cast<char*>(workspace) + ws.used(), workspace_size(input) - ws.used(), stream);
}

}  // namespace odtk
