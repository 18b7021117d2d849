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
  static constexpr int32_t kInputs = 2, kInputDims = 4;
  int32_t outputs_per_image() const { return top_n_; }

  std::vector<nvinfer1::PluginField> fields();   // pointing at the members, for serialisation
  size_t workspace_size(nvinfer1::Dims const& input) const;
  void run(nvinfer1::Dims const& input, void const* const* inputs, void* const* outputs, void* workspace,
           cudaStream_t stream);

 private:
  void check() const;

  std::vector<float> anchors_;   // [A, 4], copied to the workspace at each enqueue
  float stride_;
  float score_threshold_;
  int32_t top_n_;
  int32_t image_size_[2];        // clip boxes to (height, width); 0 = no clip
};

}  // namespace odtk
