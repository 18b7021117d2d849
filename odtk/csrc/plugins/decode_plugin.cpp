#include "decode_plugin.h"

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "../cuda/kernels.h"
#include "../cuda/workspace.h"

namespace odtk {

using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

template <bool Rotated>
BasicDecodePlugin<Rotated>::BasicDecodePlugin(std::vector<float> cell_anchors, float stride, float score_threshold,
                                              int32_t top_n, int32_t image_h, int32_t image_w, bool clip_to_input)
    : anchors_(std::move(cell_anchors)), stride_(stride), score_threshold_(score_threshold), top_n_(top_n),
      image_size_{image_h, image_w}, clip_to_input_(clip_to_input ? 1 : 0) {
  check();
}

template <bool Rotated>
BasicDecodePlugin<Rotated>::BasicDecodePlugin(nvinfer1::PluginFieldCollection const* fields)
    : anchors_(field_values<float>(fields, "anchors", PluginFieldType::kFLOAT32)) {
  auto stride = field_values<float>(fields, "stride", PluginFieldType::kFLOAT32);
  auto threshold = field_values<float>(fields, "score_thresh", PluginFieldType::kFLOAT32);
  auto top_n = field_values<int32_t>(fields, "top_n", PluginFieldType::kINT32);
  auto size = field_values<int32_t>(fields, "image_size", PluginFieldType::kINT32);
  auto clip = field_values<int32_t>(fields, "clip_to_input", PluginFieldType::kINT32);   // optional: newer plans
  if (stride.size() != 1 || threshold.size() != 1 || top_n.size() != 1 || size.size() != 2 || clip.size() > 1)
    throw std::invalid_argument(std::string(kName) +
                                ": fields anchors, stride, score_thresh, top_n, image_size required");
  stride_ = stride[0];
  score_threshold_ = threshold[0];
  top_n_ = top_n[0];
  image_size_[0] = size[0];
  image_size_[1] = size[1];
  clip_to_input_ = clip.empty() ? 0 : clip[0];
  check();
}

template <bool Rotated>
void BasicDecodePlugin<Rotated>::check() const {
  auto fail = [](const std::string& why) { throw std::invalid_argument(std::string(kName) + ": " + why); };
  if (anchors_.empty() || anchors_.size() % kBoxSize) fail("anchors must be A*" + std::to_string(kBoxSize) + " floats");
  if (top_n_ <= 0 || stride_ <= 0) fail("top_n and stride must be positive");
  if (clip_to_input_ != 0 && clip_to_input_ != 1) fail("clip_to_input is 0 or 1");
}

template <bool Rotated>
std::vector<PluginField> BasicDecodePlugin<Rotated>::field_names() {
  return {PluginField("anchors", nullptr, PluginFieldType::kFLOAT32, 0),
          PluginField("stride", nullptr, PluginFieldType::kFLOAT32, 1),
          PluginField("score_thresh", nullptr, PluginFieldType::kFLOAT32, 1),
          PluginField("top_n", nullptr, PluginFieldType::kINT32, 1),
          PluginField("image_size", nullptr, PluginFieldType::kINT32, 2),
          PluginField("clip_to_input", nullptr, PluginFieldType::kINT32, 1)};
}

template <bool Rotated>
std::vector<PluginField> BasicDecodePlugin<Rotated>::fields() {
  return {PluginField("anchors", anchors_.data(), PluginFieldType::kFLOAT32, static_cast<int32_t>(anchors_.size())),
          PluginField("stride", &stride_, PluginFieldType::kFLOAT32, 1),
          PluginField("score_thresh", &score_threshold_, PluginFieldType::kFLOAT32, 1),
          PluginField("top_n", &top_n_, PluginFieldType::kINT32, 1),
          PluginField("image_size", image_size_, PluginFieldType::kINT32, 2),
          PluginField("clip_to_input", &clip_to_input_, PluginFieldType::kINT32, 1)};
}

// One call of the kernel on a level of shape `input` (CUB convention: workspace null = only the size).
template <bool Rotated>
size_t BasicDecodePlugin<Rotated>::kernel(nvinfer1::Dims const& input, int32_t const image_size[2],
                                          void const* const* inputs, void* const* outputs, float const* anchors,
                                          void* workspace, size_t workspace_size, cudaStream_t stream) const {
  const int32_t num_anchors = static_cast<int32_t>(anchors_.size() / kBoxSize);
  auto out = [&](int k) { return outputs ? static_cast<float*>(outputs[k]) : nullptr; };
  auto decode = Rotated ? cuda::decode_rotated : cuda::decode;
  return decode(static_cast<int>(input.d[0]), inputs ? static_cast<float const*>(inputs[0]) : nullptr,
                inputs ? static_cast<float const*>(inputs[1]) : nullptr, anchors, num_anchors,
                static_cast<int>(input.d[1]) / num_anchors, static_cast<int>(input.d[2]), static_cast<int>(input.d[3]),
                stride_, score_threshold_, top_n_, image_size[0], image_size[1], out(0), out(1), out(2), workspace,
                workspace_size, stream);
}

// The cell anchors, then the kernel's workspace for input's batch and level shape (TensorRT asks with the
// profile's largest; the clip size does not change it).
template <bool Rotated>
size_t BasicDecodePlugin<Rotated>::workspace_size(nvinfer1::Dims const& input) const {
  cuda::Workspace ws(nullptr);
  ws.take<float>(anchors_.size());
  return ws.used() + kernel(input, image_size_, nullptr, nullptr, nullptr, nullptr, 0, nullptr);
}

template <bool Rotated>
void BasicDecodePlugin<Rotated>::run(nvinfer1::PluginTensorDesc const* desc, void const* const* inputs,
                                     void* const* outputs, void* workspace, cudaStream_t stream) {
  nvinfer1::Dims const& level = desc[0].dims;   // this call's batch and feature-map size
  // a dynamic-size engine's input size changes per call: the network input's shape, not a build-time constant
  int32_t const image[2] = {clip_to_input_ ? static_cast<int32_t>(desc[2].dims.d[2]) : image_size_[0],
                            clip_to_input_ ? static_cast<int32_t>(desc[2].dims.d[3]) : image_size_[1]};
  cuda::Workspace ws(workspace);
  float* anchors = ws.take<float>(anchors_.size());
  cuda::check(cudaMemcpyAsync(anchors, anchors_.data(), anchors_.size() * sizeof(float), cudaMemcpyHostToDevice,
                              stream), "odtk decode plugin: anchors copy");
  kernel(level, image, inputs, outputs, anchors, static_cast<char*>(workspace) + ws.used(),
         workspace_size(level) - ws.used(), stream);
}

template class BasicDecodePlugin<false>;
template class BasicDecodePlugin<true>;

}  // namespace odtk
