// CUDA kernels of ign_fast::ign_loss and its backward (the math is in ../ign_loss.h).
//
// Forward, two launches on the current stream:
//   1. one block per (row, chunk of <= kChunk elements) reads its chunk of the five inputs once (four when
//      f_fz and ff_z are one tensor), with 16-byte loads when every pointer is aligned and n divides into
//      16-byte packs, and writes three float partial sums. Splitting rows keeps a batch of 1 with a
//      196k-element row spread over the GPU while a batch of 256 small rows runs one block per row.
//   2. one block adds each row's partials in a fixed order (deterministic, no atomics), applies the clamp and
//      writes rec, idem, tight, tight before the clamp, and the total.
// Backward, one launch: each (row, chunk) block derives its row's gradient scales from the saved rec_i, t_i
// and the upstream gradients (a few flops per thread, no separate launch) and writes every gradient of its
// chunk. The row sums are known from the forward, so no reduction is repeated: the backward reads the
// inputs once and writes each gradient once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../ign_loss.h"

namespace ign_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 8192;

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

template <typename acc_t, bool kL1>
__device__ __forceinline__ acc_t term(acc_t d) {
  if constexpr (kL1) {
    return fabs(d);
  } else {
    return d * d;
  }
}

template <typename acc_t, bool kL1>
__device__ __forceinline__ acc_t derivative(acc_t d) {  // of term(d), before the 1/n of the mean
  if constexpr (kL1) {
    return sign_of(d);
  } else {
    return acc_t(2) * d;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums of three values over the block; the result is valid in thread 0.
template <typename acc_t>
__device__ void block_sum3(acc_t& a, acc_t& b, acc_t& c) {
  __shared__ acc_t partial[3][kThreads / 32];
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    partial[0][warp] = a;
    partial[1][warp] = b;
    partial[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    const bool live = lane < kThreads / 32;
    a = warp_sum(live ? partial[0][lane] : acc_t(0));
    b = warp_sum(live ? partial[1][lane] : acc_t(0));
    c = warp_sum(live ? partial[2][lane] : acc_t(0));
  }
}

template <typename scalar_t, typename acc_t, bool kL1, bool kAliased, int kVec>
__global__ void __launch_bounds__(kThreads) ign_loss_partials_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ fx, const scalar_t* __restrict__ fz,
    const scalar_t* __restrict__ f_fz, const scalar_t* __restrict__ ff_z, acc_t* __restrict__ partials, int64_t n,
    int64_t batch_x, int64_t batch_z, int64_t rows, int64_t chunks) {
  using P = Pack<scalar_t, kVec>;
  const int64_t row = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  const int64_t lo = row * n + chunk * kChunk;
  const int64_t hi = row * n + min(chunk * kChunk + kChunk, n);
  const bool has_x = row < batch_x;  // block-uniform
  const bool has_z = row < batch_z;
  acc_t s_rec = 0, s_idem = 0, s_tight = 0;
  for (int64_t j = lo + threadIdx.x * kVec; j < hi; j += kThreads * kVec) {
    if (has_x) {
      const P a = *reinterpret_cast<const P*>(fx + j);
      const P b = *reinterpret_cast<const P*>(x + j);
#pragma unroll
      for (int v = 0; v < kVec; ++v) s_rec += term<acc_t, kL1>(static_cast<acc_t>(a.v[v]) - static_cast<acc_t>(b.v[v]));
    }
    if (has_z) {
      const P c = *reinterpret_cast<const P*>(fz + j);
      const P p = *reinterpret_cast<const P*>(f_fz + j);
      if constexpr (kAliased) {
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          s_idem += term<acc_t, kL1>(static_cast<acc_t>(p.v[v]) - static_cast<acc_t>(c.v[v]));
        }
      } else {
        const P q = *reinterpret_cast<const P*>(ff_z + j);
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const acc_t cz = static_cast<acc_t>(c.v[v]);
          s_idem += term<acc_t, kL1>(static_cast<acc_t>(p.v[v]) - cz);
          s_tight += term<acc_t, kL1>(static_cast<acc_t>(q.v[v]) - cz);
        }
      }
    }
  }
  if constexpr (kAliased) s_tight = s_idem;  // same sum; the reduction below is then wasted but uniform
  block_sum3(s_rec, s_idem, s_tight);
  if (threadIdx.x == 0) {
    const int64_t slot = row * chunks + chunk;
    const int64_t plane = rows * chunks;
    partials[slot] = s_rec;
    partials[plane + slot] = s_idem;
    partials[2 * plane + slot] = s_tight;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) ign_loss_finalize_kernel(
    const acc_t* __restrict__ partials, acc_t* __restrict__ total, acc_t* __restrict__ rec, acc_t* __restrict__ idem,
    acc_t* __restrict__ tight, acc_t* __restrict__ tight_raw, int64_t n, int64_t batch_x, int64_t batch_z,
    int64_t rows, int64_t chunks, acc_t lambda_rec, acc_t lambda_idem, acc_t lambda_tight, bool has_clamp,
    acc_t ratio) {
  const int64_t plane = rows * chunks;
  acc_t sum_rec = 0, sum_idem = 0, sum_tight = 0;
  for (int64_t row = threadIdx.x; row < rows; row += kThreads) {
    acc_t sums[3] = {0, 0, 0};
    for (int64_t c = 0; c < chunks; ++c) {
#pragma unroll
      for (int k = 0; k < 3; ++k) sums[k] += partials[k * plane + row * chunks + c];
    }
    const acc_t r = sums[0] / static_cast<acc_t>(n);
    if (row < batch_x) {
      rec[row] = r;
      sum_rec += r;
    }
    if (row < batch_z) {
      const acc_t id = sums[1] / static_cast<acc_t>(n);
      const acc_t t = -sums[2] / static_cast<acc_t>(n);
      const acc_t tc = has_clamp ? clamp_tight(t, r, ratio).value : t;
      idem[row] = id;
      tight_raw[row] = t;
      tight[row] = tc;
      sum_idem += id;
      sum_tight += tc;
    }
  }
  block_sum3(sum_rec, sum_idem, sum_tight);
  if (threadIdx.x == 0) {
    *total = lambda_rec * (sum_rec / static_cast<acc_t>(batch_x)) +
             lambda_idem * (sum_idem / static_cast<acc_t>(batch_z)) +
             lambda_tight * (sum_tight / static_cast<acc_t>(batch_z));
  }
}

template <typename scalar_t, typename acc_t, bool kL1, bool kAliased, int kVec>
__global__ void __launch_bounds__(kThreads) ign_loss_backward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ fx, const scalar_t* __restrict__ fz,
    const scalar_t* __restrict__ f_fz, const scalar_t* __restrict__ ff_z, scalar_t* __restrict__ grad_x,
    scalar_t* __restrict__ grad_fx, scalar_t* __restrict__ grad_fz, scalar_t* __restrict__ grad_f_fz,
    scalar_t* __restrict__ grad_ff_z, const acc_t* __restrict__ grad_total, const acc_t* __restrict__ grad_rec,
    const acc_t* __restrict__ grad_idem, const acc_t* __restrict__ grad_tight, const acc_t* __restrict__ saved_rec,
    const acc_t* __restrict__ saved_t, int64_t n, int64_t batch_x, int64_t batch_z, int64_t chunks,
    acc_t lambda_rec, acc_t lambda_idem, acc_t lambda_tight, bool has_clamp, acc_t ratio) {
  using P = Pack<scalar_t, kVec>;
  const int64_t row = blockIdx.x / chunks;
  const int64_t chunk = blockIdx.x % chunks;
  const int64_t lo = row * n + chunk * kChunk;
  const int64_t hi = row * n + min(chunk * kChunk + kChunk, n);
  const RowScales<acc_t> scales = row_scales<acc_t>(row, batch_x, batch_z, *grad_total, grad_rec, grad_idem,
                                                    grad_tight, saved_rec, saved_t, lambda_rec, lambda_idem,
                                                    lambda_tight, has_clamp, ratio);
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t c_rec = scales.rec * inv_n;
  const acc_t c_idem = scales.idem * inv_n;
  const acc_t c_tight = -scales.tight * inv_n;
  const bool has_x = row < batch_x;
  const bool has_z = row < batch_z;
  for (int64_t j = lo + threadIdx.x * kVec; j < hi; j += kThreads * kVec) {
    if (has_x) {
      const P a = *reinterpret_cast<const P*>(fx + j);
      const P b = *reinterpret_cast<const P*>(x + j);
      P g, minus_g;
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const acc_t gv = c_rec * derivative<acc_t, kL1>(static_cast<acc_t>(a.v[v]) - static_cast<acc_t>(b.v[v]));
        g.v[v] = static_cast<scalar_t>(gv);
        minus_g.v[v] = static_cast<scalar_t>(-gv);
      }
      *reinterpret_cast<P*>(grad_fx + j) = g;
      if (grad_x != nullptr) *reinterpret_cast<P*>(grad_x + j) = minus_g;
    }
    if (has_z) {
      const P c = *reinterpret_cast<const P*>(fz + j);
      const P p = *reinterpret_cast<const P*>(f_fz + j);
      const P q = kAliased ? p : *reinterpret_cast<const P*>(ff_z + j);  // aliased: no second read
      P gi, gz, gt;
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const acc_t cz = static_cast<acc_t>(c.v[v]);
        const acc_t dp = derivative<acc_t, kL1>(static_cast<acc_t>(p.v[v]) - cz);
        const acc_t dq = kAliased ? dp : derivative<acc_t, kL1>(static_cast<acc_t>(q.v[v]) - cz);
        gi.v[v] = static_cast<scalar_t>(c_idem * dp);
        gz.v[v] = static_cast<scalar_t>(-(c_idem * dp));
        gt.v[v] = static_cast<scalar_t>(c_tight * dq);
      }
      *reinterpret_cast<P*>(grad_f_fz + j) = gi;
      *reinterpret_cast<P*>(grad_fz + j) = gz;
      *reinterpret_cast<P*>(grad_ff_z + j) = gt;
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls body(aliased_tag, vec_tag) with the compile-time variant the data allows.
template <typename scalar_t, typename Body>
void dispatch_variant(bool aliased, bool vectorise, Body&& body) {
  constexpr int kWide = 16 / sizeof(scalar_t);
  if (aliased) {
    if (vectorise) {
      body(std::true_type{}, std::integral_constant<int, kWide>{});
    } else {
      body(std::true_type{}, std::integral_constant<int, 1>{});
    }
  } else {
    if (vectorise) {
      body(std::false_type{}, std::integral_constant<int, kWide>{});
    } else {
      body(std::false_type{}, std::integral_constant<int, 1>{});
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ign_loss_cuda(
    const at::Tensor& x, const at::Tensor& fx, const at::Tensor& fz, const at::Tensor& f_fz, const at::Tensor& ff_z,
    c10::string_view kind_name, double lambda_rec, double lambda_idem, double lambda_tight,
    c10::optional<double> tight_clamp_ratio) {
  const DistanceKind kind = parse_distance_kind(std::string(kind_name));
  const IgnLossShape s =
      check_ign_loss_inputs(x, fx, fz, f_fz, ff_z, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio);
  TORCH_CHECK(x.is_cuda(), "ign_fast: ign_loss CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const ContiguousInputs in = contiguous_inputs(x, fx, fz, f_fz, ff_z, s);
  const at::Tensor &xc = in.x, &fxc = in.fx, &fzc = in.fz, &f_fzc = in.f_fz, &ff_zc = in.ff_z;
  ForwardOutputs out = empty_forward_outputs(x, s);
  at::Tensor &total = out.total, &rec = out.rec, &idem = out.idem, &tight = out.tight, &tight_raw = out.tight_raw;
  const int64_t chunks = (s.n + kChunk - 1) / kChunk;
  const int64_t blocks = s.rows * chunks;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "ign_fast: ign_loss input too large: ", x.sizes());
  at::Tensor partials = at::empty({3, s.rows, chunks}, rec.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ign_loss_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const bool vectorise = s.n % (16 / sizeof(scalar_t)) == 0 && aligned16(xc.const_data_ptr()) &&
                           aligned16(fxc.const_data_ptr()) && aligned16(fzc.const_data_ptr()) &&
                           aligned16(f_fzc.const_data_ptr()) && aligned16(ff_zc.const_data_ptr());
    dispatch_variant<scalar_t>(s.aliased, vectorise, [&](auto aliased_tag, auto vec_tag) {
      constexpr bool kAliased = decltype(aliased_tag)::value;
      constexpr int kVec = decltype(vec_tag)::value;
      auto launch = [&](auto l1_tag) {
        constexpr bool kL1 = decltype(l1_tag)::value;
        ign_loss_partials_kernel<scalar_t, acc_t, kL1, kAliased, kVec><<<blocks, kThreads, 0, stream>>>(
            xc.const_data_ptr<scalar_t>(), fxc.const_data_ptr<scalar_t>(), fzc.const_data_ptr<scalar_t>(),
            f_fzc.const_data_ptr<scalar_t>(), ff_zc.const_data_ptr<scalar_t>(), partials.mutable_data_ptr<acc_t>(),
            s.n, s.batch_x, s.batch_z, s.rows, chunks);
      };
      if (kind == DistanceKind::L1) {
        launch(std::true_type{});
      } else {
        launch(std::false_type{});
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ign_loss_finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), total.mutable_data_ptr<acc_t>(), rec.mutable_data_ptr<acc_t>(),
        idem.mutable_data_ptr<acc_t>(), tight.mutable_data_ptr<acc_t>(), tight_raw.mutable_data_ptr<acc_t>(), s.n,
        s.batch_x, s.batch_z, s.rows, chunks, static_cast<acc_t>(lambda_rec), static_cast<acc_t>(lambda_idem),
        static_cast<acc_t>(lambda_tight), tight_clamp_ratio.has_value(),
        static_cast<acc_t>(tight_clamp_ratio.value_or(1.0)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {total, rec, idem, tight, tight_raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ign_loss_backward_cuda(
    const at::Tensor& grad_total, const c10::optional<at::Tensor>& grad_rec,
    const c10::optional<at::Tensor>& grad_idem, const c10::optional<at::Tensor>& grad_tight, const at::Tensor& x,
    const at::Tensor& fx, const at::Tensor& fz, const at::Tensor& f_fz, const at::Tensor& ff_z,
    const at::Tensor& rec, const at::Tensor& tight_unclamped, c10::string_view kind_name, double lambda_rec,
    double lambda_idem, double lambda_tight, c10::optional<double> tight_clamp_ratio, bool compute_grad_x) {
  const DistanceKind kind = parse_distance_kind(std::string(kind_name));
  const IgnLossShape s =
      check_ign_loss_inputs(x, fx, fz, f_fz, ff_z, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio);
  check_ign_loss_backward_inputs(s, x, grad_total, grad_rec, grad_idem, grad_tight, rec, tight_unclamped);
  TORCH_CHECK(x.is_cuda(), "ign_fast: ign_loss_backward CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc_type = accumulate_dtype(x.scalar_type());
  const ContiguousInputs in = contiguous_inputs(x, fx, fz, f_fz, ff_z, s);
  const at::Tensor &xc = in.x, &fxc = in.fx, &fzc = in.fz, &f_fzc = in.f_fz, &ff_zc = in.ff_z;
  const at::Tensor g_total = grad_total.to(acc_type).contiguous();  // read on the device: no sync
  const at::Tensor g_rec = row_gradient(grad_rec, acc_type);
  const at::Tensor g_idem = row_gradient(grad_idem, acc_type);
  const at::Tensor g_tight = row_gradient(grad_tight, acc_type);
  const at::Tensor saved_rec = rec.to(acc_type).contiguous(), saved_t = tight_unclamped.to(acc_type).contiguous();
  at::Tensor grad_x = compute_grad_x ? at::empty_like(xc, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  at::Tensor grad_fx = at::empty_like(xc, at::MemoryFormat::Contiguous);
  at::Tensor grad_fz = at::empty_like(fzc, at::MemoryFormat::Contiguous);
  at::Tensor grad_f_fz = at::empty_like(fzc, at::MemoryFormat::Contiguous);
  at::Tensor grad_ff_z = at::empty_like(fzc, at::MemoryFormat::Contiguous);
  const int64_t chunks = (s.n + kChunk - 1) / kChunk;
  const int64_t blocks = s.rows * chunks;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "ign_fast: ign_loss input too large: ", x.sizes());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ign_loss_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* gx = compute_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    const bool vectorise =
        s.n % (16 / sizeof(scalar_t)) == 0 && aligned16(xc.const_data_ptr()) && aligned16(fxc.const_data_ptr()) &&
        aligned16(fzc.const_data_ptr()) && aligned16(f_fzc.const_data_ptr()) && aligned16(ff_zc.const_data_ptr()) &&
        (gx == nullptr || aligned16(gx)) && aligned16(grad_fx.const_data_ptr()) &&
        aligned16(grad_fz.const_data_ptr()) && aligned16(grad_f_fz.const_data_ptr()) &&
        aligned16(grad_ff_z.const_data_ptr());
    dispatch_variant<scalar_t>(s.aliased, vectorise, [&](auto aliased_tag, auto vec_tag) {
      constexpr bool kAliased = decltype(aliased_tag)::value;
      constexpr int kVec = decltype(vec_tag)::value;
      auto launch = [&](auto l1_tag) {
        constexpr bool kL1 = decltype(l1_tag)::value;
        ign_loss_backward_kernel<scalar_t, acc_t, kL1, kAliased, kVec><<<blocks, kThreads, 0, stream>>>(
            xc.const_data_ptr<scalar_t>(), fxc.const_data_ptr<scalar_t>(), fzc.const_data_ptr<scalar_t>(),
            f_fzc.const_data_ptr<scalar_t>(), ff_zc.const_data_ptr<scalar_t>(), gx,
            grad_fx.mutable_data_ptr<scalar_t>(), grad_fz.mutable_data_ptr<scalar_t>(),
            grad_f_fz.mutable_data_ptr<scalar_t>(), grad_ff_z.mutable_data_ptr<scalar_t>(),
            g_total.const_data_ptr<acc_t>(), data_or_null<acc_t>(g_rec), data_or_null<acc_t>(g_idem),
            data_or_null<acc_t>(g_tight), saved_rec.const_data_ptr<acc_t>(), saved_t.const_data_ptr<acc_t>(), s.n,
            s.batch_x, s.batch_z, chunks, static_cast<acc_t>(lambda_rec), static_cast<acc_t>(lambda_idem),
            static_cast<acc_t>(lambda_tight), tight_clamp_ratio.has_value(),
            static_cast<acc_t>(tight_clamp_ratio.value_or(1.0)));
      };
      if (kind == DistanceKind::L1) {
        launch(std::true_type{});
      } else {
        launch(std::false_type{});
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {compute_grad_x ? grad_x.view(x.sizes()) : grad_x, grad_fx.view(x.sizes()), grad_fz.view(fz.sizes()),
          grad_f_fz.view(fz.sizes()), grad_ff_z.view(fz.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ign_fast, CUDA, m) {
  m.impl("ign_loss", &ign_loss_cuda);
  m.impl("ign_loss_backward", &ign_loss_backward_cuda);
}

}  // namespace ign_fast
