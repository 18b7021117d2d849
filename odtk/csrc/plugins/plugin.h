// What the decode and NMS plugins (axis-aligned and rotated) share on TensorRT's IPluginV3 API: the capability
// plumbing, names, the no-op shape hooks, and reading/writing their serialisable fields.
#pragma once

#include <NvInferRuntime.h>

#include <cstring>
#include <string>
#include <vector>

namespace odtk {

constexpr char kPluginVersion[] = "1";
constexpr char kPluginNamespace[] = "";

// The values of field `name` in `fields`; empty when absent or of another type.
template <typename T>
std::vector<T> field_values(nvinfer1::PluginFieldCollection const* fields, const char* name,
                            nvinfer1::PluginFieldType type) {
  for (int32_t i = 0; fields && i < fields->nbFields; ++i) {
    auto const& f = fields->fields[i];
    if (f.name && std::strcmp(f.name, name) == 0 && f.type == type && f.data) {
      auto const* data = static_cast<T const*>(f.data);
      return std::vector<T>(data, data + f.length);
    }
  }
  return {};
}

// Core/build/runtime capabilities in one object. Derived gives kName, kInputDims, kBoxSize (values per output box:
// 4, or 5 for rotated boxes), inputs() (how many it takes), outputs_per_image(), fields() (its serialisable
// members), workspace_size(max dims of input 0) and run() (the kernel launch, given every input's descriptor).
template <typename Derived>
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime {
 public:
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
    switch (type) {
      case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
      case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
      case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  nvinfer1::IPluginV3* clone() noexcept override {
    try {
      return new Derived(static_cast<Derived const&>(*this));
    } catch (...) {
      return nullptr;
    }
  }
  char const* getPluginName() const noexcept override { return Derived::kName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  int32_t getNbOutputs() const noexcept override { return 3; }
  int32_t getOutputDataTypes(nvinfer1::DataType* types, int32_t nb_outputs, nvinfer1::DataType const*,
                             int32_t) const noexcept override {
    for (int32_t i = 0; i < nb_outputs; ++i) types[i] = nvinfer1::DataType::kFLOAT;   // classes too, as ODTK
    return 0;
  }
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* in_out, int32_t,
                                 int32_t) noexcept override {
    return in_out[pos].desc.type == nvinfer1::DataType::kFLOAT &&
           in_out[pos].desc.format == nvinfer1::TensorFormat::kLINEAR;
  }
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const*, int32_t, nvinfer1::DynamicPluginTensorDesc const*,
                          int32_t) noexcept override {
    return 0;
  }
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const*, int32_t, nvinfer1::PluginTensorDesc const*,
                        int32_t) noexcept override {
    return 0;
  }
  // The plugins map inputs whose first has Derived::kInputDims dimensions [B, ...] to detections:
  // scores [B, K], boxes [B, K, kBoxSize], classes [B, K] with K = Derived::outputs_per_image().
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nb_inputs, nvinfer1::DimsExprs const*, int32_t,
                          nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& exprs) noexcept override {
    auto const& self = static_cast<Derived const&>(*this);
    if (nb_inputs != self.inputs() || nb_outputs != 3 || inputs[0].nbDims != Derived::kInputDims) return -1;
    auto const* batch = inputs[0].d[0];
    auto const* count = exprs.constant(self.outputs_per_image());
    outputs[0].nbDims = 2;
    outputs[0].d[0] = batch;
    outputs[0].d[1] = count;
    outputs[1].nbDims = 3;
    outputs[1].d[0] = batch;
    outputs[1].d[1] = count;
    outputs[1].d[2] = exprs.constant(Derived::kBoxSize);
    outputs[2] = outputs[0];
    return 0;
  }
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override {
    fields_ = static_cast<Derived&>(*this).fields();
    serialized_ = nvinfer1::PluginFieldCollection{static_cast<int32_t>(fields_.size()), fields_.data()};
    return &serialized_;
  }
  // Sized for the largest input the profile allows.
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t,
                          nvinfer1::DynamicPluginTensorDesc const*, int32_t) const noexcept override {
    try {
      return static_cast<Derived const&>(*this).workspace_size(inputs[0].max);
    } catch (...) {
      return 0;
    }
  }
  int32_t enqueue(nvinfer1::PluginTensorDesc const* input_desc, nvinfer1::PluginTensorDesc const*,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override {
    try {   // the kernels throw on CUDA errors; TensorRT wants a status
      static_cast<Derived&>(*this).run(input_desc, inputs, outputs, workspace, stream);
      return 0;
    } catch (...) {
      return -1;
    }
  }
  // No per-context state: every context can share a copy.
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override { return clone(); }

 private:
  // getFieldsToSerialize's storage: it points into the plugin's members, and lives as long as the plugin
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection serialized_{};
};

// A creator for Plugin, which lists its fields and builds it from a field collection.
template <typename Plugin>
class PluginCreator : public nvinfer1::IPluginCreatorV3One {
 public:
  PluginCreator() : fields_(Plugin::field_names()) {
    collection_ = nvinfer1::PluginFieldCollection{static_cast<int32_t>(fields_.size()), fields_.data()};
  }
  char const* getPluginName() const noexcept override { return Plugin::kName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }
  nvinfer1::IPluginV3* createPlugin(char const*, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase) noexcept override {
    try {
      return new Plugin(fc);
    } catch (...) {
      return nullptr;
    }
  }

 private:
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection collection_;
};

// Registers the creators of the four plugins with TensorRT's global registry (once; later calls do nothing).
bool register_plugins();

}  // namespace odtk
