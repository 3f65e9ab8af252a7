// regc_run: run a regc edge bundle (see regc.runtime.bundle) on .npy inputs, write .npy outputs.
//
//   regc_run BUNDLE_DIR IN_DIR OUT_DIR
//
// reads BUNDLE_DIR/manifest.json, loads BUNDLE_DIR/model.so (Relax VM executable, no weights) and
// BUNDLE_DIR/model.params (weights by name), reads input i from IN_DIR/<i>.npy (i = position in the
// manifest's "inputs", little-endian C-order .npy, dtype as the manifest says), runs "main" with the
// inputs followed by the weights in the manifest's "params" order, and writes output i to
// OUT_DIR/<i>.npy. Every file the manifest lists is checked against its sha256 (FIPS 180-4) before
// anything is loaded. Exit status 0 on success, 2 on a bad bundle or input (message on stderr), 1 on
// a runtime error.
//
// Only tvm/ffi headers are included (the TVM wheel's tvm/runtime headers include one it does not
// ship); the executable still links libtvm_runtime.so, which registers the .so module loader and
// the Relax VM.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// A user-facing failure (bad bundle or input files): exit status 2.
struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    t->data = std::malloc(ffi::GetDataSize(*t) ? ffi::GetDataSize(*t) : 1);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// numpy dtype name <-> .npy descr (little-endian) <-> DLPack type.
struct DType {
  const char* name;
  const char* descr;
  DLDataType dl;
};
const DType kDTypes[] = {
    {"float32", "<f4", {kDLFloat, 32, 1}}, {"float64", "<f8", {kDLFloat, 64, 1}},
    {"float16", "<f2", {kDLFloat, 16, 1}}, {"int64", "<i8", {kDLInt, 64, 1}},
    {"int32", "<i4", {kDLInt, 32, 1}},     {"int16", "<i2", {kDLInt, 16, 1}},
    {"int8", "|i1", {kDLInt, 8, 1}},       {"uint8", "|u1", {kDLUInt, 8, 1}},
    {"bool", "|b1", {kDLBool, 8, 1}},
};

const DType& DTypeByName(const std::string& name) {
  for (const DType& d : kDTypes)
    if (name == d.name) return d;
  throw BadInput("dtype '" + name + "' is not supported by regc_run");
}

const DType& DTypeByDL(DLDataType dl) {
  for (const DType& d : kDTypes)
    if (d.dl.code == dl.code && d.dl.bits == dl.bits && d.dl.lanes == dl.lanes) return d;
  throw std::runtime_error("the model returned a tensor of a dtype regc_run cannot write");
}

// SHA-256 of a byte string, as lowercase hex (FIPS 180-4, section 6.2).
std::string Sha256Hex(const std::string& data) {
  static const uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
      0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
      0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
      0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
      0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
      0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
      0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  auto compress = [&](const unsigned char* p) {
    uint32_t w[64];
    for (int t = 0; t < 16; ++t) w[t] = uint32_t(p[4 * t]) << 24 | uint32_t(p[4 * t + 1]) << 16 |
                                        uint32_t(p[4 * t + 2]) << 8 | p[4 * t + 3];
    for (int t = 16; t < 64; ++t) {
      uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int t = 0; t < 64; ++t) {
      uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[t] + w[t];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
  };
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(data.data());
  size_t full = data.size() / 64 * 64;
  for (size_t at = 0; at < full; at += 64) compress(bytes + at);
  // the tail, 0x80, zeros up to 56 mod 64, then the message length in bits, big-endian
  std::string tail = data.substr(full);
  tail += static_cast<char>(0x80);
  while (tail.size() % 64 != 56) tail += '\0';
  uint64_t bits = uint64_t(data.size()) * 8;
  for (int i = 7; i >= 0; --i) tail += static_cast<char>((bits >> (8 * i)) & 0xff);
  for (size_t at = 0; at < tail.size(); at += 64) compress(reinterpret_cast<const unsigned char*>(tail.data() + at));
  char hex[65];
  for (int i = 0; i < 8; ++i) std::snprintf(hex + 8 * i, 9, "%08x", h[i]);
  return std::string(hex, 64);
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw BadInput(path + ": cannot open");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The value that follows 'key': in a .npy header dict (a Python literal).
std::string HeaderField(const std::string& header, const std::string& key, const std::string& path) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) throw BadInput(path + ": .npy header has no '" + key + "'");
  size_t colon = header.find(':', k);
  size_t start = header.find_first_not_of(' ', colon + 1);
  char open = header[start];
  size_t end = open == '(' ? header.find(')', start) + 1
               : open == '\'' ? header.find('\'', start + 1) + 1
                              : header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

ffi::Tensor ReadNpy(const std::string& path, const DType& want) {
  std::string bytes = ReadFile(path);
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) throw BadInput(path + ": not a .npy file");
  int major = static_cast<unsigned char>(bytes[6]);
  size_t len_size = major == 1 ? 2 : 4, header_len = 0;
  for (size_t i = 0; i < len_size; ++i) header_len |= size_t(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
  size_t data_at = 8 + len_size + header_len;
  if (data_at > bytes.size()) throw BadInput(path + ": truncated .npy header");
  std::string header = bytes.substr(8 + len_size, header_len);
  std::string descr = HeaderField(header, "descr", path);
  if (descr != std::string("'") + want.descr + "'")
    throw BadInput(path + ": dtype " + descr + ", expected " + want.name + " ('" + want.descr + "')");
  if (HeaderField(header, "fortran_order", path) != "False") throw BadInput(path + ": Fortran order; save C order");
  std::string shape_text = HeaderField(header, "shape", path);
  std::vector<int64_t> shape;
  for (size_t i = 1; i < shape_text.size();) {
    size_t j = shape_text.find_first_of(",)", i);
    std::string item = shape_text.substr(i, j - i);
    if (item.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(item));
    i = j + 1;
  }
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()), want.dl,
                                           DLDevice{kDLCPU, 0});
  size_t n = ffi::GetDataSize(*t.GetDLTensorPtr());
  if (bytes.size() - data_at != n)
    throw BadInput(path + ": " + std::to_string(bytes.size() - data_at) + " data bytes, shape needs " +
                   std::to_string(n));
  std::memcpy(t.data_ptr(), bytes.data() + data_at, n);
  return t;
}

void WriteNpy(const std::string& path, const ffi::Tensor& t) {
  if (t.device().device_type != kDLCPU || !t.IsContiguous())
    throw std::runtime_error("output is not a contiguous CPU tensor");
  std::string shape = "(";
  for (int64_t d : t.shape()) shape += std::to_string(d) + ", ";
  if (t.ndim() > 1) shape.resize(shape.size() - 2);
  else if (t.ndim() == 1) shape.resize(shape.size() - 1);
  shape += ")";
  std::string header = std::string("{'descr': '") + DTypeByDL(t.dtype()).descr +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(63 - (10 + header.size()) % 64, ' ');  // pad so the data starts 64-byte aligned
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  if (!f) throw BadInput(path + ": cannot write");
  const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  f.write(magic, 8);
  uint16_t len = static_cast<uint16_t>(header.size());
  const char len_le[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  f.write(len_le, 2);
  f << header;
  f.write(static_cast<const char*>(t.data_ptr()), ffi::GetDataSize(*t.GetDLTensorPtr()));
  if (!f) throw std::runtime_error(path + ": write failed");
}

int Run(const std::string& bundle, const std::string& in_dir, const std::string& out_dir) {
  ffi::String error;
  ffi::json::Value manifest_v = ffi::json::Parse(ReadFile(bundle + "/manifest.json"), &error);
  if (!error.empty()) throw BadInput(bundle + "/manifest.json: " + std::string(error));
  auto manifest = manifest_v.cast<ffi::json::Object>();
  auto inputs = manifest.at("inputs").cast<ffi::json::Array>();
  auto params = manifest.at("params").cast<ffi::json::Array>();
  size_t num_outputs = manifest.at("outputs").cast<ffi::json::Array>().size();
  for (const auto& [name, digest] : manifest.at("files").cast<ffi::json::Object>()) {
    std::string file = std::string(name.cast<ffi::String>());
    if (Sha256Hex(ReadFile(bundle + "/" + file)) != std::string(digest.cast<ffi::String>()))
      throw BadInput(bundle + "/" + file + ": sha256 differs from manifest.json (corrupt or tampered)");
  }

  ffi::Module lib = ffi::Module::LoadFromFile(bundle + "/model.so");
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  constexpr int kPooledAllocator = 2;
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  auto weights = ffi::Function::GetGlobalRequired("runtime.LoadParamsFromFile")(bundle + "/model.params")
                     .cast<ffi::Map<ffi::String, ffi::Tensor>>();

  std::vector<ffi::Any> args;
  for (size_t i = 0; i < inputs.size(); ++i) {
    auto spec = inputs[i].cast<ffi::json::Object>();
    const DType& dt = DTypeByName(std::string(spec.at("dtype").cast<ffi::String>()));
    args.emplace_back(ReadNpy(in_dir + "/" + std::to_string(i) + ".npy", dt));
  }
  ffi::Array<ffi::Any> params_in_order;
  for (const ffi::Any& p : params) {
    ffi::String name = p.cast<ffi::json::Object>().at("name").cast<ffi::String>();
    auto w = weights.Get(name);
    if (!w.has_value()) throw BadInput(bundle + "/model.params: no weight '" + std::string(name) + "'");
    params_in_order.push_back(*w);
  }
  // Builds whose weight-only kernels (e.g. transposes) were lifted out of "main" take that function's
  // outputs instead of model.params (regc.backends.tvm_backend.fuse_kernels).
  if (auto transform = vm->GetFunction("main_transform_params"); transform.has_value()) {
    params_in_order = transform.value()(params_in_order).cast<ffi::Array<ffi::Any>>();
  }
  for (const ffi::Any& w : params_in_order) args.push_back(w);
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  ffi::Any result;
  vm->GetFunction("main").value().CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);

  std::vector<ffi::Tensor> outs;
  if (auto arr = result.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& o : *arr) outs.push_back(o.cast<ffi::Tensor>());
  } else {
    outs.push_back(result.cast<ffi::Tensor>());
  }
  if (outs.size() != num_outputs)
    throw std::runtime_error("the model returned " + std::to_string(outs.size()) + " outputs, manifest lists " +
                             std::to_string(num_outputs));
  for (size_t i = 0; i < outs.size(); ++i) WriteNpy(out_dir + "/" + std::to_string(i) + ".npy", outs[i]);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: regc_run BUNDLE_DIR IN_DIR OUT_DIR  (inputs IN_DIR/<i>.npy, outputs OUT_DIR/<i>.npy)\n";
    return 2;
  }
  try {
    return Run(argv[1], argv[2], argv[3]);
  } catch (const BadInput& e) {
    std::cerr << "regc_run: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {  // tvm::ffi::Error derives from std::exception
    std::cerr << "regc_run: runtime error: " << e.what() << "\n";
    return 1;
  }
}
