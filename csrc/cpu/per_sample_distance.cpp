// CPU kernels of ign_fast::per_sample_distance and its backward: one row (sample) per task of
// at::parallel_for; the inner loop keeps independent partial sums so the compiler can vectorise it
// without reassociating, and so long rows lose less precision than one running sum would.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "../checks.h"

namespace ign_fast {
namespace {

constexpr int64_t kLanes = 16;

template <typename scalar_t, typename acc_t, DistanceKind kind>
acc_t row_distance_sum(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t d = static_cast<acc_t>(a[j + l]) - static_cast<acc_t>(b[j + l]);
      lanes[l] += kind == DistanceKind::L1 ? std::abs(d) : d * d;
    }
  }
  for (; j < n; ++j) {
    const acc_t d = static_cast<acc_t>(a[j]) - static_cast<acc_t>(b[j]);
    lanes[0] += kind == DistanceKind::L1 ? std::abs(d) : d * d;
  }
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Rows per parallel task: enough elements that a task outweighs its scheduling cost.
int64_t row_grain(int64_t row_numel) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_numel, 1)); }

at::Tensor per_sample_distance_cpu(const at::Tensor& a, const at::Tensor& b, c10::string_view kind_name) {
  const DistanceKind kind = parse_distance_kind(std::string(kind_name));
  check_pair(a, b, "a", "b");
  TORCH_CHECK(a.device().is_cpu(), "ign_fast: per_sample_distance CPU kernel got a tensor on ", a.device());
  const at::Tensor ac = a.contiguous();
  const at::Tensor bc = b.contiguous();
  const int64_t batch = a.size(0);
  const int64_t n = batch == 0 ? 0 : a.numel() / batch;
  at::Tensor out = at::empty({batch}, a.options().dtype(accumulate_dtype(a.scalar_type())));
  if (batch == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_sample_distance_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* pa = ac.const_data_ptr<scalar_t>();
    const scalar_t* pb = bc.const_data_ptr<scalar_t>();
    out_t* po = out.mutable_data_ptr<out_t>();
    at::parallel_for(0, batch, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t s = kind == DistanceKind::L1
                            ? row_distance_sum<scalar_t, acc_t, DistanceKind::L1>(pa + i * n, pb + i * n, n)
                            : row_distance_sum<scalar_t, acc_t, DistanceKind::L2>(pa + i * n, pb + i * n, n);
        po[i] = static_cast<out_t>(s / static_cast<acc_t>(n));
      }
    });
  });
  return out;
}

// d/da of mean|a-b| is sign(a-b)/n (0 where a == b, as torch's abs); of mean (a-b)^2 it is 2(a-b)/n.
std::tuple<at::Tensor, at::Tensor> per_sample_distance_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                                    const at::Tensor& b,
                                                                    c10::string_view kind_name) {
  const DistanceKind kind = parse_distance_kind(std::string(kind_name));
  check_pair(a, b, "a", "b");
  check_per_sample_grad(grad, a);
  const at::Tensor ac = a.contiguous();
  const at::Tensor bc = b.contiguous();
  const at::Tensor gc = grad.to(accumulate_dtype(a.scalar_type())).contiguous();
  at::Tensor grad_a = at::empty_like(ac, at::MemoryFormat::Contiguous);
  at::Tensor grad_b = at::empty_like(ac, at::MemoryFormat::Contiguous);
  const int64_t batch = a.size(0);
  if (batch == 0) return {grad_a, grad_b};
  const int64_t n = a.numel() / batch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "per_sample_distance_backward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using g_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* pa = ac.const_data_ptr<scalar_t>();
    const scalar_t* pb = bc.const_data_ptr<scalar_t>();
    const g_t* pg = gc.const_data_ptr<g_t>();
    scalar_t* pga = grad_a.mutable_data_ptr<scalar_t>();
    scalar_t* pgb = grad_b.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t scale = static_cast<acc_t>(pg[i]) / static_cast<acc_t>(n);
        const scalar_t* ra = pa + i * n;
        const scalar_t* rb = pb + i * n;
        for (int64_t j = 0; j < n; ++j) {
          const acc_t d = static_cast<acc_t>(ra[j]) - static_cast<acc_t>(rb[j]);
          const acc_t g = kind == DistanceKind::L1 ? scale * static_cast<acc_t>((d > 0) - (d < 0))
                                                   : scale * acc_t(2) * d;
          pga[i * n + j] = static_cast<scalar_t>(g);
          pgb[i * n + j] = static_cast<scalar_t>(-g);
        }
      }
    });
  });
  return {grad_a.view(a.sizes()), grad_b.view(a.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ign_fast, CPU, m) {
  m.impl("per_sample_distance", &per_sample_distance_cpu);
  m.impl("per_sample_distance_backward", &per_sample_distance_backward_cpu);
}

}  // namespace ign_fast
