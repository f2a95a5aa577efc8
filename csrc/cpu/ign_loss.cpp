// CPU kernels of ign_fast::ign_loss and its backward (the math is in ../ign_loss.h).
// Work is split into (row, chunk) tasks of at most kChunk elements so that a batch of 1 with a 196k-element
// row still uses every thread; each task keeps kLanes independent partial sums per term so the inner loop
// vectorises without reassociation. Forward: one pass over the inputs into per-task partials, then a serial
// pass over rows (fixed order: deterministic) for the terms, the clamp and the total. Backward: one pass
// that writes every gradient, each task computing its row's scales from the saved rec_i and t_i.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../ign_loss.h"

namespace ign_fast {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kChunk = 16384;

template <typename acc_t, bool kL1>
inline acc_t term(acc_t d) {
  if constexpr (kL1) {
    return std::abs(d);
  } else {
    return d * d;
  }
}

template <typename acc_t, bool kL1>
inline acc_t derivative(acc_t d) {  // of term(d), before the 1/n of the mean
  if constexpr (kL1) {
    return sign_of(d);
  } else {
    return acc_t(2) * d;
  }
}

// Sum over [begin, end) of term(a - b): the rec or the tight sum alone.
template <typename scalar_t, typename acc_t, bool kL1>
acc_t pair_sum(const scalar_t* a, const scalar_t* b, int64_t begin, int64_t end) {
  acc_t lanes[kLanes] = {};
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += term<acc_t, kL1>(static_cast<acc_t>(a[j + l]) - static_cast<acc_t>(b[j + l]));
    }
  }
  for (; j < end; ++j) lanes[0] += term<acc_t, kL1>(static_cast<acc_t>(a[j]) - static_cast<acc_t>(b[j]));
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Sums of term(p - c) and term(q - c) in one pass over c: idem and tight with distinct f_fz and ff_z.
template <typename scalar_t, typename acc_t, bool kL1>
std::pair<acc_t, acc_t> triple_sum(const scalar_t* p, const scalar_t* q, const scalar_t* c, int64_t begin,
                                   int64_t end) {
  acc_t lanes_p[kLanes] = {};
  acc_t lanes_q[kLanes] = {};
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t cz = static_cast<acc_t>(c[j + l]);
      lanes_p[l] += term<acc_t, kL1>(static_cast<acc_t>(p[j + l]) - cz);
      lanes_q[l] += term<acc_t, kL1>(static_cast<acc_t>(q[j + l]) - cz);
    }
  }
  for (; j < end; ++j) {
    const acc_t cz = static_cast<acc_t>(c[j]);
    lanes_p[0] += term<acc_t, kL1>(static_cast<acc_t>(p[j]) - cz);
    lanes_q[0] += term<acc_t, kL1>(static_cast<acc_t>(q[j]) - cz);
  }
  acc_t sp = 0, sq = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    sp += lanes_p[l];
    sq += lanes_q[l];
  }
  return {sp, sq};
}

// Tasks per parallel_for grain: enough elements that a task outweighs its scheduling cost.
int64_t task_grain(int64_t chunk_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(chunk_len, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ign_loss_cpu(
    const at::Tensor& x, const at::Tensor& fx, const at::Tensor& fz, const at::Tensor& f_fz, const at::Tensor& ff_z,
    c10::string_view kind_name, double lambda_rec, double lambda_idem, double lambda_tight,
    c10::optional<double> tight_clamp_ratio) {
  const DistanceKind kind = parse_distance_kind(std::string(kind_name));
  const IgnLossShape s =
      check_ign_loss_inputs(x, fx, fz, f_fz, ff_z, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio);
  TORCH_CHECK(x.device().is_cpu(), "ign_fast: ign_loss CPU kernel got x on ", x.device());
  const ContiguousInputs in = contiguous_inputs(x, fx, fz, f_fz, ff_z, s);
  const at::Tensor &xc = in.x, &fxc = in.fx, &fzc = in.fz, &f_fzc = in.f_fz, &ff_zc = in.ff_z;
  ForwardOutputs out = empty_forward_outputs(x, s);
  at::Tensor &total = out.total, &rec = out.rec, &idem = out.idem, &tight = out.tight, &tight_raw = out.tight_raw;
  const int64_t n = s.n;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t chunk_len = std::min(n, kChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ign_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* px = xc.const_data_ptr<scalar_t>();
    const scalar_t* pfx = fxc.const_data_ptr<scalar_t>();
    const scalar_t* pfz = fzc.const_data_ptr<scalar_t>();
    const scalar_t* pi = f_fzc.const_data_ptr<scalar_t>();
    const scalar_t* pt = ff_zc.const_data_ptr<scalar_t>();
    // partial[3 * task + k]: k = 0 rec, 1 idem, 2 tight (the sums of term, before 1/n and the sign)
    std::vector<acc_t> partial(3 * s.rows * chunks, acc_t(0));
    auto run = [&](auto l1_tag) {
      constexpr bool kL1 = decltype(l1_tag)::value;
      at::parallel_for(0, s.rows * chunks, task_grain(chunk_len), [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t row = task / chunks;
          const int64_t lo = (task % chunks) * kChunk;
          const int64_t hi = std::min(lo + kChunk, n);
          const int64_t base = row * n;
          if (row < s.batch_x) {
            partial[3 * task] = pair_sum<scalar_t, acc_t, kL1>(pfx + base, px + base, lo, hi);
          }
          if (row < s.batch_z) {
            if (s.aliased) {
              const acc_t both = pair_sum<scalar_t, acc_t, kL1>(pi + base, pfz + base, lo, hi);
              partial[3 * task + 1] = both;
              partial[3 * task + 2] = both;
            } else {
              const auto sums = triple_sum<scalar_t, acc_t, kL1>(pi + base, pt + base, pfz + base, lo, hi);
              partial[3 * task + 1] = sums.first;
              partial[3 * task + 2] = sums.second;
            }
          }
        }
      });
    };
    if (kind == DistanceKind::L1) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
    out_t* prec = rec.mutable_data_ptr<out_t>();
    out_t* pidem = idem.mutable_data_ptr<out_t>();
    out_t* ptight = tight.mutable_data_ptr<out_t>();
    out_t* praw = tight_raw.mutable_data_ptr<out_t>();
    const acc_t ratio = static_cast<acc_t>(tight_clamp_ratio.value_or(1.0));
    acc_t sum_rec = 0, sum_idem = 0, sum_tight = 0;
    for (int64_t row = 0; row < s.rows; ++row) {
      acc_t sums[3] = {0, 0, 0};
      for (int64_t c = 0; c < chunks; ++c) {
        for (int k = 0; k < 3; ++k) sums[k] += partial[3 * (row * chunks + c) + k];
      }
      const acc_t r = sums[0] / static_cast<acc_t>(n);
      if (row < s.batch_x) {
        prec[row] = static_cast<out_t>(r);
        sum_rec += r;
      }
      if (row < s.batch_z) {
        const acc_t id = sums[1] / static_cast<acc_t>(n);
        const acc_t t = -sums[2] / static_cast<acc_t>(n);
        const acc_t tc = tight_clamp_ratio.has_value() ? clamp_tight(t, r, ratio).value : t;
        pidem[row] = static_cast<out_t>(id);
        praw[row] = static_cast<out_t>(t);
        ptight[row] = static_cast<out_t>(tc);
        sum_idem += id;
        sum_tight += tc;
      }
    }
    total.fill_(static_cast<double>(static_cast<acc_t>(lambda_rec) * (sum_rec / static_cast<acc_t>(s.batch_x)) +
                                    static_cast<acc_t>(lambda_idem) * (sum_idem / static_cast<acc_t>(s.batch_z)) +
                                    static_cast<acc_t>(lambda_tight) * (sum_tight / static_cast<acc_t>(s.batch_z))));
  });
  return {total, rec, idem, tight, tight_raw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ign_loss_backward_cpu(
    const at::Tensor& grad_total, const c10::optional<at::Tensor>& grad_rec,
    const c10::optional<at::Tensor>& grad_idem, const c10::optional<at::Tensor>& grad_tight, const at::Tensor& x,
    const at::Tensor& fx, const at::Tensor& fz,
    const at::Tensor& f_fz, const at::Tensor& ff_z, const at::Tensor& rec, const at::Tensor& tight_unclamped,
    c10::string_view kind_name, double lambda_rec, double lambda_idem, double lambda_tight,
    c10::optional<double> tight_clamp_ratio, bool compute_grad_x) {
  const DistanceKind kind = parse_distance_kind(std::string(kind_name));
  const IgnLossShape s =
      check_ign_loss_inputs(x, fx, fz, f_fz, ff_z, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio);
  check_ign_loss_backward_inputs(s, x, grad_total, grad_rec, grad_idem, grad_tight, rec, tight_unclamped);
  TORCH_CHECK(x.device().is_cpu(), "ign_fast: ign_loss_backward CPU kernel got x on ", x.device());
  const at::ScalarType acc_type = accumulate_dtype(x.scalar_type());
  const ContiguousInputs in = contiguous_inputs(x, fx, fz, f_fz, ff_z, s);
  const at::Tensor &xc = in.x, &fxc = in.fx, &fzc = in.fz, &f_fzc = in.f_fz, &ff_zc = in.ff_z;
  // upstream gradients may be expanded zeros (stride 0) or another float dtype
  const at::Tensor g_rec = row_gradient(grad_rec, acc_type);
  const at::Tensor g_idem = row_gradient(grad_idem, acc_type);
  const at::Tensor g_tight = row_gradient(grad_tight, acc_type);
  const at::Tensor saved_rec = rec.to(acc_type).contiguous(), saved_t = tight_unclamped.to(acc_type).contiguous();
  const double g_total_value = grad_total.to(at::kDouble).item<double>();
  at::Tensor grad_x = compute_grad_x ? at::empty_like(xc, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  at::Tensor grad_fx = at::empty_like(xc, at::MemoryFormat::Contiguous);
  at::Tensor grad_fz = at::empty_like(fzc, at::MemoryFormat::Contiguous);
  at::Tensor grad_f_fz = at::empty_like(fzc, at::MemoryFormat::Contiguous);
  at::Tensor grad_ff_z = at::empty_like(fzc, at::MemoryFormat::Contiguous);
  const int64_t n = s.n;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t chunk_len = std::min(n, kChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ign_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using g_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* px = xc.const_data_ptr<scalar_t>();
    const scalar_t* pfx = fxc.const_data_ptr<scalar_t>();
    const scalar_t* pfz = fzc.const_data_ptr<scalar_t>();
    const scalar_t* pi = f_fzc.const_data_ptr<scalar_t>();
    const scalar_t* pt = ff_zc.const_data_ptr<scalar_t>();
    scalar_t* gx = compute_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gfx = grad_fx.mutable_data_ptr<scalar_t>();
    scalar_t* gfz = grad_fz.mutable_data_ptr<scalar_t>();
    scalar_t* gi = grad_f_fz.mutable_data_ptr<scalar_t>();
    scalar_t* gt = grad_ff_z.mutable_data_ptr<scalar_t>();
    const g_t* pg_rec = data_or_null<g_t>(g_rec);
    const g_t* pg_idem = data_or_null<g_t>(g_idem);
    const g_t* pg_tight = data_or_null<g_t>(g_tight);
    const g_t* prec = saved_rec.const_data_ptr<g_t>();
    const g_t* praw = saved_t.const_data_ptr<g_t>();
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
    auto run = [&](auto l1_tag) {
      constexpr bool kL1 = decltype(l1_tag)::value;
      at::parallel_for(0, s.rows * chunks, task_grain(chunk_len), [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t row = task / chunks;
          const int64_t lo = row * n + (task % chunks) * kChunk;
          const int64_t hi = std::min(lo + kChunk, (row + 1) * n);
          const RowScales<g_t> scales = row_scales<g_t>(
              row, s.batch_x, s.batch_z, static_cast<g_t>(g_total_value), pg_rec, pg_idem, pg_tight, prec, praw,
              static_cast<g_t>(lambda_rec), static_cast<g_t>(lambda_idem), static_cast<g_t>(lambda_tight),
              tight_clamp_ratio.has_value(), static_cast<g_t>(tight_clamp_ratio.value_or(1.0)));
          // the 1/n of the mean folded into the row's scales: one multiply per element
          const acc_t c_rec = static_cast<acc_t>(scales.rec) * inv_n;
          const acc_t c_idem = static_cast<acc_t>(scales.idem) * inv_n;
          const acc_t c_tight = -static_cast<acc_t>(scales.tight) * inv_n;
          if (row < s.batch_x) {
            for (int64_t j = lo; j < hi; ++j) {
              const acc_t g = c_rec * derivative<acc_t, kL1>(static_cast<acc_t>(pfx[j]) - static_cast<acc_t>(px[j]));
              gfx[j] = static_cast<scalar_t>(g);
              if (gx != nullptr) gx[j] = static_cast<scalar_t>(-g);
            }
          }
          if (row < s.batch_z) {
            if (s.aliased) {
              for (int64_t j = lo; j < hi; ++j) {
                const acc_t dd = derivative<acc_t, kL1>(static_cast<acc_t>(pi[j]) - static_cast<acc_t>(pfz[j]));
                const acc_t g = c_idem * dd;
                gi[j] = static_cast<scalar_t>(g);
                gfz[j] = static_cast<scalar_t>(-g);
                gt[j] = static_cast<scalar_t>(c_tight * dd);
              }
            } else {
              for (int64_t j = lo; j < hi; ++j) {
                const acc_t cz = static_cast<acc_t>(pfz[j]);
                const acc_t g = c_idem * derivative<acc_t, kL1>(static_cast<acc_t>(pi[j]) - cz);
                gi[j] = static_cast<scalar_t>(g);
                gfz[j] = static_cast<scalar_t>(-g);
                gt[j] = static_cast<scalar_t>(c_tight * derivative<acc_t, kL1>(static_cast<acc_t>(pt[j]) - cz));
              }
            }
          }
        }
      });
    };
    if (kind == DistanceKind::L1) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return {compute_grad_x ? grad_x.view(x.sizes()) : grad_x, grad_fx.view(x.sizes()), grad_fz.view(fz.sizes()),
          grad_f_fz.view(fz.sizes()), grad_ff_z.view(fz.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ign_fast, CPU, m) {
  m.impl("ign_loss", &ign_loss_cpu);
  m.impl("ign_loss_backward", &ign_loss_backward_cpu);
}

}  // namespace ign_fast
