#include "nms_plugin.h"

#include <stdexcept>
#include <string>

#include "../cuda/kernels.h"

namespace odtk {

using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

namespace {

// The kernel of each kind: both take the same arguments.
constexpr auto nms_kernel(bool rotated) { return rotated ? cuda::nms_rotated : cuda::nms; }

}  // namespace

template <bool Rotated>
BasicNMSPlugin<Rotated>::BasicNMSPlugin(float nms_threshold, int32_t detections)
    : nms_threshold_(nms_threshold), detections_(detections) {
  check();
}

template <bool Rotated>
BasicNMSPlugin<Rotated>::BasicNMSPlugin(nvinfer1::PluginFieldCollection const* fields) {
  auto threshold = field_values<float>(fields, "nms_thresh", PluginFieldType::kFLOAT32);
  auto detections = field_values<int32_t>(fields, "detections_per_im", PluginFieldType::kINT32);
  if (threshold.size() != 1 || detections.size() != 1)
    throw std::invalid_argument(std::string(kName) + ": fields nms_thresh, detections_per_im required");
  nms_threshold_ = threshold[0];
  detections_ = detections[0];
  check();
}

template <bool Rotated>
void BasicNMSPlugin<Rotated>::check() const {
  if (detections_ <= 0) throw std::invalid_argument(std::string(kName) + ": detections_per_im must be positive");
}

template <bool Rotated>
std::vector<PluginField> BasicNMSPlugin<Rotated>::field_names() {
  return {PluginField("nms_thresh", nullptr, PluginFieldType::kFLOAT32, 1),
          PluginField("detections_per_im", nullptr, PluginFieldType::kINT32, 1)};
}

template <bool Rotated>
std::vector<PluginField> BasicNMSPlugin<Rotated>::fields() {
  return {PluginField("nms_thresh", &nms_threshold_, PluginFieldType::kFLOAT32, 1),
          PluginField("detections_per_im", &detections_, PluginFieldType::kINT32, 1)};
}

// Sorted copies of every image's candidates: it grows with the batch.
template <bool Rotated>
size_t BasicNMSPlugin<Rotated>::workspace_size(nvinfer1::Dims const& input) const {
  return nms_kernel(Rotated)(static_cast<int>(input.d[0]), nullptr, nullptr, nullptr, static_cast<int>(input.d[1]),
                             nms_threshold_, detections_, nullptr, nullptr, nullptr, nullptr, 0, nullptr);
}

template <bool Rotated>
void BasicNMSPlugin<Rotated>::run(nvinfer1::PluginTensorDesc const* desc, void const* const* inputs,
                                  void* const* outputs, void* workspace, cudaStream_t stream) {
  nvinfer1::Dims const& input = desc[0].dims;
  nms_kernel(Rotated)(static_cast<int>(input.d[0]), static_cast<float const*>(inputs[0]),
                      static_cast<float const*>(inputs[1]), static_cast<float const*>(inputs[2]),
                      static_cast<int>(input.d[1]), nms_threshold_, detections_, static_cast<float*>(outputs[0]),
                      static_cast<float*>(outputs[1]), static_cast<float*>(outputs[2]), workspace,
                      workspace_size(input), stream);
}

template class BasicNMSPlugin<false>;
template class BasicNMSPlugin<true>;

}  // namespace odtk
