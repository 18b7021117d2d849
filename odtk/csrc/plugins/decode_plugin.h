// DecodePlugin: one pyramid level's score threshold, top-n and box decoding (odtk::cuda::decode) in a
// TensorRT network. Inputs score [B, A*C, H, W] and box [B, A*4, H, W] (and, with clip_to_input, the network's
// image input [B, 3, height, width], whose shape only is read); outputs scores [B, top_n], boxes [B, top_n, 4],
// classes [B, top_n]. H and W are read from the inputs at each enqueue, so one plugin serves any input size.
// DecodeRotatePlugin: the same for rotated anchors (odtk::cuda::decode_rotated): cell anchors A*5 floats
// (x1, y1, x2, y2, theta), box input [B, A*6, H, W], boxes [B, top_n, 5].
#pragma once

#include <vector>

#include "plugin.h"

namespace odtk {

template <bool Rotated>
class BasicDecodePlugin : public PluginBase<BasicDecodePlugin<Rotated>> {
 public:
  static constexpr char const* kName = Rotated ? "OdtkDecodeRotate" : "OdtkDecode";
  static constexpr int32_t kBoxSize = Rotated ? 5 : 4;   // values per cell anchor and per output box

  // image_h, image_w > 0: clip boxes to that fixed size; clip_to_input: clip to the third input's height and
  // width at each enqueue instead (dynamic-size engines); neither: no clip.
  BasicDecodePlugin(std::vector<float> cell_anchors, float stride, float score_threshold, int32_t top_n,
                    int32_t image_h, int32_t image_w, bool clip_to_input = false);
  explicit BasicDecodePlugin(nvinfer1::PluginFieldCollection const* fields);   // from the creator / a plan
  static std::vector<nvinfer1::PluginField> field_names();
  static constexpr int32_t kInputDims = 4;
  int32_t inputs() const { return clip_to_input_ ? 3 : 2; }
  int32_t outputs_per_image() const { return top_n_; }

  std::vector<nvinfer1::PluginField> fields();   // pointing at the members, for serialisation
  size_t workspace_size(nvinfer1::Dims const& input) const;
  void run(nvinfer1::PluginTensorDesc const* desc, void const* const* inputs, void* const* outputs, void* workspace,
           cudaStream_t stream);

 private:
  void check() const;
  size_t kernel(nvinfer1::Dims const& input, int32_t const image_size[2], void const* const* inputs,
                void* const* outputs, float const* anchors, void* workspace, size_t workspace_size,
                cudaStream_t stream) const;

  std::vector<float> anchors_;   // [A, kBoxSize], copied to the workspace at each enqueue
  float stride_;
  float score_threshold_;
  int32_t top_n_;
  int32_t image_size_[2];        // clip boxes to (height, width); 0 = no clip (or clip_to_input_)
  int32_t clip_to_input_ = 0;    // 1: clip to input 2's (height, width) at each enqueue; absent in format-1 plans
};

using DecodePlugin = BasicDecodePlugin<false>;
using DecodeRotatePlugin = BasicDecodePlugin<true>;
extern template class BasicDecodePlugin<false>;   // both defined in decode_plugin.cpp
extern template class BasicDecodePlugin<true>;

}  // namespace odtk
