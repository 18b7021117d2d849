#include "decode_plugin.h"

#include <cuda_runtime_api.h>

#include <exception>
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

nvinfer1::PluginFieldCollection const* DecodePlugin::getFieldsToSerialize() noexcept {
  serialized_ = collect({PluginField("anchors", anchors_.data(), PluginFieldType::kFLOAT32,
                                     static_cast<int32_t>(anchors_.size())),
                         PluginField("stride", &stride_, PluginFieldType::kFLOAT32, 1),
                         PluginField("score_thresh", &score_threshold_, PluginFieldType::kFLOAT32, 1),
                         PluginField("top_n", &top_n_, PluginFieldType::kINT32, 1),
                         PluginField("image_size", image_size_, PluginFieldType::kINT32, 2)});
  return &serialized_;
}

int32_t DecodePlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nb_inputs, nvinfer1::DimsExprs const*,
                                      int32_t, nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                                      nvinfer1::IExprBuilder& exprs) noexcept {
  if (nb_inputs != 2 || nb_outputs != 3 || inputs[0].nbDims != 4) return -1;
  auto const* batch = inputs[0].d[0];
  auto const* top_n = exprs.constant(top_n_);
  outputs[0].nbDims = 2;
  outputs[0].d[0] = batch;
  outputs[0].d[1] = top_n;
  outputs[1].nbDims = 3;
  outputs[1].d[0] = batch;
  outputs[1].d[1] = top_n;
  outputs[1].d[2] = exprs.constant(4);
  outputs[2] = outputs[0];
  return 0;
}

size_t DecodePlugin::workspace(int32_t channels, int32_t height, int32_t width) const {
  const int32_t num_anchors = static_cast<int32_t>(anchors_.size() / 4);
  cuda::Workspace ws(nullptr);
  ws.take<float>(anchors_.size());
  return ws.used() + cuda::decode(1, nullptr, nullptr, nullptr, num_anchors, channels / num_anchors, height, width,
                                  stride_, score_threshold_, top_n_, image_size_[0], image_size_[1], nullptr,
                                  nullptr, nullptr, nullptr, 0, nullptr);
}

size_t DecodePlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t,
                                      nvinfer1::DynamicPluginTensorDesc const*, int32_t) const noexcept {
  try {   // the decode workspace is reused image after image: it does not grow with the batch
    auto const& dims = inputs[0].max;
    return workspace(static_cast<int32_t>(dims.d[1]), static_cast<int32_t>(dims.d[2]),
                     static_cast<int32_t>(dims.d[3]));
  } catch (...) {
    return 0;
  }
}

int32_t DecodePlugin::enqueue(nvinfer1::PluginTensorDesc const* input_desc, nvinfer1::PluginTensorDesc const*,
                              void const* const* inputs, void* const* outputs, void* workspace_ptr,
                              cudaStream_t stream) noexcept {
  try {
    auto const& dims = input_desc[0].dims;
    const int32_t batch = static_cast<int32_t>(dims.d[0]), channels = static_cast<int32_t>(dims.d[1]);
    const int32_t height = static_cast<int32_t>(dims.d[2]), width = static_cast<int32_t>(dims.d[3]);
    const int32_t num_anchors = static_cast<int32_t>(anchors_.size() / 4);
    cuda::Workspace ws(workspace_ptr);
    float* anchors = ws.take<float>(anchors_.size());
    if (cudaMemcpyAsync(anchors, anchors_.data(), anchors_.size() * sizeof(float), cudaMemcpyHostToDevice,
                        stream) != cudaSuccess)
      return -1;
    size_t kernel_bytes = workspace(channels, height, width) - ws.used();
    cuda::decode(batch, static_cast<float const*>(inputs[0]), static_cast<float const*>(inputs[1]), anchors,
                 num_anchors, channels / num_anchors, height, width, stride_, score_threshold_, top_n_,
                 image_size_[0], image_size_[1], static_cast<float*>(outputs[0]), static_cast<float*>(outputs[1]),
                 static_cast<float*>(outputs[2]), static_cast<char*>(workspace_ptr) + ws.used(), kernel_bytes,
                 stream);
    return 0;
  } catch (std::exception const&) {
    return -1;
  }
}

}  // namespace odtk
