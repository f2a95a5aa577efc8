// ign_project: run an ign_fast TorchScript export (ign-fast export RUN --format torchscript) from C++.
//
//   ign_project MODEL.pt project INPUT OUTPUT [STEPS]      OUTPUT = f^STEPS(INPUT)
//   ign_project MODEL.pt generate N SEED OUTPUT [STEPS]    OUTPUT = f^STEPS(z), z = prior(eps), eps seeded
//
// Files are chosen by extension, to stay free of image libraries:
//   .pgm / .ppm   8-bit binary netpbm (P5 gray, P6 colour), pixel p <-> value p / 127.5 - 1. A generated or
//                 projected batch is written as one row of images. A gray input fed to a colour model is
//                 replicated over the three channels.
//   .f32          "IGNF32 <ndim> <d0> ... <dk>\n" then the tensor's float32 values, little-endian, row-major.
// STEPS defaults to the N the file was exported with.
#include <torch/script.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Netpbm headers may carry '#' comments between fields.
std::string next_token(std::istream& in) {
  std::string token;
  while (in >> token) {
    if (token[0] != '#') return token;
    std::string rest;
    std::getline(in, rest);
  }
  throw std::runtime_error("truncated netpbm header");
}

torch::Tensor read_netpbm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  const std::string magic = next_token(in);
  if (magic != "P5" && magic != "P6") throw std::runtime_error(path + ": only binary P5/P6 netpbm is read");
  const int64_t width = std::stoll(next_token(in));
  const int64_t height = std::stoll(next_token(in));
  const int64_t maxval = std::stoll(next_token(in));
  if (maxval != 255) throw std::runtime_error(path + ": only 8-bit netpbm (maxval 255) is read");
  in.get();  // the single whitespace byte before the pixels
  const int64_t channels = magic == "P5" ? 1 : 3;
  std::vector<uint8_t> pixels(static_cast<size_t>(width * height * channels));
  in.read(reinterpret_cast<char*>(pixels.data()), static_cast<std::streamsize>(pixels.size()));
  if (in.gcount() != static_cast<std::streamsize>(pixels.size())) throw std::runtime_error(path + ": truncated");
  auto hwc = torch::from_blob(pixels.data(), {height, width, channels}, torch::kUInt8).to(torch::kFloat32);
  return (hwc.permute({2, 0, 1}) / 127.5 - 1.0).unsqueeze(0).contiguous();  // [1, C, H, W] in [-1, 1]
}

void write_netpbm(const torch::Tensor& batch, const std::string& path) {
  // [N, C, H, W] -> one row of N images.
  auto images = batch.detach().to(torch::kCPU).to(torch::kFloat32).clamp(-1, 1);
  const int64_t n = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  if (channels != 1 && channels != 3) throw std::runtime_error("netpbm output needs 1 or 3 channels");
  auto row = images.permute({2, 0, 3, 1}).reshape({height, n * width, channels});
  auto bytes = ((row + 1.0) * 127.5).round().to(torch::kUInt8).contiguous();
  std::ofstream out(path, std::ios::binary);
  out << (channels == 1 ? "P5" : "P6") << "\n" << n * width << " " << height << "\n255\n";
  out.write(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), static_cast<std::streamsize>(bytes.numel()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

torch::Tensor read_f32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::string header;
  std::getline(in, header);
  std::istringstream fields(header);
  std::string magic;
  int64_t ndim = 0;
  fields >> magic >> ndim;
  if (magic != "IGNF32" || ndim < 1 || ndim > 8) throw std::runtime_error(path + ": not an IGNF32 file");
  std::vector<int64_t> shape(static_cast<size_t>(ndim));
  for (auto& d : shape) {
    if (!(fields >> d) || d < 0) throw std::runtime_error(path + ": bad IGNF32 shape");
  }
  auto tensor = torch::empty(shape, torch::kFloat32);
  const auto bytes = static_cast<std::streamsize>(tensor.numel() * sizeof(float));
  in.read(reinterpret_cast<char*>(tensor.data_ptr<float>()), bytes);
  if (in.gcount() != bytes) throw std::runtime_error(path + ": truncated");
  return tensor;
}

void write_f32(const torch::Tensor& tensor, const std::string& path) {
  auto values = tensor.detach().to(torch::kCPU).to(torch::kFloat32).contiguous();
  std::ofstream out(path, std::ios::binary);
  out << "IGNF32 " << values.dim();
  for (auto d : values.sizes()) out << " " << d;
  out << "\n";
  out.write(reinterpret_cast<const char*>(values.data_ptr<float>()),
            static_cast<std::streamsize>(values.numel() * sizeof(float)));
  if (!out) throw std::runtime_error("cannot write " + path);
}

torch::Tensor read_input(const std::string& path) {
  if (ends_with(path, ".f32")) return read_f32(path);
  if (ends_with(path, ".pgm") || ends_with(path, ".ppm")) return read_netpbm(path);
  throw std::runtime_error("input must end in .pgm, .ppm or .f32: " + path);
}

void write_output(const torch::Tensor& tensor, const std::string& path) {
  if (ends_with(path, ".f32")) return write_f32(tensor, path);
  if (ends_with(path, ".pgm") || ends_with(path, ".ppm")) return write_netpbm(tensor, path);
  throw std::runtime_error("output must end in .pgm, .ppm or .f32: " + path);
}

c10::optional<int64_t> optional_steps(int argc, char** argv, int index) {
  if (argc > index) return std::stoll(argv[index]);
  return c10::nullopt;
}

int usage() {
  std::cerr << "usage: ign_project MODEL.pt project INPUT OUTPUT [STEPS]\n"
               "       ign_project MODEL.pt generate N SEED OUTPUT [STEPS]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) return usage();
  const std::string model_path = argv[1], mode = argv[2];
  try {
    torch::NoGradGuard no_grad;
    torch::jit::Module projector = torch::jit::load(model_path);
    projector.eval();
    torch::Tensor result;
    if (mode == "project") {
      torch::Tensor x = read_input(argv[3]);
      const auto expected = projector.attr("input_shape").toIntList();
      // A gray image given to a colour model: replicate it, as ign_fast's Projector does.
      if (x.dim() == 4 && x.size(1) == 1 && expected.size() == 3 && expected.get(0) == 3) x = x.expand({-1, 3, -1, -1});
      result = projector.forward({x, optional_steps(argc, argv, 5)}).toTensor();
      write_output(result, argv[4]);
      std::cout << "projected " << argv[3] << " -> " << argv[4] << " " << result.sizes() << "\n";
    } else if (mode == "generate" && argc >= 6) {
      const int64_t n = std::stoll(argv[3]), seed = std::stoll(argv[4]);
      result = projector.get_method("generate")({n, seed, optional_steps(argc, argv, 6)}).toTensor();
      write_output(result, argv[5]);
      std::cout << "generated " << n << " samples (seed " << seed << ") -> " << argv[5] << " " << result.sizes()
                << "\n";
    } else {
      return usage();
    }
  } catch (const c10::Error& error) {
    std::cerr << "ign_project: error: " << error.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "ign_project: error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
