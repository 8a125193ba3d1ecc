// numpy.percentile (linear) of float32 values over a mask, for several q at once, on the device.
//
// The same selection as kernels/entropy_percentile.py, with everything on the GPU and no torch
// glue between passes. Every float maps to a 32-bit key that orders like the float (sign flip);
// the keys of the wanted ranks are found 8 bits at a time:
//
//   histogram_kernel (x4)  each block counts, in shared memory (warp-aggregated atomics), the
//                          digit of every selected key that matches a rank's prefix so far, then
//                          adds its counts to global int64 bins. Pass 1 (top byte) has one shared histogram for all ranks
//                          (the prefixes are all empty) and also counts NaNs.
//   select_kernel    (x4)  one block of 256 threads: after pass 1 it derives n, the float64 rank
//                          r = (n - 1) q and the two order-statistic ranks of every q; per rank
//                          a block scan over the 256 bins picks the next digit; it clears the
//                          bins for the next pass; after pass 4 it applies numpy's lerp.
//
// 8 launches and one zero-filled int64 workspace; the host never reads anything. Rounding matches
// numpy's _lerp for float32: g and 1 - g are rounded from float64, and the multiply and subtract
// are separate roundings (__fmul_rn etc. keep nvcc from contracting them into an FMA). Empty
// selection gives 0 and NaN among the selected values gives NaN, as the Triton path.
//
// Sizes: offsets and counts are int64 (n beyond 2^31 works); per-block shared counts are 32-bit,
// and the grid is sized so that a block never sees 2^32 elements below n = 2^40.

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kBins = 256;
constexpr int kThreads = 256;  // select_kernel: one thread per bin
constexpr int kMaxQuantiles = 16;
constexpr int kMaxRanks = 2 * kMaxQuantiles;

// int64 workspace layout (offsets in elements)
constexpr int kHist = 0;                             // [kMaxRanks][256] bin counts
constexpr int kPrefix = kMaxRanks * kBins;           // [kMaxRanks] key prefix decided so far
constexpr int kRemaining = kPrefix + kMaxRanks;      // [kMaxRanks] rank left inside the prefix
constexpr int kCount = kRemaining + kMaxRanks;       // n, the number of selected values
constexpr int kNans = kCount + 1;                    // NaNs among them
constexpr int kWorkspace = kNans + 1;

struct Fractions {  // q / 100 in float64, by value in the kernel parameters
  double f[kMaxQuantiles];
  int count;
};

__device__ __forceinline__ uint32_t float_key(float v) {
  const uint32_t bits = __float_as_uint(v);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key ^ 0x80000000u) : ~key);
}

// numpy's virtual index of quantile f among n values: the two order statistics and the weight
struct Rank {
  int64_t lo, hi;
  double g;
};

__device__ __forceinline__ Rank numpy_rank(int64_t n, double f) {
  const int64_t last = n > 0 ? n - 1 : 0;
  const double r = static_cast<double>(last) * f;
  if (r >= static_cast<double>(last)) return {last, last, r + 1.0};  // numpy's index -1 there
  const double below = floor(r);
  const int64_t lo = static_cast<int64_t>(below);
  return {lo, lo + 1, r - below};
}

// Adds 1 to counts[bin] for every lane with take set: one atomic per distinct bin in the warp.
// Entropies crowd into one or two top-byte bins, where a per-lane atomic would serialise 32-fold.
__device__ __forceinline__ void warp_count(unsigned int* counts, bool take, uint32_t bin) {
  const unsigned peers = __match_any_sync(0xFFFFFFFFu, take ? bin : 0xFFFFFFFFu);
  if (take && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&counts[bin], __popc(peers));
}

template <bool kHasValid>
__global__ void histogram_kernel(const float* __restrict__ values, const bool* __restrict__ valid,
                                 int64_t n, int shift, int ranks, long long* __restrict__ ws) {
  extern __shared__ unsigned int counts[];  // [rows][256]
  __shared__ uint32_t prefix[kMaxRanks];
  const bool first = shift == 24;
  const int rows = first ? 1 : ranks;
  for (int i = threadIdx.x; i < rows * kBins; i += blockDim.x) counts[i] = 0;
  if (threadIdx.x < ranks) prefix[threadIdx.x] = static_cast<uint32_t>(ws[kPrefix + threadIdx.x]);
  __syncthreads();

  unsigned long long nans = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // block-uniform trip count, so every lane of a warp reaches the warp-wide match below
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < n; base += stride) {
    const int64_t i = base + threadIdx.x;
    const bool take = i < n && (!kHasValid || valid[i]);
    const float v = take ? values[i] : 0.0f;
    const uint32_t key = float_key(v);
    const uint32_t digit = (key >> shift) & 0xFFu;
    if (first) {
      warp_count(counts, take, digit);
      nans += (take && isnan(v)) ? 1 : 0;
    } else {
      const uint32_t high = key >> (shift + 8);
      for (int r = 0; r < ranks; ++r) warp_count(counts + r * kBins, take && high == prefix[r], digit);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < rows * kBins; i += blockDim.x) {
    if (counts[i]) atomicAdd(reinterpret_cast<unsigned long long*>(&ws[kHist + i]),
                             static_cast<unsigned long long>(counts[i]));
  }
  if (first) {
    for (int offset = 16; offset > 0; offset /= 2) nans += __shfl_down_sync(0xFFFFFFFFu, nans, offset);
    if ((threadIdx.x & 31) == 0 && nans) atomicAdd(reinterpret_cast<unsigned long long*>(&ws[kNans]), nans);
  }
}

// inclusive prefix sum over the 256 threads of the block
__device__ long long block_inclusive_scan(long long x, long long* warp_totals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 1; offset < 32; offset *= 2) {
    const long long y = __shfl_up_sync(0xFFFFFFFFu, x, offset);
    if (lane >= offset) x += y;
  }
  if (lane == 31) warp_totals[warp] = x;
  __syncthreads();
  if (warp == 0) {
    long long t = lane < kThreads / 32 ? warp_totals[lane] : 0;
    for (int offset = 1; offset < kThreads / 32; offset *= 2) {
      const long long y = __shfl_up_sync(0xFFFFFFFFu, t, offset);
      if (lane >= offset) t += y;
    }
    if (lane < kThreads / 32) warp_totals[lane] = t;
  }
  __syncthreads();
  const long long out = x + (warp > 0 ? warp_totals[warp - 1] : 0);
  __syncthreads();  // warp_totals is reused by the next call
  return out;
}

__global__ void select_kernel(long long* __restrict__ ws, int shift, Fractions q, float* __restrict__ out) {
  __shared__ long long warp_totals[kThreads / 32];
  const int t = threadIdx.x;
  const int ranks = 2 * q.count;
  const bool first = shift == 24;
  if (first) {  // n = every selected value, all in the one histogram of pass 1
    const long long n = block_inclusive_scan(ws[kHist + t], warp_totals);
    if (t == kThreads - 1) ws[kCount] = n;
    __syncthreads();
    if (t < q.count) {
      const Rank r = numpy_rank(ws[kCount], q.f[t]);
      ws[kRemaining + t] = r.lo;
      ws[kRemaining + q.count + t] = r.hi;
    }
    __syncthreads();
  }
  for (int k = 0; k < ranks; ++k) {
    const long long c = ws[kHist + (first ? 0 : k) * kBins + t];
    // read before the scan: its barriers order this read before the winner's write below
    const long long remaining = ws[kRemaining + k];
    const long long inclusive = block_inclusive_scan(c, warp_totals);
    const long long exclusive = inclusive - c;
    // the bin holding the rank; past the end (no value at all) the last bin, as searchsorted
    if ((exclusive <= remaining && remaining < inclusive) || (t == kThreads - 1 && inclusive <= remaining)) {
      ws[kPrefix + k] = ws[kPrefix + k] * kBins + t;
      ws[kRemaining + k] = remaining - exclusive;
    }
    __syncthreads();
  }
  for (int i = t; i < (first ? 1 : ranks) * kBins; i += kThreads) ws[kHist + i] = 0;  // next pass
  if (shift == 0 && t < q.count) {
    const long long n = ws[kCount];
    const Rank r = numpy_rank(n, q.f[t]);
    const float a = key_float(static_cast<uint32_t>(ws[kPrefix + t]));
    const float b = key_float(static_cast<uint32_t>(ws[kPrefix + q.count + t]));
    const float diff = __fsub_rn(b, a);
    float v = r.g >= 0.5 ? __fsub_rn(b, __fmul_rn(diff, __double2float_rn(1.0 - r.g)))
                         : __fadd_rn(a, __fmul_rn(diff, __double2float_rn(r.g)));
    if (ws[kNans] > 0) v = __int_as_float(0x7FC00000);
    out[t] = n > 0 ? v : 0.0f;
  }
}

}  // namespace

// values: float32 CUDA, contiguous, any shape; valid: bool of the same number of elements or
// None; fractions: q / 100 in [0, 1]. Returns float32 [len(fractions)] on the values' device.
torch::Tensor radix_percentile(const torch::Tensor& values, const c10::optional<torch::Tensor>& valid,
                               const std::vector<double>& fractions) {
  TORCH_CHECK(values.is_cuda() && values.scalar_type() == torch::kFloat32 && values.is_contiguous(),
              "values: expected a contiguous float32 CUDA tensor, got ", values.scalar_type(), " on ",
              values.device());
  const bool has_valid = valid.has_value() && valid->defined();
  if (has_valid) {
    TORCH_CHECK(valid->scalar_type() == torch::kBool && valid->is_contiguous() &&
                    valid->numel() == values.numel() && valid->device() == values.device(),
                "valid: expected a contiguous bool tensor of ", values.numel(), " elements on ", values.device());
  }
  const int nq = static_cast<int>(fractions.size());
  TORCH_CHECK(nq >= 1 && nq <= kMaxQuantiles, "q: expected 1 to ", kMaxQuantiles, " percentiles, got ", nq);
  Fractions q{};
  q.count = nq;
  for (int i = 0; i < nq; ++i) {
    TORCH_CHECK(fractions[i] >= 0.0 && fractions[i] <= 1.0, "q: expected fractions in [0, 1], got ", fractions[i]);
    q.f[i] = fractions[i];
  }

  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto ws = torch::zeros({kWorkspace}, values.options().dtype(torch::kInt64));
  auto out = torch::empty({nq}, values.options());
  const int64_t n = values.numel();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, values.get_device()));
  const int64_t wanted = (n + kThreads * 16 - 1) / (kThreads * 16);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, 16LL * sms)));
  long long* ws_ptr = reinterpret_cast<long long*>(ws.data_ptr<int64_t>());
  const bool* valid_ptr = has_valid ? valid->data_ptr<bool>() : nullptr;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const size_t shared = static_cast<size_t>(shift == 24 ? 1 : 2 * nq) * kBins * sizeof(unsigned int);
    if (has_valid) {
      histogram_kernel<true><<<blocks, kThreads, shared, stream>>>(values.data_ptr<float>(), valid_ptr, n,
                                                                    shift, 2 * nq, ws_ptr);
    } else {
      histogram_kernel<false><<<blocks, kThreads, shared, stream>>>(values.data_ptr<float>(), nullptr, n,
                                                                     shift, 2 * nq, ws_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    select_kernel<<<1, kThreads, 0, stream>>>(ws_ptr, shift, q, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("radix_percentile", &radix_percentile,
        "numpy.percentile (linear) of float32 CUDA values over a mask, several q, no host sync");
}
