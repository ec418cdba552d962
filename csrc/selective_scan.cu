// Mamba-1 selective scan, forward and backward, hand-written CUDA.
//
// Per batch b, channel d and state n:
//   h_t = exp(delta_t A[d,n]) h_{t-1} + delta_t B_t[n] u_t ,  y_t = sum_n C_t[n] h_t + D[d] u_t,
//   out_t = y_t * silu(z_t) (with z),  delta = softplus(delta + delta_bias) (when asked).
//
// Design
//  * Only the input dtype is a template parameter (fp32 / fp16 / bf16): D, z, delta_bias,
//    softplus and the group count are run-time arguments, so 3 forward + 3 backward kernels are
//    compiled per arch (mamba-ssm compiles its flags as template parameters).
//  * All index arithmetic is 64-bit: correct past 2^31 elements.
//  * Math and states in fp32. Decays exp(delta A) <= 1 are combined as products, never as
//    exp of a positive sum.
//  * Forward: one block per (b, d); the sequence runs in chunks of kChunk tokens (kItems
//    consecutive tokens per thread); the recurrence is a block-wide scan of (decay, input)
//    pairs carried across chunks. The state after every chunk is saved (carries).
//  * Backward: one block per (b, tile of channels of one group), chunks in reverse. Inside a
//    chunk the states are recomputed from the saved carry (forward scan) and the adjoint
//    r_t = dL/dh_t flows backwards (reverse scan). Gradients shared by several channels are
//    summed without atomics: dB/dC into per-tile fp32 slices owned by one block, dA / dD /
//    ddelta_bias into per-batch partials; the caller reduces them (deterministic: same inputs,
//    same bits).
#include "selective_scan.h"

// Pure CUDA (no torch headers): the tensor handling lives in selective_scan_binding.cpp, so
// this file compiles with nvcc alone (the CPU-machine compile check).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lops_ssm {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
using Params = ScanParams;


// Explicit conversions: torch builds with -D__CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i) {
  return to_f(p[i]);
}

__device__ __forceinline__ float softplus_f(float x) {  // torch's threshold of 20
  return x > 20.f ? x : log1pf(expf(x));
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

// (a, b) pairs of the recurrence s -> a s + b; `p` comes first in scan order.
__device__ __forceinline__ float2 combine(float2 p, float2 q) {
  return make_float2(p.x * q.x, fmaf(q.x, p.y, q.y));
}

__device__ __forceinline__ float2 shfl(float2 v, int off, bool down) {
  return down ? make_float2(__shfl_down_sync(kFull, v.x, off), __shfl_down_sync(kFull, v.y, off))
              : make_float2(__shfl_up_sync(kFull, v.x, off), __shfl_up_sync(kFull, v.y, off));
}

// Block-wide exclusive scan of each thread's aggregate `v`. Scan order: thread 0 first
// (forward) or thread kThreads-1 first (REVERSE). `running` is the carry from the previous
// chunk in scan order; it is combined in front and replaced by the carry after the block.
// Returns the composition of everything before this thread (running included).
template <bool REVERSE>
__device__ __forceinline__ float2 block_scan(float2 v, float2& running, float2* warp_s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float2 incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float2 o = shfl(incl, off, REVERSE);
    if (REVERSE ? lane + off < 32 : lane >= off) incl = combine(o, incl);
  }
  float2 excl = shfl(incl, 1, REVERSE);
  if (REVERSE ? lane == 31 : lane == 0) excl = make_float2(1.f, 0.f);
  if (REVERSE ? lane == 0 : lane == 31) warp_s[warp] = incl;
  __syncthreads();
  float2 prefix = running, total = running;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int ww = REVERSE ? kWarps - 1 - w : w;
    const float2 agg = warp_s[ww];
    if (REVERSE ? ww > warp : ww < warp) prefix = combine(prefix, agg);
    total = combine(total, agg);
  }
  __syncthreads();  // warp_s is reused by the next scan
  running = total;
  return combine(prefix, excl);
}

// Deterministic block sum (fixed tree, fixed warp order); the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* red_s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  if ((threadIdx.x & 31) == 0) red_s[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red_s[w];
  }
  __syncthreads();
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scan_fwd_kernel(Params p) {
  extern __shared__ float run_s[];  // [N]: the state after the previous chunk
  __shared__ float2 warp_s[kWarps];
  const int64_t d = blockIdx.x, b = blockIdx.y;
  const int64_t L = p.seqlen, N = p.dstate;
  const int64_t g = d / p.dim_per_group;
  const int64_t row = (b * p.dim + d) * L;
  const T* u = static_cast<const T*>(p.u) + row;
  const T* dl = static_cast<const T*>(p.delta) + row;
  const T* z = p.z ? static_cast<const T*>(p.z) + row : nullptr;
  T* out = static_cast<T*>(p.out) + row;
  const T* Bg = static_cast<const T*>(p.B) + (b * p.ngroups + g) * N * L;
  const T* Cg = static_cast<const T*>(p.C) + (b * p.ngroups + g) * N * L;
  const float Dv = p.D ? p.D[d] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
  float* carries = p.carries + (b * p.dim + d) * p.nchunks * N;

  for (int64_t n = threadIdx.x; n < N; n += kThreads) run_s[n] = 0.f;
  __syncthreads();
  for (int64_t c = 0; c < p.nchunks; ++c) {
    const int64_t t0 = c * kChunk + static_cast<int64_t>(threadIdx.x) * kItems;
    float uv[kItems], dv[kItems], yv[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t t = t0 + i;
      const bool ok = t < L;  // padding: delta = 0 leaves the state unchanged
      uv[i] = ok ? load(u, t) : 0.f;
      const float x = ok ? load(dl, t) + bias : 0.f;
      dv[i] = ok ? (p.softplus ? softplus_f(x) : x) : 0.f;
      yv[i] = Dv * uv[i];
    }
    for (int64_t n = 0; n < N; ++n) {
      const float An = p.A[d * N + n];
      const T* Bn = Bg + n * L;
      const T* Cn = Cg + n * L;
      float av[kItems], xv[kItems], cv[kItems];
      float2 agg = make_float2(1.f, 0.f);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t t = t0 + i;
        const bool ok = t < L;
        const float bb = ok ? load(Bn, t) : 0.f;
        cv[i] = ok ? load(Cn, t) : 0.f;
        av[i] = expf(dv[i] * An);
        xv[i] = dv[i] * uv[i] * bb;
        agg = combine(agg, make_float2(av[i], xv[i]));
      }
      float2 run = make_float2(1.f, run_s[n]);
      float h = block_scan<false>(agg, run, warp_s).y;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        h = fmaf(av[i], h, xv[i]);
        yv[i] = fmaf(cv[i], h, yv[i]);
      }
      if (threadIdx.x == 0) {
        run_s[n] = run.y;
        carries[c * N + n] = run.y;
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t t = t0 + i;
      if (t < L) {
        float y = yv[i];
        if (z) {
          const float zz = load(z, t);
          y *= zz * sigmoid_f(zz);
        }
        out[t] = from_f<T>(y);
      }
    }
  }
  for (int64_t n = threadIdx.x; n < N; n += kThreads) {
    p.last_state[(b * p.dim + d) * N + n] = run_s[n];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scan_bwd_kernel(Params p) {
  // rev_s [tile, N]: adjoint carried into the current chunk from the later ones;
  // dA_s [tile, N], dD_s [tile], ddb_s [tile]: per-channel sums over the chunks.
  extern __shared__ float smem[];
  __shared__ float2 warp_s[kWarps];
  __shared__ float red_s[kWarps];
  const int64_t L = p.seqlen, N = p.dstate, TC = p.tile;
  const int64_t b = blockIdx.y;
  const int64_t g = blockIdx.x / p.tiles_per_group, j = blockIdx.x % p.tiles_per_group;
  const int64_t d0 = g * p.dim_per_group + j * TC;
  const int64_t count = TC < p.dim_per_group - j * TC ? TC : p.dim_per_group - j * TC;
  float* rev_s = smem;
  float* dA_s = rev_s + TC * N;
  float* dD_s = dA_s + TC * N;
  float* ddb_s = dD_s + TC;

  for (int64_t idx = threadIdx.x; idx < count * N; idx += kThreads) {
    rev_s[idx] = p.dlast ? p.dlast[(b * p.dim + d0) * N + idx] : 0.f;
    dA_s[idx] = 0.f;
  }
  for (int64_t k = threadIdx.x; k < count; k += kThreads) dD_s[k] = ddb_s[k] = 0.f;
  __syncthreads();

  const T* Bg = static_cast<const T*>(p.B) + (b * p.ngroups + g) * N * L;
  const T* Cg = static_cast<const T*>(p.C) + (b * p.ngroups + g) * N * L;
  const int64_t part = ((b * p.ngroups + g) * p.tiles_per_group + j) * N * L;
  float* dBp = p.dB_part + part;
  float* dCp = p.dC_part + part;

  for (int64_t c = p.nchunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk + static_cast<int64_t>(threadIdx.x) * kItems;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t d = d0 + k;
      const int64_t row = (b * p.dim + d) * L;
      const T* u = static_cast<const T*>(p.u) + row;
      const T* dl = static_cast<const T*>(p.delta) + row;
      const T* z = p.z ? static_cast<const T*>(p.z) + row : nullptr;
      const T* dout = static_cast<const T*>(p.dout) + row;
      const float Dv = p.D ? p.D[d] : 0.f;
      const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
      const float* carries = p.carries + (b * p.dim + d) * p.nchunks * N;

      float uv[kItems], dv[kItems], dsp[kItems], dyv[kItems], dov[kItems], zv[kItems];
      float yv[kItems], duv[kItems], ddv[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t t = t0 + i;
        const bool ok = t < L;  // padding: zero input and cotangent, unit decay
        uv[i] = ok ? load(u, t) : 0.f;
        const float x = ok ? load(dl, t) + bias : 0.f;
        dv[i] = ok ? (p.softplus ? softplus_f(x) : x) : 0.f;
        dsp[i] = p.softplus ? (x > 20.f ? 1.f : sigmoid_f(x)) : 1.f;
        dov[i] = ok ? load(dout, t) : 0.f;
        zv[i] = (ok && z) ? load(z, t) : 0.f;
        dyv[i] = z ? dov[i] * zv[i] * sigmoid_f(zv[i]) : dov[i];
        yv[i] = Dv * uv[i];
        duv[i] = dyv[i] * Dv;
        ddv[i] = 0.f;
      }
      for (int64_t n = 0; n < N; ++n) {
        const float An = p.A[d * N + n];
        const T* Bn = Bg + n * L;
        const T* Cn = Cg + n * L;
        float av[kItems], xv[kItems], bv[kItems], cv[kItems];
        float2 agg = make_float2(1.f, 0.f);
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          const int64_t t = t0 + i;
          const bool ok = t < L;
          bv[i] = ok ? load(Bn, t) : 0.f;
          cv[i] = ok ? load(Cn, t) : 0.f;
          av[i] = expf(dv[i] * An);
          xv[i] = dv[i] * uv[i] * bv[i];
          agg = combine(agg, make_float2(av[i], xv[i]));
        }
        // states inside the chunk, from the carry saved by the forward
        float2 run = make_float2(1.f, c > 0 ? carries[(c - 1) * N + n] : 0.f);
        float h = block_scan<false>(agg, run, warp_s).y;
        float hprev[kItems], hv[kItems];
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          hprev[i] = h;
          h = fmaf(av[i], h, xv[i]);
          hv[i] = h;
          yv[i] = fmaf(cv[i], h, yv[i]);
        }
        // adjoint: g_t = dy_t C_t + r_t with r_{t-1} = a_t g_t, scanned from the end as the
        // pairs (a_t, a_t dy_t C_t); r entering this chunk comes from rev_s
        float2 ragg = make_float2(1.f, 0.f);
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i) {
          ragg = combine(ragg, make_float2(av[i], av[i] * dyv[i] * cv[i]));
        }
        float2 rrun = make_float2(1.f, rev_s[k * N + n]);
        float r = block_scan<true>(ragg, rrun, warp_s).y;
        float dA_loc = 0.f, dbv[kItems], dcv[kItems];
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i) {
          const float gt = fmaf(dyv[i], cv[i], r);
          const float da = gt * hprev[i] * av[i];  // dL / d(delta_t A)
          duv[i] = fmaf(gt * dv[i], bv[i], duv[i]);
          ddv[i] += gt * uv[i] * bv[i] + da * An;
          dA_loc = fmaf(da, dv[i], dA_loc);
          dbv[i] = gt * dv[i] * uv[i];
          dcv[i] = dyv[i] * hv[i];
          r = av[i] * gt;
        }
        float* dBn = dBp + n * L;
        float* dCn = dCp + n * L;
#pragma unroll
        for (int i = 0; i < kItems; ++i) {  // this block owns these slices: no atomics
          const int64_t t = t0 + i;
          if (t < L) {
            dBn[t] = (k == 0 ? 0.f : dBn[t]) + dbv[i];
            dCn[t] = (k == 0 ? 0.f : dCn[t]) + dcv[i];
          }
        }
        const float s = block_sum(dA_loc, red_s);
        if (threadIdx.x == 0) {
          dA_s[k * N + n] += s;
          rev_s[k * N + n] = rrun.y;
        }
        __syncthreads();
      }
      T* du = static_cast<T*>(p.du) + row;
      T* ddelta = static_cast<T*>(p.ddelta) + row;
      T* dz = z ? static_cast<T*>(p.dz) + row : nullptr;
      float dD_loc = 0.f, ddb_loc = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int64_t t = t0 + i;
        if (t < L) {
          const float dd = ddv[i] * dsp[i];
          du[t] = from_f<T>(duv[i]);
          ddelta[t] = from_f<T>(dd);
          if (z) {
            const float sg = sigmoid_f(zv[i]);
            dz[t] = from_f<T>(dov[i] * yv[i] * sg * (1.f + zv[i] * (1.f - sg)));
          }
          dD_loc = fmaf(dyv[i], uv[i], dD_loc);
          ddb_loc += dd;
        }
      }
      const float sD = block_sum(dD_loc, red_s);
      const float sb = block_sum(ddb_loc, red_s);
      if (threadIdx.x == 0) {
        dD_s[k] += sD;
        ddb_s[k] += sb;
      }
    }
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < count * N; idx += kThreads) {
    p.dA_part[(b * p.dim + d0) * N + idx] = dA_s[idx];
  }
  for (int64_t k = threadIdx.x; k < count; k += kThreads) {
    p.dD_part[b * p.dim + d0 + k] = dD_s[k];
    p.ddb_part[b * p.dim + d0 + k] = ddb_s[k];
  }
}

template <typename T>
void launch(const ScanParams& p, bool backward, size_t smem, cudaStream_t stream) {
  if (!backward) {
    const dim3 grid(static_cast<unsigned>(p.dim), static_cast<unsigned>(p.batch));
    scan_fwd_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  } else {
    const dim3 grid(static_cast<unsigned>(p.ngroups * p.tiles_per_group),
                    static_cast<unsigned>(p.batch));
    scan_bwd_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  }
}

void launch_any(const ScanParams& p, ScanDtype dtype, bool backward, size_t smem,
                cudaStream_t stream) {
  switch (dtype) {
    case ScanDtype::kFloat32: launch<float>(p, backward, smem, stream); break;
    case ScanDtype::kFloat16: launch<__half>(p, backward, smem, stream); break;
    case ScanDtype::kBFloat16: launch<__nv_bfloat16>(p, backward, smem, stream); break;
  }
}

}  // namespace

cudaError_t launch_selective_scan_fwd(const ScanParams& p, ScanDtype dtype,
                                      cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;
  launch_any(p, dtype, false, static_cast<size_t>(p.dstate) * sizeof(float), stream);
  return cudaGetLastError();
}

cudaError_t launch_selective_scan_bwd(const ScanParams& p, ScanDtype dtype,
                                      cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;
  launch_any(p, dtype, true, bwd_smem_bytes(p.dstate, p.tile), stream);
  return cudaGetLastError();
}

}  // namespace lops_ssm
