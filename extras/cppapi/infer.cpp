// Runs an odtk .plan on one image and prints its detections (original pixels, the dataset's category ids):
//   infer model.plan image.jpg
// Preprocessing as odtk infer: scale to fit the engine's input (a dynamic-size engine: shorter side to the
// metadata's resize, longer capped by max_size, as a .pth), RGB, /255, mean/std from the plan's metadata, pad
// bottom/right with zeros (a dynamic-size engine: to a multiple of size_divisible, at least the profile's min).
#include <cuda_runtime_api.h>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine.h"

namespace {

void check(cudaError_t status) {
  if (status != cudaSuccess) throw std::runtime_error(cudaGetErrorString(status));
}

// A device buffer of n floats, freed when it goes out of scope.
struct DeviceBuffer {
  explicit DeviceBuffer(size_t n) {
    void* p = nullptr;
    check(cudaMalloc(&p, n * sizeof(float)));
    data = static_cast<float*>(p);
  }
  ~DeviceBuffer() { cudaFree(data); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  float* data = nullptr;
};

// The numbers of the JSON array under "key" in odtk's flat metadata object (no JSON library needed for that).
std::vector<double> json_numbers(const std::string& json, const std::string& key) {
  std::vector<double> values;
  size_t pos = json.find("\"" + key + "\"");
  if (pos == std::string::npos) return values;
  pos = json.find('[', pos);
  size_t end = json.find(']', pos);
  if (pos == std::string::npos || end == std::string::npos) return values;
  const char* p = json.c_str() + pos + 1;
  const char* stop = json.c_str() + end;
  while (p < stop) {
    char* next = nullptr;
    double v = std::strtod(p, &next);
    if (next == p) {
      ++p;
      continue;
    }
    values.push_back(v);
    p = next;
  }
  return values;
}

// The number under "key" in odtk's flat metadata object, or `fallback`.
double json_number(const std::string& json, const std::string& key, double fallback) {
  size_t pos = json.find("\"" + key + "\"");
  if (pos == std::string::npos || (pos = json.find(':', pos)) == std::string::npos) return fallback;
  char* end = nullptr;
  double value = std::strtod(json.c_str() + pos + 1, &end);
  return end == json.c_str() + pos + 1 ? fallback : value;
}

int round_up(int side, int multiple) { return (side + multiple - 1) / multiple * multiple; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " model.plan image.jpg\n";
    return 2;
  }
  try {
    odtk::Engine engine(argv[1]);
    const std::string meta = engine.metadata();
    auto mean = json_numbers(meta, "mean"), std_dev = json_numbers(meta, "std");
    auto category_ids = json_numbers(meta, "category_ids");
    if (mean.size() != 3 || std_dev.size() != 3) mean = {0.485, 0.456, 0.406}, std_dev = {0.229, 0.224, 0.225};

    cv::Mat image = cv::imread(argv[2], cv::IMREAD_COLOR);
    if (image.empty()) throw std::runtime_error(std::string(argv[2]) + ": cannot read the image");
    std::vector<int> size = engine.input_size();
    double ratio = std::min(double(size[0]) / image.rows, double(size[1]) / image.cols);
    if (engine.dynamic_size()) {   // odtk.data.resize_ratio, then the padded size the profile takes
      const double resize = json_number(meta, "resize", 800), max_size = json_number(meta, "max_size", 1333);
      const int divisible = int(json_number(meta, "size_divisible", 32));
      ratio = resize / std::min(image.rows, image.cols);
      if (ratio * std::max(image.rows, image.cols) > max_size) ratio = max_size / std::max(image.rows, image.cols);
      const auto profile = engine.size_profile();
      for (int k = 0; k < 2; ++k)
        size[k] = std::max(profile[0][k], round_up(int(std::lround((k ? image.cols : image.rows) * ratio)),
                                                   divisible));
    }
    const int h = std::min(size[0], std::max(1, int(std::lround(image.rows * ratio))));
    const int w = std::min(size[1], std::max(1, int(std::lround(image.cols * ratio))));
    cv::Mat resized, rgb;
    cv::resize(image, resized, cv::Size(w, h), 0, 0, cv::INTER_LINEAR);
    cv::cvtColor(resized, rgb, cv::COLOR_BGR2RGB);
    std::vector<float> input(3 * size_t(size[0]) * size[1], 0.f);   // CHW, zero padded
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) {
        const cv::Vec3b& px = rgb.at<cv::Vec3b>(y, x);
        for (int c = 0; c < 3; ++c)
          input[(size_t(c) * size[0] + y) * size[1] + x] = float((px[c] / 255.0 - mean[c]) / std_dev[c]);
      }

    const int detections = engine.max_detections(), box_size = engine.box_size();   // 5: rotated, theta last
    DeviceBuffer d_input(input.size()), d_scores(detections), d_boxes(box_size * size_t(detections)),
        d_classes(detections);
    cudaStream_t stream;
    check(cudaStreamCreate(&stream));
    check(cudaMemcpyAsync(d_input.data, input.data(), input.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
    engine.infer(1, size[0], size[1], d_input.data, d_scores.data, d_boxes.data, d_classes.data, stream);
    std::vector<float> scores(detections), boxes(box_size * size_t(detections)), classes(detections);
    for (auto [host, device] : {std::pair{&scores, &d_scores}, std::pair{&boxes, &d_boxes},
                                std::pair{&classes, &d_classes}})
      check(cudaMemcpyAsync(host->data(), device->data, host->size() * sizeof(float), cudaMemcpyDeviceToHost,
                            stream));
    check(cudaStreamSynchronize(stream));
    check(cudaStreamDestroy(stream));

    std::printf("category_id score x1 y1 x2 y2%s (%s, input %dx%d)\n", box_size == 5 ? " theta" : "", argv[2],
                size[0], size[1]);
    for (int i = 0; i < detections && scores[i] > 0; ++i) {
      const int cls = int(classes[i]);
      const double category = cls < int(category_ids.size()) ? category_ids[cls] : cls + 1;
      const float* box = &boxes[box_size * size_t(i)];
      std::printf("%g %.4f %.1f %.1f %.1f %.1f", category, scores[i], box[0] / ratio, box[1] / ratio,
                  box[2] / ratio, box[3] / ratio);
      if (box_size == 5) std::printf(" %.4f", box[4]);   // radians: resizing keeps angles
      std::printf("\n");
    }
  } catch (const std::exception& e) {
    std::cerr << "infer: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
