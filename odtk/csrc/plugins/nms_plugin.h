// NMSPlugin: class-aware NMS over all levels' decoded candidates (odtk::cuda::nms) in a TensorRT network.
// Inputs scores [B, N], boxes [B, N, 4], classes [B, N]; outputs scores [B, D], boxes [B, D, 4], classes [B, D].
// NMSRotatePlugin: the same on rotated boxes [B, N, 5] (odtk::cuda::nms_rotated) -> boxes [B, D, 5].
#pragma once

#include <vector>

#include "plugin.h"

namespace odtk {

template <bool Rotated>
class BasicNMSPlugin : public PluginBase<BasicNMSPlugin<Rotated>> {
 public:
  static constexpr char const* kName = Rotated ? "OdtkNMSRotate" : "OdtkNMS";
  static constexpr int32_t kBoxSize = Rotated ? 5 : 4;

  BasicNMSPlugin(float nms_threshold, int32_t detections);
  explicit BasicNMSPlugin(nvinfer1::PluginFieldCollection const* fields);
  static std::vector<nvinfer1::PluginField> field_names();
  static constexpr int32_t kInputDims = 2;
  int32_t inputs() const { return 3; }
  int32_t outputs_per_image() const { return detections_; }

  std::vector<nvinfer1::PluginField> fields();
  size_t workspace_size(nvinfer1::Dims const& input) const;
  void run(nvinfer1::PluginTensorDesc const* desc, void const* const* inputs, void* const* outputs, void* workspace,
           cudaStream_t stream);

 private:
  void check() const;

  float nms_threshold_;
  int32_t detections_;
};

using NMSPlugin = BasicNMSPlugin<false>;
using NMSRotatePlugin = BasicNMSPlugin<true>;
extern template class BasicNMSPlugin<false>;   // both defined in nms_plugin.cpp
extern template class BasicNMSPlugin<true>;

}  // namespace odtk
