// Exact k-WTA on CPU: per row, a radix select of the k-th largest value, then the masking.
//
// Selection and masking run on one row at a time while it sits in cache; rows are spread over
// PyTorch's own thread pool (at::parallel_for). The k-th largest value is found from histograms
// of an order-preserving integer key of the float bits (12 high bits over the row, then 12 middle
// and 8 low bits over the keys of the winning high bin), which takes a few linear passes instead
// of topk's quickselect over (value, index) pairs; rows of <= 512 units (channel-wise k-WTA of
// small maps) take nth_element on the keys instead. Ties are kept: a unit survives when its value
// is >= the k-th largest. A row holding a NaN gets a NaN threshold, which drops every unit, as
// the reference's topk(...).amin() does.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace {

constexpr int64_t SMALL_ROW = 512;

// a < b as floats  <=>  order_key(a) < order_key(b), for every non-NaN float. Branch-free: signs
// are a coin toss per unit, and a mispredicted branch per unit would cost more than the select.
inline uint32_t order_key(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  // negative: flip every bit; positive: flip the sign bit
  return bits ^ (static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u);
}

inline float key_value(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// The bin holding the k-th largest key, counting down from the top bin; k becomes the rank
// inside that bin.
template <size_t Bins>
uint32_t find_bin(const std::array<uint32_t, Bins>& hist, int64_t& k) {
  size_t bin = Bins - 1;
  while (k > hist[bin]) {
    k -= hist[bin];
    --bin;
  }
  return static_cast<uint32_t>(bin);
}

// Only infinities and NaNs have keys in the 8 lowest and 8 highest of 4096 top-12-bit bins.
template <typename scalar_t>
bool has_nan(const std::array<uint32_t, 4096>& high, const scalar_t* row, int64_t n) {
  bool extreme = false;
  for (size_t b = 0; b < 8; ++b) extreme = extreme || high[b] > 0 || high[4095 - b] > 0;
  return extreme && std::any_of(row, row + n, [](scalar_t v) { return v != v; });
}

// The k-th largest value of row[0..n) (1 <= k <= n); keys is scratch space.
// Short rows (channel-wise k-WTA of small maps): clearing and scanning 4096 bins would cost more
// than the row itself; nth_element on the keys is quicker there.
template <typename scalar_t>
float kth_largest_small(const scalar_t* row, int64_t n, int64_t k, std::vector<uint32_t>& keys) {
  keys.resize(n);
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = order_key(static_cast<float>(row[i]));
    nan = nan || row[i] != row[i];
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.begin() + n, std::greater<uint32_t>());
  return key_value(keys[k - 1]);
}

template <typename scalar_t>
float kth_largest(const scalar_t* row, int64_t n, int64_t k, std::vector<uint32_t>& keys) {
  if (n <= SMALL_ROW) return kth_largest_small(row, n, k, keys);
  std::array<uint32_t, 4096> high{};
  keys.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = order_key(static_cast<float>(row[i]));
    keys[i] = key;
    ++high[key >> 20];
  }
  if (has_nan(high, row, n)) return std::numeric_limits<float>::quiet_NaN();
  const uint32_t top = find_bin(high, k);
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {  // compact the keys of the top bin to the front
    keys[m] = keys[i];
    m += (keys[i] >> 20) == top;
  }
  std::array<uint32_t, 4096> mid{};
  for (int64_t i = 0; i < m; ++i) ++mid[(keys[i] >> 8) & 0xfffu];
  const uint32_t middle = find_bin(mid, k);
  std::array<uint32_t, 256> low{};
  for (int64_t i = 0; i < m; ++i)
    if (((keys[i] >> 8) & 0xfffu) == middle) ++low[keys[i] & 0xffu];
  const uint32_t bottom = find_bin(low, k);
  return key_value((top << 20) | (middle << 8) | bottom);
}

}  // namespace

// For every row of x (rows, n): the threshold is its k-th largest value. Rows whose threshold is
// > 0 are written to out masked (x where x >= threshold, else 0); the other rows are copied
// unchanged, for the caller to mask while it keeps a mask (a kept 0 and a dropped unit both
// output 0 there). out may be x itself. Returns the thresholds as float32.
torch::Tensor kwta_rows_out(const torch::Tensor& x, torch::Tensor& out, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x: contiguous CPU rows");
  TORCH_CHECK(out.sizes() == x.sizes() && out.is_contiguous(), "out must be shaped like x");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out must have x's dtype");
  const auto dtype = x.scalar_type();  // float64 would lose ties in the float32 keys
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "x must be float32, bfloat16 or float16");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "k must lie in [1, ", n, "], got ", k);
  auto thresholds = torch::empty({rows}, x.options().dtype(torch::kFloat32));
  float* threshold = thresholds.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kwta_rows_out", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> keys;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = src + r * n;
        scalar_t* row_out = dst + r * n;
        const float t = kth_largest(row, n, k, keys);
        threshold[r] = t;
        if (t > 0) {
          for (int64_t i = 0; i < n; ++i) {
            const scalar_t value = row[i];
            row_out[i] = static_cast<float>(value) >= t ? value : scalar_t(0);
          }
        } else if (row_out != row) {
          std::copy(row, row + n, row_out);
        }
      }
    });
  });
  return thresholds;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kwta_rows_out", &kwta_rows_out, "k-WTA of contiguous rows into out; returns thresholds");
}
