// CUDA kernels of ign_fast::nearest_neighbors: for each query row, the index and distance of its nearest
// candidate row, with memory O(B + tile): the B x M distance matrix is never stored.
//
// Every result goes through one 64-bit word per query, key = (float bits of the distance) << 32 | index,
// updated with atomicMin. Distances are >= +0, whose float bits order like the floats, so the smallest key
// is the smallest distance and, among equal distances, the lowest index: ties need no further pass, and
// blocks working on different candidate splits merge without a second kernel. A NaN distance is stored as
// +inf (it never wins). Hence float32 distances and M < 2^32 - 1 here; float64 inputs use the reference.
//
// l1: a tiled SIMT kernel (64 queries x 64 candidates per block, 4 x 4 pairs per thread, both tiles staged in
//     shared memory in chunks of 32 elements of D), each pair summed over D in order in one float register,
//     so duplicate candidates get bit-identical distances. Blocks cover (query tile, candidate split).
// l2: a GEMM screen plus an exact recompute. Per candidate tile, dot = Q C^T by at::mm (B x tile floats),
//     approx = |q|^2 + |c|^2 - 2 q.c is off by at most kappa (|q|^2 + |c|^2) (see kappa below). A screening
//     kernel keeps per query an upper bound U on the best distance seen (atomicMin on float bits) and
//     recomputes, with direct differences, every candidate whose lower bound approx - slack does not exceed
//     U; those cannot be ruled out, all others cannot win or tie. So the index is the direct-difference one.
//     Launched on the current stream like the ATen ops around them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "../checks.h"
#include "../nearest_neighbors.h"

namespace ign_fast {
namespace {

using Key = unsigned long long;

__device__ __forceinline__ Key pack_key(float distance, int64_t index) {
  if (isnan(distance)) distance = INFINITY;  // NaN counts as +inf; never below a real distance
  distance += 0.f;                           // -0 would carry the sign bit to the top of the key
  return (static_cast<Key>(__float_as_uint(distance)) << 32) | static_cast<Key>(static_cast<uint32_t>(index));
}

__device__ __forceinline__ Key min_key(Key a, Key b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------------------
// l1: tiled direct kernel

constexpr int kTile = 64;        // queries and candidates per block tile
constexpr int kChunk = 32;       // elements of D staged per step
constexpr int kSide = 16;        // 16 x 16 threads, each 4 x 4 pairs
constexpr int kPer = kTile / kSide;
constexpr int kL1Threads = kSide * kSide;

template <typename scalar_t>
__global__ void __launch_bounds__(kL1Threads)
    nearest_l1_kernel(const scalar_t* __restrict__ queries, const scalar_t* __restrict__ candidates, int64_t batch,
                      int64_t count, int64_t width, int64_t tiles_per_split, Key* __restrict__ keys) {
  // Transposed ([element][row]) and padded by one: the staging writes and the inner-loop reads are
  // conflict-free (reads of a warp touch 2 query rows, a broadcast, and 16 consecutive candidate rows).
  __shared__ float q_tile[kChunk][kTile + 1];
  __shared__ float c_tile[kChunk][kTile + 1];
  const int tx = threadIdx.x % kSide;  // candidate lane
  const int ty = threadIdx.x / kSide;  // query lane; the 16 threads sharing ty are one half-warp
  const int64_t q_begin = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.x) * tiles_per_split * kTile;
  const int64_t c_end = min(count, c_begin + tiles_per_split * kTile);
  const float divisor = static_cast<float>(width);

  Key best[kPer];
#pragma unroll
  for (int a = 0; a < kPer; ++a) best[a] = ~Key(0);

  for (int64_t c0 = c_begin; c0 < c_end; c0 += kTile) {
    float acc[kPer][kPer];
#pragma unroll
    for (int a = 0; a < kPer; ++a)
#pragma unroll
      for (int b = 0; b < kPer; ++b) acc[a][b] = 0.f;

    for (int64_t k0 = 0; k0 < width; k0 += kChunk) {
      // Rows beyond the batch / split and elements beyond D are staged as 0: |0 - 0| adds an exact +0.
      for (int e = threadIdx.x; e < kTile * kChunk; e += kL1Threads) {
        const int row = e / kChunk;
        const int col = e % kChunk;  // consecutive threads read consecutive elements of a row: coalesced
        const int64_t k = k0 + col;
        const int64_t qr = q_begin + row;
        const int64_t cr = c0 + row;
        q_tile[col][row] = (qr < batch && k < width) ? static_cast<float>(queries[qr * width + k]) : 0.f;
        c_tile[col][row] = (cr < c_end && k < width) ? static_cast<float>(candidates[cr * width + k]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kChunk; ++k) {
        float qv[kPer], cv[kPer];
#pragma unroll
        for (int a = 0; a < kPer; ++a) qv[a] = q_tile[k][ty + kSide * a];
#pragma unroll
        for (int b = 0; b < kPer; ++b) cv[b] = c_tile[k][tx + kSide * b];
#pragma unroll
        for (int a = 0; a < kPer; ++a)
#pragma unroll
          for (int b = 0; b < kPer; ++b) acc[a][b] += fabsf(qv[a] - cv[b]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int b = 0; b < kPer; ++b) {
      const int64_t cand = c0 + tx + kSide * b;
      if (cand < c_end) {
#pragma unroll
        for (int a = 0; a < kPer; ++a) best[a] = min_key(best[a], pack_key(acc[a][b] / divisor, cand));
      }
    }
  }
  // The 16 threads of a query lane are lanes of one half-warp: xor-shuffles below 16 stay inside it.
#pragma unroll
  for (int a = 0; a < kPer; ++a) {
    for (int step = kSide / 2; step > 0; step >>= 1) {
      best[a] = min_key(best[a], __shfl_xor_sync(0xffffffffu, best[a], step));
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int a = 0; a < kPer; ++a) {
      const int64_t q = q_begin + ty + kSide * a;
      if (q < batch) atomicMin(keys + q, best[a]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// l2: screen of a GEMM tile, and the exact recompute of what the screen cannot rule out

constexpr int kScreenThreads = 256;
constexpr int kScreenPer = 4;
constexpr int kScreenCols = kScreenThreads * kScreenPer;  // candidate columns per block
constexpr int kWarps = kScreenThreads / 32;

// grid: (queries, column chunks of the tile). dots is [batch, rows] for candidates tile_offset + [0, rows).
__global__ void __launch_bounds__(kScreenThreads)
    nearest_l2_screen_kernel(const float* __restrict__ dots, const float* __restrict__ queries,
                             const float* __restrict__ tile, const float* __restrict__ q_norm,
                             const float* __restrict__ c_norm, int64_t rows, int64_t tile_offset, int64_t width,
                             float kappa, float* __restrict__ upper_bound, Key* __restrict__ keys) {
  __shared__ int refine_cols[kScreenCols];
  __shared__ int refine_count;
  __shared__ float warp_min[kWarps];
  __shared__ float threshold;
  const int64_t i = blockIdx.x;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kScreenCols;
  if (threadIdx.x == 0) refine_count = 0;

  const float nq = q_norm[i];
  float lower[kScreenPer];
  bool valid[kScreenPer];
  float local_min = INFINITY;
#pragma unroll
  for (int t = 0; t < kScreenPer; ++t) {
    const int64_t col = col0 + threadIdx.x + t * kScreenThreads;
    valid[t] = col < rows;
    lower[t] = 0.f;
    if (valid[t]) {
      const float norms = nq + c_norm[col];
      const float approx = norms - 2.f * dots[i * rows + col];
      const float slack = kappa * norms;
      lower[t] = approx - slack;  // NaN (from inf or NaN inputs) is never "> threshold": recomputed
      const float upper = approx + slack;
      if (!isnan(upper)) local_min = fminf(local_min, fmaxf(upper, 0.f) + 0.f);  // + 0: no -0 (negative bits)
    }
  }
  for (int step = 16; step > 0; step >>= 1) local_min = fminf(local_min, __shfl_xor_sync(0xffffffffu, local_min, step));
  if (threadIdx.x % 32 == 0) warp_min[threadIdx.x / 32] = local_min;
  __syncthreads();
  if (threadIdx.x == 0) {
    float block_min = INFINITY;
    for (int w = 0; w < kWarps; ++w) block_min = fminf(block_min, warp_min[w]);
    // The bound other blocks published and this block's own are both upper bounds of the best distance
    // (x D); take the smaller and publish ours (non-negative floats and +inf order like their int bits).
    const int published = atomicMin(reinterpret_cast<int*>(upper_bound + i), __float_as_int(block_min));
    threshold = fminf(block_min, __int_as_float(published));
  }
  __syncthreads();
  const float limit = threshold;
#pragma unroll
  for (int t = 0; t < kScreenPer; ++t) {
    if (valid[t] && !(lower[t] > limit)) refine_cols[atomicAdd(&refine_count, 1)] = threadIdx.x + t * kScreenThreads;
  }
  __syncthreads();
  // One warp per surviving candidate: lane l sums elements l, l+32, ... in order, then a fixed tree; every
  // pair goes through the same order, so equal rows give equal bits.
  const int lane = threadIdx.x % 32;
  const float* q_row = queries + i * width;
  for (int e = threadIdx.x / 32; e < refine_count; e += kWarps) {
    const int64_t col = col0 + refine_cols[e];
    const float* c_row = tile + col * width;
    float sum = 0.f;
    for (int64_t k = lane; k < width; k += 32) {
      const float d = q_row[k] - c_row[k];
      sum += d * d;
    }
    for (int step = 16; step > 0; step >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, step);
    if (lane == 0) atomicMin(keys + i, pack_key(sum / static_cast<float>(width), tile_offset + col));
  }
}

__global__ void unpack_keys_kernel(const Key* __restrict__ keys, int64_t batch, int64_t* __restrict__ index,
                                   float* __restrict__ distance) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < batch) {
    const Key key = keys[i];
    index[i] = static_cast<int64_t>(key & 0xffffffffull);
    distance[i] = __uint_as_float(static_cast<unsigned int>(key >> 32));
  }
}

void nearest_l1_cuda(const at::Tensor& queries, const at::Tensor& candidates, at::Tensor& keys) {
  const int64_t batch = queries.size(0);
  const int64_t count = candidates.size(0);
  const int64_t width = queries.size(1);
  const int64_t query_tiles = (batch + kTile - 1) / kTile;
  TORCH_CHECK(query_tiles <= 65535, "ign_fast: nearest_neighbors supports at most ", int64_t(65535) * kTile,
              " queries on CUDA, got ", batch);
  const int64_t candidate_tiles = (count + kTile - 1) / kTile;
  // Enough (query tile, candidate split) blocks for a few waves over all SMs.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = std::clamp<int64_t>((4 * sms + query_tiles - 1) / query_tiles, 1, candidate_tiles);
  const int64_t tiles_per_split = (candidate_tiles + splits - 1) / splits;
  const int64_t used_splits = (candidate_tiles + tiles_per_split - 1) / tiles_per_split;
  const dim3 grid(static_cast<unsigned>(used_splits), static_cast<unsigned>(query_tiles));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queries.scalar_type(), "nearest_l1_cuda", [&] {
    nearest_l1_kernel<scalar_t><<<grid, kL1Threads, 0, stream>>>(
        queries.const_data_ptr<scalar_t>(), candidates.const_data_ptr<scalar_t>(), batch, count, width,
        tiles_per_split, reinterpret_cast<Key*>(keys.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Whether at::mm on float32 CUDA tensors may round its inputs (TF32, or bf16). When unsure, say yes: that
// only widens the screen (more exact recomputes), never changes the result.
bool cuda_float32_matmul_may_round() {
  const auto& context = at::globalContext();
  try {
    return context.allowTF32CuBLAS() || context.float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
  } catch (const c10::Error&) {  // torch refuses the legacy queries once legacy and new settings were mixed
    return true;
  }
}

void nearest_l2_cuda(const at::Tensor& queries, const at::Tensor& candidates, at::Tensor& keys) {
  const int64_t batch = queries.size(0);
  const int64_t count = candidates.size(0);
  const int64_t width = queries.size(1);
  // Why the screen is exact. With N = |q|^2 + |c|^2, t the real distance (sum), a the expansion and s the
  // direct sum of the recompute: a sum of n products in any order is off by at most gamma_n ~ n u times the
  // sum of |terms| (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5), sum |q_d c_d| <= N / 2,
  // so |a - t| <= (2 gamma_n + 4u) N and |s - t| <= gamma_n t <= 2 gamma_n N. Hence every published upper
  // bound a + kappa N is >= that candidate's s >= the best s, and a candidate skipped because
  // a - kappa N > U has s >= a - (4 gamma_n + 4u) N > U >= best s: it can neither win nor tie.
  // kappa = (8n + 64) u is twice what that needs (the spare covers evaluating a and the bounds in float).
  // A GEMM allowed to round its float32 inputs (TF32, or bf16 under float32_matmul_precision "medium") is
  // off by up to a further 2 * 2^-8 N.
  const double unit = std::ldexp(1.0, -24);
  double kappa = (8.0 * static_cast<double>(width) + 64.0) * unit;
  if (cuda_float32_matmul_may_round()) kappa += 4.0 * std::ldexp(1.0, -8);
  const at::Tensor q_f = queries.to(at::kFloat).contiguous();
  const at::Tensor q_norm = q_f.square().sum(1);
  at::Tensor upper_bound = at::full({batch}, std::numeric_limits<float>::infinity(), q_f.options());
  // ~1M dot products per tile (4 MiB), at least one screening block wide.
  const int64_t tile_rows = std::min<int64_t>(count, std::max<int64_t>(kScreenCols, (int64_t(1) << 20) / batch));
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < count; start += tile_rows) {
    const int64_t rows = std::min(tile_rows, count - start);
    const at::Tensor tile = candidates.narrow(0, start, rows).to(at::kFloat).contiguous();
    const at::Tensor c_norm = tile.square().sum(1);
    const at::Tensor dots = at::mm(q_f, tile.t()).contiguous();
    const int64_t column_blocks = (rows + kScreenCols - 1) / kScreenCols;
    TORCH_INTERNAL_ASSERT(column_blocks <= 65535);
    const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(column_blocks));
    nearest_l2_screen_kernel<<<grid, kScreenThreads, 0, stream>>>(
        dots.const_data_ptr<float>(), q_f.const_data_ptr<float>(), tile.const_data_ptr<float>(),
        q_norm.const_data_ptr<float>(), c_norm.const_data_ptr<float>(), rows, start, width,
        static_cast<float>(kappa), upper_bound.mutable_data_ptr<float>(),
        reinterpret_cast<Key*>(keys.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> nearest_neighbors_cuda(const at::Tensor& queries, const at::Tensor& candidates,
                                                          c10::string_view metric_name) {
  const DistanceKind kind = check_nearest_neighbors_inputs(queries, candidates, metric_name);
  TORCH_CHECK(queries.is_cuda(), "ign_fast: nearest_neighbors CUDA kernel got queries on ", queries.device());
  TORCH_CHECK(queries.scalar_type() != at::kDouble,
              "ign_fast: queries must be float32, bfloat16 or float16 on CUDA (float64: use the CPU or "
              "ign_fast.set_backend('torch')), got float64");
  TORCH_CHECK(candidates.size(0) < (int64_t(1) << 32) - 1, "ign_fast: candidates must have fewer than 2^32 - 1 "
              "rows on CUDA, got ", candidates.size(0));
  const c10::cuda::CUDAGuard guard(queries.device());
  const int64_t batch = queries.size(0);
  at::Tensor index = at::empty({batch}, queries.options().dtype(at::kLong));
  at::Tensor distance = at::empty({batch}, queries.options().dtype(at::kFloat));
  if (batch == 0) return {index, distance};
  const at::Tensor qc = queries.contiguous();
  const at::Tensor cc = candidates.contiguous();
  at::Tensor keys = at::full({batch}, -1, queries.options().dtype(at::kLong));  // all ones: above every key
  if (kind == DistanceKind::L1) {
    nearest_l1_cuda(qc, cc, keys);
  } else {
    nearest_l2_cuda(qc, cc, keys);
  }
  constexpr int kUnpackThreads = 256;
  unpack_keys_kernel<<<static_cast<unsigned>((batch + kUnpackThreads - 1) / kUnpackThreads), kUnpackThreads, 0,
                       at::cuda::getCurrentCUDAStream()>>>(reinterpret_cast<const Key*>(keys.const_data_ptr<int64_t>()),
                                                           batch, index.mutable_data_ptr<int64_t>(),
                                                           distance.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {index, distance};
}

}  // namespace

TORCH_LIBRARY_IMPL(ign_fast, CUDA, m) { m.impl("nearest_neighbors", &nearest_neighbors_cuda); }

}  // namespace ign_fast
