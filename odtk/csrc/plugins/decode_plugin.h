// DecodePlugin: one pyramid level's score threshold, top-n and box decoding (odtk::cuda::decode) in a
// TensorRT network. Inputs score [B, A*C, H, W] and box [B, A*4, H, W]; outputs scores [B, top_n],
// boxes [B, top_n, 4], classes [B, top_n].
#pragma once

#include <vector>

#include "plugin.h"

namespace odtk {

class DecodePlugin : public PluginBase<DecodePlugin> {
 public:
  static constexpr char kName[] = "OdtkDecode";

  DecodePlugin(std::vector<float> cell_anchors, float stride, float score_threshold, int32_t top_n,
               int32_t image_h, int32_t image_w);
  explicit DecodePlugin(nvinfer1::PluginFieldCollection const* fields);   // from the creator / a plan
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
  size_t workspace(int32_t channels, int32_t height, int32_t width) const;
  void check() const;

  std::vector<float> anchors_;   // [A, 4], copied to the workspace at each enqueue
  float stride_;
  float score_threshold_;
  int32_t top_n_;
  int32_t image_size_[2];        // clip boxes to (height, width); 0 = no clip
  nvinfer1::PluginFieldCollection serialized_{};
};

}  // namespace odtk
