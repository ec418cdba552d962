// Mamba-1 selective scan: kernel parameters and launchers (csrc/selective_scan.cu, pure CUDA),
// called by the torch binding in csrc/selective_scan_binding.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lops_ssm {

// Tokens per chunk: the forward saves the state after every chunk (per batch, channel, state);
// the backward recomputes the states inside a chunk from them. Exposed to Python as CHUNK.
constexpr int kThreads = 128;
constexpr int kItems = 8;
constexpr int kChunk = kThreads * kItems;
// Shared memory the backward may use for its per-(channel, state) accumulators.
constexpr int64_t kBwdSmemBytes = 40 * 1024;

enum class ScanDtype { kFloat32, kFloat16, kBFloat16 };

// Layouts (all contiguous): u, delta, z, out, dout, du, ddelta, dz [b, D, L] in the input dtype;
// B, C [b, G, N, L] in the input dtype; A [D, N], D, delta_bias [D], states fp32.
struct ScanParams {
  int64_t batch, dim, dstate, seqlen, ngroups, dim_per_group, nchunks;
  const void* u;
  const void* delta;
  const void* B;
  const void* C;
  const void* z;  // nullptr: no gating
  const float* A;
  const float* D;           // nullptr: no skip term
  const float* delta_bias;  // nullptr: no bias
  bool softplus;
  void* out;
  float* last_state;  // [b, D, N]
  float* carries;     // [b, D, nchunks, N]: the state after each chunk
  // backward
  const void* dout;
  const float* dlast;  // nullptr: no gradient on the last state
  void* du;
  void* ddelta;
  void* dz;
  float* dA_part;   // [b, D, N]
  float* dD_part;   // [b, D]
  float* ddb_part;  // [b, D]
  float* dB_part;   // [b, G, tiles_per_group, N, L]
  float* dC_part;
  int64_t tile, tiles_per_group;  // channels per backward block, blocks per group
};

inline size_t bwd_smem_bytes(int64_t dstate, int64_t tile) {
  return static_cast<size_t>((2 * dstate + 2) * tile) * sizeof(float);
}

cudaError_t launch_selective_scan_fwd(const ScanParams& p, ScanDtype dtype, cudaStream_t stream);
cudaError_t launch_selective_scan_bwd(const ScanParams& p, ScanDtype dtype, cudaStream_t stream);

}  // namespace lops_ssm
