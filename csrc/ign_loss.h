// Shared by the CPU and CUDA kernels of ign_fast::ign_loss: input checks, and the per-sample math that turns
// the three row sums into the loss terms and the upstream gradients into per-row gradient scales.
//
// With d the per-sample mean |a-b| (l1) or (a-b)^2 (l2) over n elements, rows i < Bx of (x, fx) and rows
// i < Bz of (fz, f_fz, ff_z):
//   rec_i = d(fx, x)_i   idem_i = d(f_fz, fz)_i   t_i = -d(ff_z, sg fz)_i   tight_i = clamp(t_i, rec_i) or t_i
// and every gradient is a per-row multiple of the elementwise derivative D(a, b) = sign(a-b)/n or 2(a-b)/n:
//   grad_fx = c_rec·D(fx, x) = -grad_x     grad_f_fz = c_idem·D(f_fz, fz) = -grad_fz     grad_ff_z = -c_t·D(ff_z, fz)
// (fz gets nothing from the tight term: it enters it through sg). The per-row scales c_* are RowScales below.
#pragma once
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <string>

#include "checks.h"

namespace ign_fast {

// Must equal ign_fast.reference.CLAMP_SCALE_EPS and CLAMP_ARG_LIMIT (the spec of the clamp at rec = 0).
constexpr double kClampScaleEps = 1e-12;
constexpr double kClampArgLimit = 20.0;

struct IgnLossShape {
  int64_t batch_x;  // rows of x and fx: rec
  int64_t batch_z;  // rows of fz, f_fz, ff_z: idem and tight
  int64_t rows;     // max of the two: the kernels walk rows 0..rows-1 and skip what a row lacks
  int64_t n;        // elements per sample (x and fz share their per-sample shape)
  bool aliased;     // f_fz and ff_z are one tensor (same storage, offset and strides): read it once
};

inline IgnLossShape check_ign_loss_inputs(const at::Tensor& x, const at::Tensor& fx, const at::Tensor& fz,
                                          const at::Tensor& f_fz, const at::Tensor& ff_z, double lambda_rec,
                                          double lambda_idem, double lambda_tight,
                                          const c10::optional<double>& ratio) {
  check_pair(x, fx, "x", "fx");
  check_pair(fz, f_fz, "fz", "f_fz");
  check_pair(fz, ff_z, "fz", "ff_z");
  TORCH_CHECK(fz.scalar_type() == x.scalar_type(), "ign_fast: fz must have the dtype of x (", x.scalar_type(),
              "), got ", fz.scalar_type());
  TORCH_CHECK(fz.device() == x.device(), "ign_fast: fz must be on the device of x (", x.device(), "), got ",
              fz.device());
  TORCH_CHECK(fz.dim() == x.dim() && fz.sizes().slice(1) == x.sizes().slice(1),
              "ign_fast: fz must have the per-sample shape of x ", x.sizes().slice(1), ", got ", fz.sizes());
  TORCH_CHECK(x.size(0) > 0, "ign_fast: x must hold at least one sample, got shape ", x.sizes());
  TORCH_CHECK(fz.size(0) > 0, "ign_fast: fz must hold at least one sample, got shape ", fz.sizes());
  TORCH_CHECK(std::isfinite(lambda_rec) && lambda_rec >= 0, "ign_fast: lambda_rec must be finite and >= 0, got ",
              lambda_rec);
  TORCH_CHECK(std::isfinite(lambda_idem) && lambda_idem >= 0,
              "ign_fast: lambda_idem must be finite and >= 0, got ", lambda_idem);
  TORCH_CHECK(std::isfinite(lambda_tight) && lambda_tight >= 0,
              "ign_fast: lambda_tight must be finite and >= 0, got ", lambda_tight);
  if (ratio.has_value()) {
    TORCH_CHECK(std::isfinite(*ratio) && *ratio > 0, "ign_fast: tight_clamp_ratio must be finite and > 0, got ",
                *ratio);
    // the clamp couples tight_i with rec_i, so both need the same rows
    TORCH_CHECK(fz.size(0) == x.size(0), "ign_fast: with tight_clamp_ratio, fz must have the batch size of x (",
                x.size(0), "), got ", fz.size(0));
  }
  IgnLossShape s;
  s.batch_x = x.size(0);
  s.batch_z = fz.size(0);
  s.rows = std::max(s.batch_x, s.batch_z);
  s.n = x.numel() / s.batch_x;
  s.aliased = f_fz.is_alias_of(ff_z) && f_fz.data_ptr() == ff_z.data_ptr() && f_fz.strides() == ff_z.strides();
  return s;
}

// The gradient checks of ign_loss_backward on top of the forward's.
inline void check_ign_loss_backward_inputs(const IgnLossShape& s, const at::Tensor& x, const at::Tensor& grad_total,
                                           const c10::optional<at::Tensor>& grad_rec,
                                           const c10::optional<at::Tensor>& grad_idem,
                                           const c10::optional<at::Tensor>& grad_tight, const at::Tensor& rec,
                                           const at::Tensor& tight_unclamped) {
  auto check_vector = [&](const at::Tensor& t, const char* name, int64_t len) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == len, "ign_fast: ", name, " must have shape [", len, "], got ",
                t.sizes());
    TORCH_CHECK(t.device() == x.device(), "ign_fast: ", name, " must be on ", x.device(), ", got ", t.device());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "ign_fast: ", name, " must be floating point, got ",
                t.scalar_type());
  };
  TORCH_CHECK(grad_total.numel() == 1 && grad_total.dim() == 0, "ign_fast: grad_total must be 0-dim, got ",
              grad_total.sizes());
  TORCH_CHECK(at::isFloatingType(grad_total.scalar_type()), "ign_fast: grad_total must be floating point, got ",
              grad_total.scalar_type());
  TORCH_CHECK(grad_total.device() == x.device(), "ign_fast: grad_total must be on ", x.device(), ", got ",
              grad_total.device());
  if (grad_rec.has_value()) check_vector(*grad_rec, "grad_rec", s.batch_x);
  if (grad_idem.has_value()) check_vector(*grad_idem, "grad_idem", s.batch_z);
  if (grad_tight.has_value()) check_vector(*grad_tight, "grad_tight", s.batch_z);
  check_vector(rec, "rec", s.batch_x);
  check_vector(tight_unclamped, "tight_unclamped", s.batch_z);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t sign_of(acc_t v) {
  return static_cast<acc_t>((v > acc_t(0)) - (v < acc_t(0)));
}

// tight_i after the clamp, and its derivatives in t_i and rec_i (ign_fast.reference.clamp_tight):
//   s = ratio·rec; s > eps: tanh(clip(t/s, ±limit))·s, else sign(t)·s (sign not differentiated).
// clip passes the gradient on its closed interval, as torch.clamp does.
template <typename acc_t>
struct ClampedTight {
  acc_t value;
  acc_t d_t;
  acc_t d_rec;
};

template <typename acc_t>
C10_HOST_DEVICE inline ClampedTight<acc_t> clamp_tight(acc_t t, acc_t rec, acc_t ratio) {
  const acc_t scale = ratio * rec;
  if (scale > static_cast<acc_t>(kClampScaleEps)) {
    const acc_t limit = static_cast<acc_t>(kClampArgLimit);
    const acc_t u = t / scale;
    const bool inside = u >= -limit && u <= limit;
    const acc_t th = tanh(inside ? u : (u > acc_t(0) ? limit : -limit));
    const acc_t sech2 = inside ? acc_t(1) - th * th : acc_t(0);
    return {th * scale, sech2, ratio * (th - sech2 * u)};
  }
  const acc_t sg = sign_of(t);
  return {sg * scale, acc_t(0), ratio * sg};
}

// Scales of one row's gradients, from the upstream gradients of (total, rec, idem, tight) and the row's saved
// rec_i and t_i. A null g_* means that output got no gradient (zero). A row past batch_x (batch_z) gets zero
// rec (idem, tight) scales; the kernels skip it anyway.
template <typename acc_t>
struct RowScales {
  acc_t rec;    // grad_fx = rec·D(fx, x)
  acc_t idem;   // grad_f_fz = idem·D(f_fz, fz)
  acc_t tight;  // grad_ff_z = -tight·D(ff_z, fz)
};

template <typename acc_t>
C10_HOST_DEVICE inline RowScales<acc_t> row_scales_of(int64_t row, int64_t batch_x, int64_t batch_z, acc_t g_total,
                                                      acc_t g_rec, acc_t g_idem, acc_t g_tight, acc_t rec, acc_t t,
                                                      acc_t lambda_rec, acc_t lambda_idem, acc_t lambda_tight,
                                                      bool has_clamp, acc_t ratio) {
  RowScales<acc_t> out{acc_t(0), acc_t(0), acc_t(0)};
  if (row < batch_x) out.rec = g_total * lambda_rec / static_cast<acc_t>(batch_x) + g_rec;
  if (row < batch_z) {
    out.idem = g_total * lambda_idem / static_cast<acc_t>(batch_z) + g_idem;
    const acc_t g_tight_out = g_total * lambda_tight / static_cast<acc_t>(batch_z) + g_tight;
    if (has_clamp) {  // batch_x == batch_z was checked
      const ClampedTight<acc_t> c = clamp_tight(t, rec, ratio);
      out.tight = g_tight_out * c.d_t;
      out.rec += g_tight_out * c.d_rec;
    } else {
      out.tight = g_tight_out;
    }
  }
  return out;
}

// The same from the per-row arrays (a null g_* is zero), reading only entries that exist for the row.
template <typename acc_t>
C10_HOST_DEVICE inline RowScales<acc_t> row_scales(int64_t row, int64_t batch_x, int64_t batch_z, acc_t g_total,
                                                   const acc_t* g_rec, const acc_t* g_idem, const acc_t* g_tight,
                                                   const acc_t* rec, const acc_t* t_raw, acc_t lambda_rec,
                                                   acc_t lambda_idem, acc_t lambda_tight, bool has_clamp,
                                                   acc_t ratio) {
  const bool has_x = row < batch_x;
  const bool has_z = row < batch_z;
  return row_scales_of<acc_t>(row, batch_x, batch_z, g_total, has_x && g_rec ? g_rec[row] : acc_t(0),
                              has_z && g_idem ? g_idem[row] : acc_t(0), has_z && g_tight ? g_tight[row] : acc_t(0),
                              has_x && has_clamp ? rec[row] : acc_t(0), has_z && has_clamp ? t_raw[row] : acc_t(0),
                              lambda_rec, lambda_idem, lambda_tight, has_clamp, ratio);
}

// The five inputs made contiguous once; ff_z shares f_fz's buffer when the two are one tensor (read once).
struct ContiguousInputs {
  at::Tensor x, fx, fz, f_fz, ff_z;
};

inline ContiguousInputs contiguous_inputs(const at::Tensor& x, const at::Tensor& fx, const at::Tensor& fz,
                                          const at::Tensor& f_fz, const at::Tensor& ff_z, const IgnLossShape& s) {
  at::Tensor f_fzc = f_fz.contiguous();
  at::Tensor ff_zc = s.aliased ? f_fzc : ff_z.contiguous();
  return {x.contiguous(), fx.contiguous(), fz.contiguous(), std::move(f_fzc), std::move(ff_zc)};
}

// The forward's outputs in the accumulation dtype: total (0-dim), rec [Bx], idem, tight and tight before the
// clamp [Bz].
struct ForwardOutputs {
  at::Tensor total, rec, idem, tight, tight_raw;
};

inline ForwardOutputs empty_forward_outputs(const at::Tensor& x, const IgnLossShape& s) {
  const auto options = x.options().dtype(accumulate_dtype(x.scalar_type()));
  return {at::empty({}, options), at::empty({s.batch_x}, options), at::empty({s.batch_z}, options),
          at::empty({s.batch_z}, options), at::empty({s.batch_z}, options)};
}

// An upstream per-sample gradient as a contiguous tensor of acc_type, or undefined when absent (zero).
inline at::Tensor row_gradient(const c10::optional<at::Tensor>& grad, at::ScalarType acc_type) {
  if (!grad.has_value() || !grad->defined()) return at::Tensor();
  return grad->to(acc_type).contiguous();
}

template <typename T>
inline const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace ign_fast
