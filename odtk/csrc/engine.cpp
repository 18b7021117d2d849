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
constexpr uint32_t kFormat = 1;
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

nvinfer1::Dims4 input_dims(int batch, int height, int width) { return nvinfer1::Dims4(batch, 3, height, width); }

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

  // score_1..L, box_1..L -> per-level decode -> concatenation -> NMS -> scores, boxes, classes
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

  std::vector<std::unique_ptr<nvinfer1::IPluginV3>> plugins;   // must outlive the build
  std::vector<nvinfer1::ITensor*> per_level[3];
  for (size_t l = 0; l < levels; ++l) {
    plugins.emplace_back(new DecodePlugin(options.anchors[l], options.strides[l], options.score_threshold,
                                          options.top_n, options.height, options.width));
    nvinfer1::ITensor* inputs[] = {heads[l], heads[levels + l]};
    auto* layer = network->addPluginV3(inputs, 2, nullptr, 0, *plugins.back());
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
  plugins.emplace_back(new NMSPlugin(options.nms_threshold, options.detections));
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
  profile->setDimensions(kInput, nvinfer1::OptProfileSelector::kMIN,
                         input_dims(options.min_batch, options.height, options.width));
  profile->setDimensions(kInput, nvinfer1::OptProfileSelector::kOPT,
                         input_dims(options.opt_batch, options.height, options.width));
  profile->setDimensions(kInput, nvinfer1::OptProfileSelector::kMAX,
                         input_dims(options.max_batch, options.height, options.width));
  config->addOptimizationProfile(profile);

  std::unique_ptr<nvinfer1::IHostMemory> serialized(builder->buildSerializedNetwork(*network, *config));
  if (!serialized) throw std::runtime_error("TensorRT build failed: " + logger_->take_errors());
  stride_ = static_cast<int>(*std::max_element(options.strides.begin(), options.strides.end()));
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
  if (read<uint32_t>(data, pos) != kFormat) throw std::runtime_error(plan_path + ": unknown odtk plan format");
  stride_ = static_cast<int>(read<uint32_t>(data, pos));
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
  plan_.assign(static_cast<const char*>(data), size);
}

void Engine::save(const std::string& path) const {
  std::string header(kMagic, sizeof(kMagic));
  append(header, kFormat);
  append(header, static_cast<uint32_t>(stride_));
  append(header, static_cast<uint64_t>(metadata_.size()));
  header += metadata_;
  std::ofstream file(path, std::ios::binary | std::ios::trunc);   // odtk writes a temp file and renames it
  file.write(header.data(), static_cast<std::streamsize>(header.size()));
  file.write(plan_.data(), static_cast<std::streamsize>(plan_.size()));
  if (!file) throw std::runtime_error(path + ": cannot write the plan");
}

void Engine::infer(int batch, const float* input, float* scores, float* boxes, float* classes, cudaStream_t stream) {
  auto size = input_size();
  if (batch < 1 || batch > max_batch())
    throw std::invalid_argument("batch " + std::to_string(batch) + " outside the engine's 1.." +
                                std::to_string(max_batch()));
  if (!context_->setInputShape(kInput, input_dims(batch, size[0], size[1])))
    throw std::runtime_error("TensorRT rejects the input shape: " + logger_->take_errors());
  void* buffers[] = {scores, boxes, classes};
  bool ok = context_->setTensorAddress(kInput, const_cast<float*>(input));
  for (int k = 0; k < 3; ++k) ok = context_->setTensorAddress(kOutputs[k], buffers[k]) && ok;
  if (!ok || !context_->enqueueV3(stream)) throw std::runtime_error("TensorRT inference: " + logger_->take_errors());
}

std::vector<int> Engine::input_size() const {
  auto dims = engine_->getTensorShape(kInput);
  return {static_cast<int>(dims.d[2]), static_cast<int>(dims.d[3])};
}

int Engine::max_batch() const {
  return static_cast<int>(engine_->getProfileShape(kInput, 0, nvinfer1::OptProfileSelector::kMAX).d[0]);
}

int Engine::max_detections() const { return static_cast<int>(engine_->getTensorShape(kOutputs[0]).d[1]); }

}  // namespace odtk
