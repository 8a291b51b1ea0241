// A C++ ONNX Runtime host: runs an ONNX model whose loss is deploy_ctc::CTCLoss (e.g. from deploy_ctc.onnx.export)
// with deploy_ctc's native custom-op library, no Python involved, and prints every output.
//
//   ctc_host MODEL.onnx LIBRARY.so NAME=FILE.npy ... [--repeat K] [--no-spinning]
//
// Each NAME=FILE.npy feeds graph input NAME from a NumPy .npy file (little-endian float32 / float64 / int32 /
// int64, C order; np.save writes them). Each output is printed as "NAME dtype shape: v0 v1 ..." with enough digits
// to round-trip (9 for float32, 17 for float64); with --repeat K the run is repeated K times and the median
// milliseconds per run printed last ("median_ms X"); --no-spinning sets session.intra_op.allow_spinning=0 (as the
// benchmark's Python sessions).
//
// Build: export_examples/cpp/README.md (headers from Debian's libonnxruntime-dev or $DEPLOY_CTC_ORT_INCLUDE; linked
// to any libonnxruntime at least as new as the headers, e.g. the one inside the onnxruntime wheel).

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// One input: its name, element type, shape and bytes.
struct Array {
  std::string name;
  ONNXTensorElementDataType type;
  std::vector<std::int64_t> shape;
  std::vector<char> data;
};

// Reads a version 1-3 .npy file: magic, header length, a Python dict literal with descr, fortran_order and shape.
Array read_npy(const std::string& name, const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open " + path);
  char magic[8];
  if (!file.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + ": not .npy");
  std::uint32_t header_size = 0;
  unsigned char size_bytes[4] = {0, 0, 0, 0};
  file.read(reinterpret_cast<char*>(size_bytes), magic[6] == 1 ? 2 : 4);
  for (int i = 3; i >= 0; --i) header_size = header_size << 8 | size_bytes[i];
  std::string header(header_size, '\0');
  file.read(header.data(), header_size);
  auto value_of = [&](const std::string& key) {
    const std::size_t at = header.find("'" + key + "':");
    if (at == std::string::npos) throw std::runtime_error(path + ": header lacks " + key);
    return header.substr(at + key.size() + 3);
  };
  Array array{name, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, {}, {}};
  const std::string descr = value_of("descr");
  const std::pair<const char*, ONNXTensorElementDataType> types[] = {
      {"'<f4'", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT}, {"'<f8'", ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE},
      {"'<i4'", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32}, {"'<i8'", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64}};
  std::size_t item = 0;
  for (const auto& [code, type] : types)
    if (descr.find(code) != std::string::npos && descr.find(code) < descr.find(',')) {
      array.type = type;
      item = code[3] == '4' ? 4 : 8;
    }
  if (item == 0) throw std::runtime_error(path + ": dtype must be float32/float64/int32/int64, got " + descr);
  if (value_of("fortran_order").rfind(" False", 0) != 0) throw std::runtime_error(path + ": not C order");
  const std::string shape = value_of("shape");
  const std::size_t open = shape.find('('), close = shape.find(')');
  std::int64_t count = 1;
  for (std::size_t pos = open + 1; pos < close;) {
    const std::size_t end = std::min(shape.find(',', pos), close);
    const std::string dim = shape.substr(pos, end - pos);
    if (dim.find_first_not_of(' ') != std::string::npos) {
      array.shape.push_back(std::stoll(dim));
      count *= array.shape.back();
    }
    pos = end + 1;
  }
  array.data.resize(static_cast<std::size_t>(count) * item);
  if (!file.read(array.data.data(), static_cast<std::streamsize>(array.data.size())))
    throw std::runtime_error(path + ": fewer values than its shape");
  return array;
}

void print_output(const std::string& name, const Ort::Value& value) {
  const auto info = value.GetTensorTypeAndShapeInfo();
  const std::vector<std::int64_t> shape = info.GetShape();
  const std::size_t count = info.GetElementCount();
  const bool is_double = info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
  std::printf("%s %s (", name.c_str(), is_double ? "float64" : "float32");
  for (std::size_t i = 0; i < shape.size(); ++i) std::printf("%s%lld", i ? ", " : "", static_cast<long long>(shape[i]));
  std::printf(shape.size() == 1 ? ",):" : "):");
  for (std::size_t i = 0; i < count; ++i) {
    if (is_double) std::printf(" %.17g", value.GetTensorData<double>()[i]);
    else std::printf(" %.9g", static_cast<double>(value.GetTensorData<float>()[i]));
  }
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL.onnx LIBRARY.so NAME=FILE.npy ... [--repeat K] [--no-spinning]\n",
                 argv[0]);
    return 2;
  }
  try {
    std::vector<Array> arrays;
    int repeat = 0;
    bool spinning = true;
    for (int i = 3; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--no-spinning") {
        spinning = false;
        continue;
      }
      if (arg == "--repeat" && i + 1 < argc) {
        repeat = std::stoi(argv[++i]);
        continue;
      }
      const std::size_t eq = arg.find('=');
      if (eq == std::string::npos) throw std::runtime_error("expected NAME=FILE.npy, got " + arg);
      arrays.push_back(read_npy(arg.substr(0, eq), arg.substr(eq + 1)));
    }

    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "ctc_host");
    Ort::SessionOptions options;
    if (!spinning) options.AddConfigEntry("session.intra_op.allow_spinning", "0");
    options.RegisterCustomOpsLibrary(argv[2]);  // deploy_ctc's library: serves deploy_ctc::CTCLoss / CTCLossGrad
    Ort::Session session(env, argv[1], options);

    // Inputs over the arrays' own memory (no copy); outputs as the model declares them.
    const Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<const char*> input_names;
    std::vector<Ort::Value> inputs;
    for (Array& a : arrays) {
      input_names.push_back(a.name.c_str());
      inputs.push_back(Ort::Value::CreateTensor(memory, a.data.data(), a.data.size(), a.shape.data(), a.shape.size(),
                                                a.type));
    }
    Ort::AllocatorWithDefaultOptions allocator;
    std::vector<std::string> output_names;
    for (std::size_t i = 0; i < session.GetOutputCount(); ++i)
      output_names.push_back(session.GetOutputNameAllocated(i, allocator).get());
    std::vector<const char*> output_pointers;
    for (const std::string& n : output_names) output_pointers.push_back(n.c_str());

    auto run = [&] {
      return session.Run(Ort::RunOptions{nullptr}, input_names.data(), inputs.data(), inputs.size(),
                         output_pointers.data(), output_pointers.size());
    };
    std::vector<Ort::Value> outputs = run();
    for (std::size_t i = 0; i < outputs.size(); ++i) print_output(output_names[i], outputs[i]);
    if (repeat > 0) {
      std::vector<double> ms;
      for (int r = 0; r < repeat; ++r) {
        const auto start = std::chrono::steady_clock::now();
        run();
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
      }
      std::sort(ms.begin(), ms.end());
      std::printf("median_ms %.4f\n", ms[ms.size() / 2]);
    }
  } catch (const std::exception& error) {  // Ort::Exception included: ONNX Runtime's message, e.g. a bad input
    std::fprintf(stderr, "ctc_host: %s\n", error.what());
    return 1;
  }
  return 0;
}
