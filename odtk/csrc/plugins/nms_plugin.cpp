#include "nms_plugin.h"

#include <exception>
#include <stdexcept>

#include "../cuda/kernels.h"

namespace odtk {

using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

NMSPlugin::NMSPlugin(float nms_threshold, int32_t detections) : nms_threshold_(nms_threshold),
                                                                detections_(detections) {
  check();
}

NMSPlugin::NMSPlugin(nvinfer1::PluginFieldCollection const* fields) {
  auto threshold = field_values<float>(fields, "nms_thresh", PluginFieldType::kFLOAT32);
  auto detections = field_values<int32_t>(fields, "detections_per_im", PluginFieldType::kINT32);
  if (threshold.size() != 1 || detections.size() != 1)
    throw std::invalid_argument("OdtkNMS: fields nms_thresh, detections_per_im required");
  nms_threshold_ = threshold[0];
  detections_ = detections[0];
  check();
}

void NMSPlugin::check() const {
  if (detections_ <= 0) throw std::invalid_argument("OdtkNMS: detections_per_im must be positive");
}

std::vector<PluginField> NMSPlugin::field_names() {
  return {PluginField("nms_thresh", nullptr, PluginFieldType::kFLOAT32, 1),
          PluginField("detections_per_im", nullptr, PluginFieldType::kINT32, 1)};
}

nvinfer1::PluginFieldCollection const* NMSPlugin::getFieldsToSerialize() noexcept {
  serialized_ = collect({PluginField("nms_thresh", &nms_threshold_, PluginFieldType::kFLOAT32, 1),
                         PluginField("detections_per_im", &detections_, PluginFieldType::kINT32, 1)});
  return &serialized_;
}

int32_t NMSPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nb_inputs, nvinfer1::DimsExprs const*,
                                   int32_t, nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                                   nvinfer1::IExprBuilder& exprs) noexcept {
  if (nb_inputs != 3 || nb_outputs != 3 || inputs[0].nbDims != 2) return -1;
  auto const* batch = inputs[0].d[0];
  auto const* detections = exprs.constant(detections_);
  outputs[0].nbDims = 2;
  outputs[0].d[0] = batch;
  outputs[0].d[1] = detections;
  outputs[1].nbDims = 3;
  outputs[1].d[0] = batch;
  outputs[1].d[1] = detections;
  outputs[1].d[2] = exprs.constant(4);
  outputs[2] = outputs[0];
  return 0;
}

size_t NMSPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t,
                                   nvinfer1::DynamicPluginTensorDesc const*, int32_t) const noexcept {
  try {
    auto const& dims = inputs[0].max;
    return cuda::nms(static_cast<int>(dims.d[0]), nullptr, nullptr, nullptr, static_cast<int>(dims.d[1]),
                     nms_threshold_, detections_, nullptr, nullptr, nullptr, nullptr, 0, nullptr);
  } catch (...) {
    return 0;
  }
}

int32_t NMSPlugin::enqueue(nvinfer1::PluginTensorDesc const* input_desc, nvinfer1::PluginTensorDesc const*,
                           void const* const* inputs, void* const* outputs, void* workspace,
                           cudaStream_t stream) noexcept {
  try {
    const int batch = static_cast<int>(input_desc[0].dims.d[0]), count = static_cast<int>(input_desc[0].dims.d[1]);
    size_t bytes = cuda::nms(batch, nullptr, nullptr, nullptr, count, nms_threshold_, detections_, nullptr, nullptr,
                             nullptr, nullptr, 0, nullptr);
    cuda::nms(batch, static_cast<float const*>(inputs[0]), static_cast<float const*>(inputs[1]),
              static_cast<float const*>(inputs[2]), count, nms_threshold_, detections_,
              static_cast<float*>(outputs[0]), static_cast<float*>(outputs[1]), static_cast<float*>(outputs[2]),
              workspace, bytes, stream);
    return 0;
  } catch (std::exception const&) {
    return -1;
  }
}

}  // namespace odtk
