// NMSPlugin: class-aware NMS over all levels' decoded candidates (odtk::cuda::nms) in a TensorRT network.
// Inputs scores [B, N], boxes [B, N, 4], classes [B, N]; outputs scores [B, D], boxes [B, D, 4], classes [B, D].
#pragma once

#include <vector>

#include "plugin.h"

namespace odtk {

class NMSPlugin : public PluginBase<NMSPlugin> {
 public:
  static constexpr char kName[] = "OdtkNMS";

  NMSPlugin(float nms_threshold, int32_t detections);
  explicit NMSPlugin(nvinfer1::PluginFieldCollection const* fields);
  static std::vector<nvinfer1::PluginField> field_names();

  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nb_inputs, nvinfer1::DimsExprs const*, int32_t,
                          nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& exprs) noexcept override;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nb_inputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nb_outputs) const noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* input_desc, nvinfer1::PluginTensorDesc const* output_desc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;

 private:
  void check() const;

  float nms_threshold_;
  int32_t detections_;
  nvinfer1::PluginFieldCollection serialized_{};
};

}  // namespace odtk
