// CUDA kernels of ign_fast::per_sample_distance and its backward. Forward: rows are split into chunks of
// kChunk elements, each chunk reduced by one block, so a batch of 1 with a 196k-element row still fills the
// GPU and a batch of 256 small rows runs one block per row. A row of one chunk is written by its block; the
// partials of longer rows go to a scratch buffer and a second small kernel adds each row's partials in chunk
// order. No atomics: the result is bitwise repeatable, as ign_loss (which uses the same two-launch scheme)
// is by design; an atomicAdd merge would add the partials in whatever order the blocks finish. Backward is
// elementwise. Launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"

namespace ign_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 8192;  // elements of one row reduced by one block

template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

// With chunks_per_row == 1 the block's sum is the row's: it writes the mean to out[row]. Otherwise it writes
// its partial sum to out[blockIdx.x] (a [batch, chunks_per_row] scratch buffer) for the finalize kernel.
template <typename scalar_t, typename acc_t, bool kL1>
__global__ void per_sample_distance_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                           acc_t* __restrict__ out, int64_t n, int64_t chunks_per_row) {
  const int64_t row = blockIdx.x / chunks_per_row;
  const int64_t begin = (blockIdx.x % chunks_per_row) * kChunk;
  const int64_t end = min(begin + kChunk, n);
  const scalar_t* ra = a + row * n;
  const scalar_t* rb = b + row * n;
  acc_t sum = 0;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const acc_t d = static_cast<acc_t>(ra[j]) - static_cast<acc_t>(rb[j]);
    sum += kL1 ? fabs(d) : d * d;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    if (chunks_per_row == 1) {
      out[row] = sum / static_cast<acc_t>(n);
    } else {
      out[blockIdx.x] = sum;
    }
  }
}

// One thread per row adds the row's partials in chunk order (a fixed order, so repeatable) and takes the
// mean. A row has n / kChunk partials (24 for a 196k-element row): a serial loop is cheaper than a launch of
// blocks would be.
template <typename acc_t>
__global__ void per_sample_distance_finalize_kernel(const acc_t* __restrict__ partials, acc_t* __restrict__ out,
                                                    int64_t batch, int64_t n, int64_t chunks_per_row) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= batch) return;
  const acc_t* p = partials + row * chunks_per_row;
  acc_t sum = 0;
  for (int64_t c = 0; c < chunks_per_row; ++c) sum += p[c];
  out[row] = sum / static_cast<acc_t>(n);
}

template <typename scalar_t, typename acc_t, bool kL1>
__global__ void per_sample_distance_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ a,
                                                    const scalar_t* __restrict__ b, scalar_t* __restrict__ grad_a,
                                                    scalar_t* __restrict__ grad_b, int64_t n, int64_t total) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t scale = grad[k / n] / static_cast<acc_t>(n);
    const acc_t d = static_cast<acc_t>(a[k]) - static_cast<acc_t>(b[k]);
    const acc_t g = kL1 ? scale * static_cast<acc_t>((d > 0) - (d < 0)) : scale * acc_t(2) * d;
    grad_a[k] = static_cast<scalar_t>(g);
    grad_b[k] = static_cast<scalar_t>(-g);
  }
}

at::Tensor per_sample_distance_cuda(const at::Tensor& a, const at::Tensor& b, c10::string_view kind_name) {
  const DistanceKind kind = parse_distance_kind(std::string(kind_name));
  check_pair(a, b, "a", "b");
  TORCH_CHECK(a.is_cuda(), "ign_fast: per_sample_distance (CUDA kernel): a must be a CUDA tensor, got one on ",
              a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ac = a.contiguous();
  const at::Tensor bc = b.contiguous();
  const int64_t batch = a.size(0);
  const auto acc_options = a.options().dtype(accumulate_dtype(a.scalar_type()));
  at::Tensor out = at::empty({batch}, acc_options);
  if (batch == 0) return out;
  const int64_t n = a.numel() / batch;
  const int64_t chunks_per_row = (n + kChunk - 1) / kChunk;
  const int64_t blocks = batch * chunks_per_row;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "ign_fast: per_sample_distance: a has too many chunks of ", kChunk,
              " elements for one launch: ", a.sizes());
  // every block writes its own slot, so an uninitialised buffer is fine
  const at::Tensor partials = chunks_per_row == 1 ? out : at::empty({batch, chunks_per_row}, acc_options);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_sample_distance_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (kind == DistanceKind::L1) {
      per_sample_distance_kernel<scalar_t, acc_t, true><<<blocks, kThreads, 0, stream>>>(
          ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(), partials.mutable_data_ptr<acc_t>(), n,
          chunks_per_row);
    } else {
      per_sample_distance_kernel<scalar_t, acc_t, false><<<blocks, kThreads, 0, stream>>>(
          ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(), partials.mutable_data_ptr<acc_t>(), n,
          chunks_per_row);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (chunks_per_row > 1) {
      const int64_t finalize_blocks = (batch + kThreads - 1) / kThreads;
      per_sample_distance_finalize_kernel<acc_t><<<finalize_blocks, kThreads, 0, stream>>>(
          partials.const_data_ptr<acc_t>(), out.mutable_data_ptr<acc_t>(), batch, n, chunks_per_row);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> per_sample_distance_backward_cuda(const at::Tensor& grad, const at::Tensor& a,
                                                                     const at::Tensor& b,
                                                                     c10::string_view kind_name) {
  const DistanceKind kind = parse_distance_kind(std::string(kind_name));
  check_pair(a, b, "a", "b");
  check_per_sample_grad(grad, a);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ac = a.contiguous();
  const at::Tensor bc = b.contiguous();
  const at::Tensor gc = grad.to(accumulate_dtype(a.scalar_type())).contiguous();
  at::Tensor grad_a = at::empty_like(ac, at::MemoryFormat::Contiguous);
  at::Tensor grad_b = at::empty_like(ac, at::MemoryFormat::Contiguous);
  const int64_t total = a.numel();
  if (total == 0) return {grad_a, grad_b};
  const int64_t n = total / a.size(0);
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_sample_distance_backward_cuda",
                                  [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto launch = [&](auto l1_tag) {
      constexpr bool kL1 = decltype(l1_tag)::value;
      per_sample_distance_backward_kernel<scalar_t, acc_t, kL1><<<blocks, kThreads, 0, stream>>>(
          gc.const_data_ptr<acc_t>(), ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
          grad_a.mutable_data_ptr<scalar_t>(), grad_b.mutable_data_ptr<scalar_t>(), n, total);
    };
    if (kind == DistanceKind::L1) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_a.view(a.sizes()), grad_b.view(a.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ign_fast, CUDA, m) {
  m.impl("per_sample_distance", &per_sample_distance_cuda);
  m.impl("per_sample_distance_backward", &per_sample_distance_backward_cuda);
}

}  // namespace ign_fast
