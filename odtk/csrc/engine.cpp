#include "engine.h"

#include <NvInfer.h>
#include <NvOnnxParser.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "plugins/decode_plugin.h"
#include "plugins/nms_plugin.h"

namespace odtk {

namespace {

constexpr char kMagic[8] = {'O', 'D', 'T', 'K', 'P', 'L', 'A', 'N'};
// Header layout (little-endian, read again by odtk/info.py: keep both in step), after the magic:
//   format 1: uint32 format, uint32 stride, uint64 metadata length, metadata
//   format 2: uint32 format, uint32 stride, uint32 dynamic (0/1), uint32 x 6 size profile (min height, width,
//             opt height, width, max height, width), uint64 metadata length, metadata
// Format 1 plans (fixed-size, written before dynamic sizes) still load.
constexpr uint32_t kFormat = 2;
constexpr char kInput[] = "input_1";
const char* const kOutputs[] = {"scores", "boxes", "classes"};

template <typename T>
void append(std::string& out, const T& value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

template <typename T>
T read(const std::string& in, size_t& pos) {
  if (pos + sizeof(T) > in.size()) throw std::runtime_error("truncated odtk plan header");
  T value;
  std::memcpy(&value, in.data() + pos, sizeof(T));
  pos += sizeof(T);
  return value;
}

nvinfer1::Dims4 input_dims(int batch, InputSize size) { return nvinfer1::Dims4(batch, 3, size.height, size.width); }

std::string shape_text(InputSize size) { return std::to_string(size.height) + "x" + std::to_string(size.width); }

// `size` no larger than `bound` in height and width.
bool fits(InputSize size, InputSize bound) { return size.height <= bound.height && size.width <= bound.width; }

// Whether the raw heads are rotated ones (odtk.rotated: 6 deltas per anchor, cell anchors of 5 values) rather than
// axis-aligned (4 deltas, anchors of 4 values), from each level's box head channels and anchor values.
bool rotated_heads(const std::vector<nvinfer1::ITensor*>& box_heads, const std::vector<std::vector<float>>& anchors) {
  int axis = 0, rotated = 0;
  for (size_t l = 0; l < box_heads.size(); ++l) {
    const auto channels = box_heads[l]->getDimensions().d[1];
    const auto values = static_cast<int64_t>(anchors[l].size());
    if (channels == values && values % 4 == 0) ++axis;
    else if (channels * 5 == values * 6 && values % 5 == 0) ++rotated;
    else throw std::invalid_argument("box_" + std::to_string(l + 1) + " has " + std::to_string(channels) +
                                     " channels for " + std::to_string(values) + " anchor values: expected A*4 for "
                                     "A*4 (axis-aligned) or A*6 for A*5 (rotated)");
  }
  if (axis && rotated) throw std::invalid_argument("the levels mix axis-aligned and rotated box heads");
  return rotated > 0;
}

// A new plugin of the axis-aligned or the rotated kind of Plugin.
template <template <bool> class Plugin, typename... Args>
std::unique_ptr<nvinfer1::IPluginV3> make_plugin(bool rotated, const Args&... args) {
  if (rotated) return std::make_unique<Plugin<true>>(args...);
  return std::make_unique<Plugin<false>>(args...);
}

// The build's size profile, checked: positive and ordered; one size when fixed.
void check_profile(const BuildOptions& o) {
  if (!(o.min_size.height > 0 && o.min_size.width > 0 && fits(o.min_size, o.opt_size) &&
        fits(o.opt_size, o.max_size)))
    throw std::invalid_argument("size profile " + shape_text(o.min_size) + ", " + shape_text(o.opt_size) + ", " +
                                shape_text(o.max_size) + ": need 0 < min <= opt <= max in height and width");
  if (!o.dynamic_size && !(fits(o.max_size, o.min_size)))
    throw std::invalid_argument("a fixed-size engine takes one input size: min = opt = max");
}

}  // namespace

// Collects TensorRT's errors (to put them in exceptions) and prints the rest when verbose.
class Engine::Logger : public nvinfer1::ILogger {
 public:
  explicit Logger(bool verbose) : verbose_(verbose) {}
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) errors_ += std::string(errors_.empty() ? "" : "; ") + msg;
    if (verbose_ || severity <= Severity::kWARNING) std::cerr << "TensorRT: " << msg << "\n";
  }
  std::string take_errors() { return std::exchange(errors_, std::string()); }

 private:
  bool verbose_;
  std::string errors_;
};

std::string Engine::version() {
  return std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) + "." +
         std::to_string(NV_TENSORRT_PATCH);
}

Engine::Engine(const std::string& onnx, const BuildOptions& options)
    : logger_(std::make_unique<Logger>(options.verbose)), metadata_(options.metadata) {
  if (!register_plugins()) throw std::runtime_error("cannot register the odtk TensorRT plugins");
  if (options.anchors.empty() || options.anchors.size() != options.strides.size())
    throw std::invalid_argument("one anchor set per stride needed");
  if (!(0 < options.min_batch && options.min_batch <= options.opt_batch && options.opt_batch <= options.max_batch))
    throw std::invalid_argument("batch profile needs 0 < min <= opt <= max");
  check_profile(options);
  std::unique_ptr<nvinfer1::IBuilder> builder(nvinfer1::createInferBuilder(*logger_));
  if (!builder) throw std::runtime_error("TensorRT builder: " + logger_->take_errors());
  // Explicit batch is the only mode since TensorRT 10; in 11 every network is strongly typed, so the precision
  // comes from the ONNX (odtk exports FP16 weights for an FP16 engine, Q/DQ nodes for INT8)
  std::unique_ptr<nvinfer1::INetworkDefinition> network(builder->createNetworkV2(0));
  std::unique_ptr<nvonnxparser::IParser> parser(nvonnxparser::createParser(*network, *logger_));
  if (!parser->parse(onnx.data(), onnx.size())) {
    std::string errors;
    for (int i = 0; i < parser->getNbErrors(); ++i) errors += std::string(i ? "; " : "") + parser->getError(i)->desc();
    throw std::runtime_error("TensorRT ONNX parser: " + errors);
  }

  // score_1..L, box_1..L -> per-level decode -> concatenation -> NMS -> scores, boxes, classes. A dynamic-size
  // engine's decode also takes input_1 (its shape only): boxes clip to each call's input size. Rotated heads take
  // the rotated decode and NMS plugins.
  nvinfer1::ITensor* image = network->getNbInputs() == 1 ? network->getInput(0) : nullptr;
  if (!image || std::strcmp(image->getName(), kInput) != 0)
    throw std::runtime_error(std::string("the ONNX must have one input, ") + kInput + " (an odtk raw-heads export)");
  const auto dims = image->getDimensions();
  const bool symbolic = dims.nbDims == 4 && dims.d[2] < 0 && dims.d[3] < 0;
  if (dims.nbDims != 4 || symbolic != options.dynamic_size)
    throw std::runtime_error(options.dynamic_size ? "a dynamic-size engine needs an ONNX with symbolic height and "
                                                    "width (export --raw-heads --dynamic-size)"
                                                  : "the ONNX input has no fixed height and width: build with "
                                                    "dynamic_size and a size profile");
  const size_t levels = options.strides.size();
  if (static_cast<size_t>(network->getNbOutputs()) != 2 * levels)
    throw std::runtime_error("the ONNX has " + std::to_string(network->getNbOutputs()) + " outputs, expected " +
                             std::to_string(2 * levels) + " (score_i, box_i: export with --raw-heads)");
  std::vector<nvinfer1::ITensor*> heads(2 * levels, nullptr);
  for (int i = 0; i < network->getNbOutputs(); ++i) {
    nvinfer1::ITensor* t = network->getOutput(i);
    int level = 0;
    if (std::sscanf(t->getName(), "score_%d", &level) == 1 && level >= 1 && level <= int(levels))
      heads[level - 1] = t;
    else if (std::sscanf(t->getName(), "box_%d", &level) == 1 && level >= 1 && level <= int(levels))
      heads[levels + level - 1] = t;
  }
  for (auto* t : heads)
    if (!t) throw std::runtime_error("the ONNX outputs are not score_1..N, box_1..N (export with --raw-heads)");
  for (auto* t : heads) network->unmarkOutput(*t);
  const bool rotated = rotated_heads(std::vector<nvinfer1::ITensor*>(heads.begin() + levels, heads.end()),
                                     options.anchors);

  std::vector<std::unique_ptr<nvinfer1::IPluginV3>> plugins;   // must outlive the build
  std::vector<nvinfer1::ITensor*> per_level[3];
  const bool dynamic = options.dynamic_size;
  for (size_t l = 0; l < levels; ++l) {
    plugins.push_back(make_plugin<BasicDecodePlugin>(rotated, options.anchors[l], options.strides[l],
                                                     options.score_threshold, options.top_n,
                                                     dynamic ? 0 : options.opt_size.height,
                                                     dynamic ? 0 : options.opt_size.width, dynamic));
    nvinfer1::ITensor* inputs[] = {heads[l], heads[levels + l], image};
    auto* layer = network->addPluginV3(inputs, dynamic ? 3 : 2, nullptr, 0, *plugins.back());
    if (!layer) throw std::runtime_error("cannot add the decode plugin: " + logger_->take_errors());
    layer->setName(("decode_" + std::to_string(l + 1)).c_str());
    for (int k = 0; k < 3; ++k) per_level[k].push_back(layer->getOutput(k));
  }
  nvinfer1::ITensor* candidates[3];
  for (int k = 0; k < 3; ++k) {
    auto* concat = network->addConcatenation(per_level[k].data(), static_cast<int32_t>(levels));
    concat->setAxis(1);
    candidates[k] = concat->getOutput(0);
  }
  plugins.push_back(make_plugin<BasicNMSPlugin>(rotated, options.nms_threshold, options.detections));
  auto* nms = network->addPluginV3(candidates, 3, nullptr, 0, *plugins.back());
  if (!nms) throw std::runtime_error("cannot add the NMS plugin: " + logger_->take_errors());
  nms->setName("nms");
  for (int k = 0; k < 3; ++k) {
    nms->getOutput(k)->setName(kOutputs[k]);
    network->markOutput(*nms->getOutput(k));
  }

  std::unique_ptr<nvinfer1::IBuilderConfig> config(builder->createBuilderConfig());
  config->setMemoryPoolLimit(nvinfer1::MemoryPoolType::kWORKSPACE, options.workspace_bytes);
#if NV_TENSORRT_MAJOR < 11
  if (options.fp16) config->setFlag(nvinfer1::BuilderFlag::kFP16);
  if (options.int8) config->setFlag(nvinfer1::BuilderFlag::kINT8);   // Q/DQ only: no calibrator is set
#endif
  auto* profile = builder->createOptimizationProfile();
  // batch and, for a dynamic-size engine, height and width; TensorRT refuses a fixed ONNX size outside the profile
  bool ok = profile->setDimensions(kInput, nvinfer1::OptProfileSelector::kMIN,
                                   input_dims(options.min_batch, options.min_size));
  ok = profile->setDimensions(kInput, nvinfer1::OptProfileSelector::kOPT,
                              input_dims(options.opt_batch, options.opt_size)) && ok;
  ok = profile->setDimensions(kInput, nvinfer1::OptProfileSelector::kMAX,
                              input_dims(options.max_batch, options.max_size)) && ok;
  if (!ok || config->addOptimizationProfile(profile) < 0)
    throw std::runtime_error("TensorRT rejects the optimisation profile: " + logger_->take_errors());

  std::unique_ptr<nvinfer1::IHostMemory> serialized(builder->buildSerializedNetwork(*network, *config));
  if (!serialized) throw std::runtime_error("TensorRT build failed: " + logger_->take_errors());
  stride_ = static_cast<int>(*std::max_element(options.strides.begin(), options.strides.end()));
  dynamic_ = options.dynamic_size;
  deserialize(serialized->data(), serialized->size());
}

Engine::Engine(const std::string& plan_path, bool verbose) : logger_(std::make_unique<Logger>(verbose)) {
  if (!register_plugins()) throw std::runtime_error("cannot register the odtk TensorRT plugins");
  std::ifstream file(plan_path, std::ios::binary);
  if (!file) throw std::runtime_error(plan_path + ": cannot open");
  std::string data((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (data.size() < sizeof(kMagic) || std::memcmp(data.data(), kMagic, sizeof(kMagic)) != 0)
    throw std::runtime_error(plan_path + ": not an odtk plan (export it with odtk export model.pth model.plan)");
  size_t pos = sizeof(kMagic);
  const auto format = read<uint32_t>(data, pos);
  if (format != 1 && format != kFormat)
    throw std::runtime_error(plan_path + ": odtk plan format " + std::to_string(format) + ", this odtk reads 1 to " +
                             std::to_string(kFormat) + " (export the plan again)");
  stride_ = static_cast<int>(read<uint32_t>(data, pos));
  if (format >= 2) {
    dynamic_ = read<uint32_t>(data, pos) != 0;
    pos += 6 * sizeof(uint32_t);   // the size profile, for readers without TensorRT: the engine has its own
  }
  auto length = read<uint64_t>(data, pos);
  if (pos + length > data.size()) throw std::runtime_error(plan_path + ": truncated odtk plan");
  metadata_ = data.substr(pos, length);
  pos += length;
  deserialize(data.data() + pos, data.size() - pos);
}

Engine::~Engine() = default;

void Engine::deserialize(const void* data, size_t size) {
  runtime_.reset(nvinfer1::createInferRuntime(*logger_));
  if (runtime_) engine_.reset(runtime_->deserializeCudaEngine(data, size));
  if (!engine_) throw std::runtime_error("TensorRT cannot load the engine (built by another TensorRT version or "
                                         "GPU?): " + logger_->take_errors());
  context_.reset(engine_->createExecutionContext());
  if (!context_) throw std::runtime_error("TensorRT execution context: " + logger_->take_errors());
  auto opt = engine_->getProfileShape(kInput, 0, nvinfer1::OptProfileSelector::kOPT);
  last_ = InputSize{static_cast<int>(opt.d[2]), static_cast<int>(opt.d[3])};
  plan_.assign(static_cast<const char*>(data), size);
}

void Engine::save(const std::string& path) const {
  std::string header(kMagic, sizeof(kMagic));
  append(header, kFormat);
  append(header, static_cast<uint32_t>(stride_));
  append(header, static_cast<uint32_t>(dynamic_));
  for (const auto& size : size_profile())
    for (int side : size) append(header, static_cast<uint32_t>(side));
  append(header, static_cast<uint64_t>(metadata_.size()));
  header += metadata_;
  std::ofstream file(path, std::ios::binary | std::ios::trunc);   // odtk writes a temp file and renames it
  file.write(header.data(), static_cast<std::streamsize>(header.size()));
  file.write(plan_.data(), static_cast<std::streamsize>(plan_.size()));
  if (!file) throw std::runtime_error(path + ": cannot write the plan");
}

void Engine::infer(int batch, int height, int width, const float* input, float* scores, float* boxes,
                   float* classes, cudaStream_t stream) {
  if (batch < 1 || batch > max_batch())
    throw std::invalid_argument("batch " + std::to_string(batch) + " outside the engine's 1.." +
                                std::to_string(max_batch()));
  const auto profile = size_profile();
  const InputSize size{height, width}, low{profile[0][0], profile[0][1]}, high{profile[2][0], profile[2][1]};
  if (!fits(low, size) || !fits(size, high))
    throw std::invalid_argument("input " + shape_text(size) + " outside the engine's " +
                                (dynamic_ ? "size profile " + shape_text(low) + " to " + shape_text(high)
                                          : "input size " + shape_text(low)));
  if (!context_->setInputShape(kInput, input_dims(batch, size)))
    throw std::runtime_error("TensorRT rejects the input shape: " + logger_->take_errors());
  last_ = size;
  void* buffers[] = {scores, boxes, classes};
  bool ok = context_->setTensorAddress(kInput, const_cast<float*>(input));
  for (int k = 0; k < 3; ++k) ok = context_->setTensorAddress(kOutputs[k], buffers[k]) && ok;
  if (!ok || !context_->enqueueV3(stream)) throw std::runtime_error("TensorRT inference: " + logger_->take_errors());
}

std::vector<int> Engine::input_size() const { return {last_.height, last_.width}; }

std::vector<std::vector<int>> Engine::size_profile() const {
  std::vector<std::vector<int>> sizes;
  for (auto selector : {nvinfer1::OptProfileSelector::kMIN, nvinfer1::OptProfileSelector::kOPT,
                        nvinfer1::OptProfileSelector::kMAX}) {
    auto dims = engine_->getProfileShape(kInput, 0, selector);
    sizes.push_back({static_cast<int>(dims.d[2]), static_cast<int>(dims.d[3])});
  }
  return sizes;
}

int Engine::max_batch() const {
  return static_cast<int>(engine_->getProfileShape(kInput, 0, nvinfer1::OptProfileSelector::kMAX).d[0]);
}

int Engine::max_detections() const { return static_cast<int>(engine_->getTensorShape(kOutputs[0]).d[1]); }

int Engine::box_size() const { return static_cast<int>(engine_->getTensorShape(kOutputs[1]).d[2]); }

}  // namespace odtk
