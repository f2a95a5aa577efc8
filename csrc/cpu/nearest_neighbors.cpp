// CPU kernel of ign_fast::nearest_neighbors: for each query row, the index and distance of its nearest
// candidate row, without ever storing the B x M distance matrix.
//
// Distance: the mean over D of |q-c| ("l1") or (q-c)^2 ("l2"), summed in the 16-lane order of
// per_sample_distance (csrc/cpu/per_sample_distance.cpp) so the reported distance is bit-identical to
// per_sample_distance(q, c[index]): the IMLE search and the IMLE loss agree exactly.
//
// l1: a register-blocked direct kernel (QR queries x CR candidates per micro-tile, 16 lanes per pair kept
//     in SIMD registers), over candidate tiles that stay in cache; an AVX2 copy of it is chosen at run time
//     where the CPU has AVX2 (the build targets baseline x86-64, so the compiler alone would use SSE2 only).
// l2: a GEMM screen plus an exact recompute. Per candidate tile, dot = Q C^T by at::mm (memory B x tile)
//     gives approx = |q|^2 + |c|^2 - 2 q.c, whose error is bounded by kappa (|q|^2 + |c|^2). A candidate is
//     recomputed with direct differences only if approx - bound could still reach the best distance found
//     so far; since the screen never rejects a candidate that could win or tie, the result is the same as a
//     direct-difference search (the expansion alone can mis-order near ties by cancellation).
// Ties go to the lowest index: candidates are scanned in increasing order and replace the best only when
// strictly smaller; candidate splits are merged in order with the same rule. NaN distances never win.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../nearest_neighbors.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define IGN_FAST_NN_X86_AVX2 1
#endif

// torch >= 2.13 (checked) lets oneDNN matmuls round float32 inputs independently of
// float32_matmul_precision (torch.backends.mkldnn.matmul.fp32_precision); older headers lack the query.
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
#define IGN_FAST_NN_FP32_PRECISION_API 1
#endif
#endif

#if defined(__GNUC__)
#define IGN_FAST_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define IGN_FAST_ALWAYS_INLINE inline
#endif

namespace ign_fast {
namespace {

// per_sample_distance keeps 16 independent partial sums per row; the search must use the same order.
constexpr int64_t kSumLanes = 16;

// 32-byte vectors through the GCC/Clang vector extension: two SSE registers in the baseline build, one AVX
// register in the AVX2 copy. Lane-wise adds are the same IEEE operations as per_sample_distance's scalar
// lanes, so the sums are bit-identical.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  using V = f32x8;
  static constexpr int kWidth = 8;
  static constexpr int kQueries = 2;     // QR x CR x (16 / kWidth) accumulators = 8 registers with AVX2
  static constexpr int kCandidates = 2;
  // Vectors pass by reference: by value, the baseline (non-AVX) build would warn about the vector ABI.
  static IGN_FAST_ALWAYS_INLINE void load(V& v, const float* p) { std::memcpy(&v, p, sizeof(V)); }  // unaligned
  static IGN_FAST_ALWAYS_INLINE void add_abs(V& acc, const V& d) { acc += (V)((i32x8)d & 0x7fffffff); }
};

template <>
struct Simd<double> {
  using V = f64x4;
  static constexpr int kWidth = 4;
  static constexpr int kQueries = 2;
  static constexpr int kCandidates = 1;
  static IGN_FAST_ALWAYS_INLINE void load(V& v, const double* p) { std::memcpy(&v, p, sizeof(V)); }
  static IGN_FAST_ALWAYS_INLINE void add_abs(V& acc, const V& d) {
    acc += (V)((i64x4)d & 0x7fffffffffffffffLL);
  }
};

// Sums over n of |q-c| or (q-c)^2 for QR queries x CR candidates, each in per_sample_distance's order:
// lane l accumulates elements l, l+16, l+32, ...; the tail (n % 16) is added to lane 0 in order; the lanes
// are then added 0..15.
template <typename T, DistanceKind kind, int QR, int CR>
IGN_FAST_ALWAYS_INLINE void micro_tile_sums(const T* const* q, const T* const* c, int64_t n, T (&sums)[QR][CR]) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int kVecs = kSumLanes / S::kWidth;
  V acc[QR][CR][kVecs];
  for (int a = 0; a < QR; ++a)
    for (int b = 0; b < CR; ++b)
      for (int v = 0; v < kVecs; ++v) acc[a][b][v] = V{};
  int64_t j = 0;
  for (; j + kSumLanes <= n; j += kSumLanes) {
    for (int v = 0; v < kVecs; ++v) {
      V cv[CR];
      for (int b = 0; b < CR; ++b) S::load(cv[b], c[b] + j + v * S::kWidth);
      for (int a = 0; a < QR; ++a) {
        V qv;
        S::load(qv, q[a] + j + v * S::kWidth);
        for (int b = 0; b < CR; ++b) {
          const V d = qv - cv[b];
          if constexpr (kind == DistanceKind::L1) {
            S::add_abs(acc[a][b][v], d);
          } else {
            acc[a][b][v] += d * d;
          }
        }
      }
    }
  }
  for (int a = 0; a < QR; ++a) {
    for (int b = 0; b < CR; ++b) {
      T lanes[kSumLanes];
      std::memcpy(lanes, acc[a][b], sizeof(lanes));
      for (int64_t k = j; k < n; ++k) {
        const T d = q[a][k] - c[b][k];
        lanes[0] += kind == DistanceKind::L1 ? std::abs(d) : d * d;
      }
      T total = 0;
      for (int64_t l = 0; l < kSumLanes; ++l) total += lanes[l];
      sums[a][b] = total;
    }
  }
}

// Scans candidate rows [0, rows) of one tile (global index offset + r) for queries [q_begin, q_end),
// updating best_dist / best_idx (indexed by query). Every pair goes through the same micro-tile code,
// short edge groups repeat their last row, so duplicate candidates get bit-identical distances.
template <typename T, DistanceKind kind>
IGN_FAST_ALWAYS_INLINE void scan_tile_impl(const T* queries, int64_t q_begin, int64_t q_end, const T* tile,
                                           int64_t rows, int64_t offset, int64_t n, T* best_dist,
                                           int64_t* best_idx) {
  constexpr int QR = Simd<T>::kQueries;
  constexpr int CR = Simd<T>::kCandidates;
  const T inv_n_divisor = static_cast<T>(n);
  for (int64_t qi = q_begin; qi < q_end; qi += QR) {
    const int q_count = static_cast<int>(std::min<int64_t>(QR, q_end - qi));
    const T* qp[QR];
    for (int a = 0; a < QR; ++a) qp[a] = queries + (qi + std::min(a, q_count - 1)) * n;
    for (int64_t r = 0; r < rows; r += CR) {
      const int c_count = static_cast<int>(std::min<int64_t>(CR, rows - r));
      const T* cp[CR];
      for (int b = 0; b < CR; ++b) cp[b] = tile + (r + std::min(b, c_count - 1)) * n;
      T sums[QR][CR];
      micro_tile_sums<T, kind, QR, CR>(qp, cp, n, sums);
      for (int a = 0; a < q_count; ++a) {
        for (int b = 0; b < c_count; ++b) {
          const T mean = sums[a][b] / inv_n_divisor;  // as per_sample_distance: sum / n
          if (mean < best_dist[qi + a]) {              // strict: earlier (lower) index wins ties; NaN never wins
            best_dist[qi + a] = mean;
            best_idx[qi + a] = offset + r + b;
          }
        }
      }
    }
  }
}

template <typename T, DistanceKind kind>
void scan_tile_baseline(const T* queries, int64_t q_begin, int64_t q_end, const T* tile, int64_t rows,
                        int64_t offset, int64_t n, T* best_dist, int64_t* best_idx) {
  scan_tile_impl<T, kind>(queries, q_begin, q_end, tile, rows, offset, n, best_dist, best_idx);
}

#ifdef IGN_FAST_NN_X86_AVX2
// The same code compiled for AVX2. Only adds, subtractions and a sign mask are involved for l1 (no
// multiply that FMA contraction could fuse), so it is bit-identical to the baseline copy.
template <typename T, DistanceKind kind>
__attribute__((target("avx2"))) void scan_tile_avx2(const T* queries, int64_t q_begin, int64_t q_end,
                                                    const T* tile, int64_t rows, int64_t offset, int64_t n,
                                                    T* best_dist, int64_t* best_idx) {
  scan_tile_impl<T, kind>(queries, q_begin, q_end, tile, rows, offset, n, best_dist, best_idx);
}
#endif

template <typename T, DistanceKind kind>
using ScanTileFn = void (*)(const T*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t, T*, int64_t*);

template <typename T, DistanceKind kind>
ScanTileFn<T, kind> pick_scan_tile() {
#ifdef IGN_FAST_NN_X86_AVX2
  if (__builtin_cpu_supports("avx2")) return &scan_tile_avx2<T, kind>;
#endif
  return &scan_tile_baseline<T, kind>;
}

// One pair's sum in per_sample_distance's order (the exact recompute of the l2 screen).
template <typename T, DistanceKind kind>
T pair_sum(const T* q, const T* c, int64_t n) {
  T sums[1][1];
  const T* qp[1] = {q};
  const T* cp[1] = {c};
  micro_tile_sums<T, kind, 1, 1>(qp, cp, n, sums);
  return sums[0][0];
}

// Rows of a tile: about 128 KiB of candidates, so a tile stays in L2 while every query of a task sweeps it.
int64_t candidate_tile_rows(int64_t n, int64_t element_size, int64_t multiple) {
  int64_t rows = std::max<int64_t>(multiple, (int64_t(128) << 10) / std::max<int64_t>(n * element_size, 1));
  rows = std::min<int64_t>(rows, 512);
  return std::max<int64_t>(multiple, rows / multiple * multiple);
}

// Candidates as acc_t rows: a view when they already are, else a converted copy of just this tile.
template <typename scalar_t, typename acc_t>
const acc_t* tile_rows_as(const scalar_t* src, int64_t rows, int64_t n, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    buffer.resize(static_cast<size_t>(rows * n));
    for (int64_t k = 0; k < rows * n; ++k) buffer[k] = static_cast<acc_t>(src[k]);
    return buffer.data();
  }
}

// l1 (and the shared split / merge structure): tasks are (query chunk, candidate split) pairs so both a
// large B and a large M (or B = 1) keep every thread busy; each split keeps its own best per query, and
// the splits are merged in increasing order.
template <typename scalar_t, typename acc_t>
void nearest_l1(const at::Tensor& queries, const at::Tensor& candidates, acc_t* out_dist, int64_t* out_idx) {
  const int64_t batch = queries.size(0);
  const int64_t count = candidates.size(0);
  const int64_t n = queries.size(1);
  // Queries in the accumulation type: O(B x D), the size of the input itself.
  const at::Tensor q_acc = queries.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* qp = q_acc.const_data_ptr<acc_t>();
  const scalar_t* cp = candidates.const_data_ptr<scalar_t>();

  const int64_t tile_rows = candidate_tile_rows(n, sizeof(acc_t), Simd<acc_t>::kCandidates);
  const int64_t query_chunk = std::max<int64_t>(Simd<acc_t>::kQueries, 64);
  const int64_t query_chunks = (batch + query_chunk - 1) / query_chunk;
  const int64_t tiles = (count + tile_rows - 1) / tile_rows;
  const int64_t wanted_tasks = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t wanted_splits = std::clamp<int64_t>((wanted_tasks + query_chunks - 1) / query_chunks, 1, tiles);
  const int64_t tiles_per_split = (tiles + wanted_splits - 1) / wanted_splits;
  const int64_t splits = (tiles + tiles_per_split - 1) / tiles_per_split;  // every split holds candidates

  std::vector<acc_t> split_dist(static_cast<size_t>(splits * batch), std::numeric_limits<acc_t>::infinity());
  std::vector<int64_t> split_idx(static_cast<size_t>(splits * batch), 0);
  const auto scan_tile = pick_scan_tile<acc_t, DistanceKind::L1>();

  at::parallel_for(0, query_chunks * splits, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<acc_t> buffer;
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t split = task / query_chunks;
      const int64_t q_begin = (task % query_chunks) * query_chunk;
      const int64_t q_end = std::min(batch, q_begin + query_chunk);
      const int64_t c_begin = split * tiles_per_split * tile_rows;
      const int64_t c_end = std::min(count, c_begin + tiles_per_split * tile_rows);
      acc_t* best_dist = split_dist.data() + split * batch;
      int64_t* best_idx = split_idx.data() + split * batch;
      for (int64_t q = q_begin; q < q_end; ++q) best_idx[q] = c_begin;
      for (int64_t start = c_begin; start < c_end; start += tile_rows) {
        const int64_t rows = std::min(tile_rows, c_end - start);
        const acc_t* tile = tile_rows_as<scalar_t, acc_t>(cp + start * n, rows, n, buffer);
        scan_tile(qp, q_begin, q_end, tile, rows, start, n, best_dist, best_idx);
      }
    }
  });
  for (int64_t q = 0; q < batch; ++q) {
    acc_t dist = split_dist[q];
    int64_t idx = split_idx[q];
    for (int64_t s = 1; s < splits; ++s) {
      if (split_dist[s * batch + q] < dist) {
        dist = split_dist[s * batch + q];
        idx = split_idx[s * batch + q];
      }
    }
    out_dist[q] = dist;
    out_idx[q] = idx;
  }
}

// Whether at::mm on float32 CPU tensors may round its inputs (to TF32 or bf16). When unsure, say yes: that
// only widens the screen (more exact recomputes), never changes the result.
bool cpu_float32_matmul_may_round() {
  const auto& context = at::globalContext();
#ifdef IGN_FAST_NN_FP32_PRECISION_API
  // torch.set_float32_matmul_precision("medium"/"high") is reflected here too
  const auto precision = context.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  if (precision == at::Float32Precision::TF32 || precision == at::Float32Precision::BF16) return true;
#endif
  try {
    return context.float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
  } catch (const c10::Error&) {  // torch refuses the legacy query once legacy and new settings were mixed
    return true;
  }
}

// l2: GEMM screen, then an exact recompute of every candidate the screen cannot rule out.
template <typename scalar_t, typename acc_t>
void nearest_l2(const at::Tensor& queries, const at::Tensor& candidates, acc_t* out_dist, int64_t* out_idx) {
  const int64_t batch = queries.size(0);
  const int64_t count = candidates.size(0);
  const int64_t n = queries.size(1);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor q_acc = queries.to(acc_type).contiguous();
  const acc_t* qp = q_acc.const_data_ptr<acc_t>();

  // Why the screen is exact. With N = |q|^2 + |c|^2, t the real distance (sum), a the expansion and s the
  // direct sum the recompute would give: a sum of n products in any order is off by at most gamma_n ~ n u
  // times the sum of |terms| (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5), and
  // sum |q_d c_d| <= N / 2, so |a - t| <= (2 gamma_n + 4u) N; |s - t| <= gamma_n t <= 2 gamma_n N. A candidate
  // is skipped when a - kappa N > bound >= s_best, and then s >= a - (4 gamma_n + 4u) N > s_best: it can
  // neither win nor tie. kappa = (8n + 64) u is twice what that needs (the spare covers evaluating a and
  // the bound). A float32 GEMM allowed to round its inputs (float32_matmul_precision "high"/"medium": TF32
  // or bf16) is off by up to a further 2 * 2^-8 N.
  const double unit = std::numeric_limits<acc_t>::epsilon() / 2;
  double kappa_d = (8.0 * static_cast<double>(n) + 64.0) * unit;
  if (std::is_same_v<acc_t, float> && cpu_float32_matmul_may_round()) {
    kappa_d += 4.0 * std::ldexp(1.0, -8);
  }
  const acc_t kappa = static_cast<acc_t>(kappa_d);
  const acc_t bound_scale = static_cast<acc_t>(1.0 + 8.0 * unit);

  std::vector<acc_t> q_norm(static_cast<size_t>(batch));
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t s = 0;
      for (int64_t k = 0; k < n; ++k) s += qp[i * n + k] * qp[i * n + k];
      q_norm[i] = s;
    }
  });

  // Tiles of at most ~1M dot products (B x tile) and ~16 MiB of converted candidates.
  const int64_t tile_rows = std::clamp<int64_t>(
      std::min<int64_t>((int64_t(1) << 20) / std::max<int64_t>(batch, 1),
                        (int64_t(4) << 20) / std::max<int64_t>(n, 1)),
      64, std::max<int64_t>(count, 64));
  std::vector<acc_t> best_dist(static_cast<size_t>(batch), std::numeric_limits<acc_t>::infinity());
  std::vector<acc_t> best_bound(static_cast<size_t>(batch), std::numeric_limits<acc_t>::infinity());
  std::vector<int64_t> best_idx(static_cast<size_t>(batch), 0);
  std::vector<acc_t> c_norm;

  // One buffer for every tile's dot products (and one for converted low-precision tiles): a fresh allocation
  // per tile would leave the heap fragmented, so the footprint would creep up with M.
  at::Tensor dots_buffer = at::empty({batch * tile_rows}, q_acc.options());
  at::Tensor tile_buffer;
  if (candidates.scalar_type() != acc_type) tile_buffer = at::empty({tile_rows * n}, q_acc.options());
  for (int64_t start = 0; start < count; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, count - start);
    at::Tensor tile = candidates.narrow(0, start, rows);
    if (tile_buffer.defined()) tile = tile_buffer.narrow(0, 0, rows * n).view({rows, n}).copy_(tile);
    const acc_t* tp = tile.const_data_ptr<acc_t>();
    at::Tensor dots = dots_buffer.narrow(0, 0, batch * rows).view({batch, rows});  // contiguous [B, rows]
    at::mm_out(dots, q_acc, tile.t());
    const acc_t* dp = dots.const_data_ptr<acc_t>();
    c_norm.resize(static_cast<size_t>(rows));
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        acc_t s = 0;
        for (int64_t k = 0; k < n; ++k) s += tp[r * n + k] * tp[r * n + k];
        c_norm[r] = s;
      }
    });
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* qi = qp + i * n;
        const acc_t* dot_row = dp + i * rows;
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t norms = q_norm[i] + c_norm[r];
          const acc_t lower = (norms - 2 * dot_row[r]) - kappa * norms;
          if (lower > best_bound[i]) continue;  // cannot reach the best; NaN or inf falls through to recompute
          const acc_t mean = pair_sum<acc_t, DistanceKind::L2>(qi, tp + r * n, n) / static_cast<acc_t>(n);
          if (mean < best_dist[i]) {
            best_dist[i] = mean;
            best_idx[i] = start + r;
            best_bound[i] = mean * static_cast<acc_t>(n) * bound_scale;
          }
        }
      }
    });
  }
  for (int64_t q = 0; q < batch; ++q) {
    out_dist[q] = best_dist[q];
    out_idx[q] = best_idx[q];
  }
}

std::tuple<at::Tensor, at::Tensor> nearest_neighbors_cpu(const at::Tensor& queries, const at::Tensor& candidates,
                                                         c10::string_view metric_name) {
  const DistanceKind kind = check_nearest_neighbors_inputs(queries, candidates, metric_name);
  TORCH_CHECK(queries.device().is_cpu(), "ign_fast: nearest_neighbors CPU kernel got queries on ",
              queries.device());
  const int64_t batch = queries.size(0);
  const auto acc_type = accumulate_dtype(queries.scalar_type());
  at::Tensor index = at::empty({batch}, queries.options().dtype(at::kLong));
  at::Tensor distance = at::empty({batch}, queries.options().dtype(acc_type));
  if (batch == 0) return {index, distance};
  const at::Tensor qc = queries.contiguous();
  const at::Tensor cc = candidates.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qc.scalar_type(), "nearest_neighbors_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (kind == DistanceKind::L1) {
      nearest_l1<scalar_t, acc_t>(qc, cc, distance.mutable_data_ptr<acc_t>(), index.mutable_data_ptr<int64_t>());
    } else {
      nearest_l2<scalar_t, acc_t>(qc, cc, distance.mutable_data_ptr<acc_t>(), index.mutable_data_ptr<int64_t>());
    }
  });
  return {index, distance};
}

}  // namespace

TORCH_LIBRARY_IMPL(ign_fast, CPU, m) { m.impl("nearest_neighbors", &nearest_neighbors_cpu); }

}  // namespace ign_fast
