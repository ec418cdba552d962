// Torch binding of the selective-scan kernels (built by lightning_ops/ssm/cuda.py): input
// checks, allocation, stream, and the channel tiling of the backward.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "selective_scan.h"

namespace lops_ssm {
namespace {

ScanDtype scan_dtype(const at::Tensor& u) {
  switch (u.scalar_type()) {
    case at::kFloat: return ScanDtype::kFloat32;
    case at::kHalf: return ScanDtype::kFloat16;
    case at::kBFloat16: return ScanDtype::kBFloat16;
    default: TORCH_CHECK(false, "u must be float32, float16 or bfloat16, got ", u.scalar_type());
  }
  return ScanDtype::kFloat32;
}

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                  const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                  const std::optional<at::Tensor>& z,
                  const std::optional<at::Tensor>& delta_bias) {
  TORCH_CHECK(u.is_cuda() && u.dim() == 3 && u.is_contiguous(),
              "u must be a contiguous CUDA tensor [b, D, L]");
  const auto dt = u.scalar_type();
  scan_dtype(u);
  TORCH_CHECK(delta.sizes() == u.sizes() && delta.scalar_type() == dt && delta.is_contiguous(),
              "delta must match u (shape, dtype, contiguous)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.scalar_type() == at::kFloat &&
                  A.is_contiguous(),
              "A must be a contiguous float32 [D, N]");
  TORCH_CHECK(B.dim() == 4 && B.size(0) == u.size(0) && B.size(2) == A.size(1) &&
                  B.size(3) == u.size(2) && B.scalar_type() == dt && B.is_contiguous(),
              "B must be a contiguous [b, G, N, L] of u's dtype");
  TORCH_CHECK(C.sizes() == B.sizes() && C.scalar_type() == dt && C.is_contiguous(),
              "C must match B");
  TORCH_CHECK(B.size(1) >= 1 && u.size(1) % B.size(1) == 0, "groups must divide D");
  TORCH_CHECK(u.size(0) <= 65535, "batch size over 65535 is not supported");
  TORCH_CHECK(A.size(1) * 4 <= 48 * 1024, "state size N too large");
  for (const auto* t : {&D, &delta_bias}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == u.size(1) &&
                      (*t)->scalar_type() == at::kFloat && (*t)->is_contiguous(),
                  "D / delta_bias must be contiguous float32 [D]");
    }
  }
  if (z.has_value()) {
    TORCH_CHECK(z->sizes() == u.sizes() && z->scalar_type() == dt && z->is_contiguous(),
                "z must match u");
  }
}

ScanParams make_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C,
                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, bool softplus) {
  ScanParams p{};
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.seqlen = u.size(2);
  p.dstate = A.size(1);
  p.ngroups = B.size(1);
  p.dim_per_group = p.dim / p.ngroups;
  p.nchunks = (p.seqlen + kChunk - 1) / kChunk;
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.z = z.has_value() ? z->data_ptr() : nullptr;
  p.A = A.data_ptr<float>();
  p.D = D.has_value() ? D->data_ptr<float>() : nullptr;
  p.delta_bias = delta_bias.has_value() ? delta_bias->data_ptr<float>() : nullptr;
  p.softplus = softplus;
  return p;
}

}  // namespace

// Returns {out [b, D, L], last_state [b, D, N] fp32, carries [b, D, n_chunks, N] fp32}.
std::vector<at::Tensor> selective_scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias);
  const c10::cuda::CUDAGuard guard(u.device());
  ScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  auto f32 = u.options().dtype(at::kFloat);
  at::Tensor out = at::empty_like(u);
  at::Tensor last = at::empty({p.batch, p.dim, p.dstate}, f32);
  at::Tensor carries = at::empty({p.batch, p.dim, p.nchunks, p.dstate}, f32);
  p.out = out.data_ptr();
  p.last_state = last.data_ptr<float>();
  p.carries = carries.data_ptr<float>();
  C10_CUDA_CHECK(launch_selective_scan_fwd(p, scan_dtype(u), c10::cuda::getCurrentCUDAStream()));
  return {out, last, carries};
}

// Returns {du, ddelta, dz (empty without z) in u's dtype; fp32 partials the caller reduces
// (deterministic, no atomics): dA [b, D, N], dB, dC [b, G, tiles, N, L], dD, ddelta_bias [b, D]}.
std::vector<at::Tensor> selective_scan_bwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus, const at::Tensor& carries,
    const at::Tensor& dout, const std::optional<at::Tensor>& dlast) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias);
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.scalar_type() == u.scalar_type() &&
                  dout.is_contiguous(),
              "dout must match u");
  const c10::cuda::CUDAGuard guard(u.device());
  ScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, delta_softplus);
  TORCH_CHECK(carries.dim() == 4 && carries.size(0) == p.batch && carries.size(1) == p.dim &&
                  carries.size(2) == p.nchunks && carries.size(3) == p.dstate &&
                  carries.scalar_type() == at::kFloat && carries.is_contiguous(),
              "carries must be the forward's [b, D, n_chunks, N] float32");
  if (dlast.has_value()) {
    TORCH_CHECK(dlast->dim() == 3 && dlast->size(0) == p.batch && dlast->size(1) == p.dim &&
                    dlast->size(2) == p.dstate && dlast->scalar_type() == at::kFloat &&
                    dlast->is_contiguous(),
                "dlast must be a contiguous float32 [b, D, N]");
  }
  // Channel tiles: enough blocks to fill the GPU (~4 per SM), few enough that the per-tile
  // dB/dC slices stay small, accumulators within the shared-memory budget.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, u.get_device()));
  const int64_t DG = std::max<int64_t>(p.dim_per_group, 1);
  const int64_t rows = std::max<int64_t>(p.batch * p.ngroups, 1);
  // the dB/dC partials take 2 * 4 bytes * b*G*N*L per tile of a group: at most ~2 GiB
  const int64_t per_tile = std::max<int64_t>(8 * rows * p.dstate * p.seqlen, 1);
  const int64_t by_memory = std::max<int64_t>(1, (int64_t{1} << 31) / per_tile);
  const int64_t want = std::min<int64_t>(
      {std::max<int64_t>(1, (4 * sms + rows - 1) / rows), DG, by_memory});
  int64_t tile = (DG + want - 1) / want;
  const int64_t tile_max =
      std::max<int64_t>(1, kBwdSmemBytes / static_cast<int64_t>((2 * p.dstate + 2) * 4));
  tile = std::max<int64_t>(1, std::min(tile, tile_max));
  p.tile = tile;
  p.tiles_per_group = (DG + tile - 1) / tile;

  auto f32 = u.options().dtype(at::kFloat);
  at::Tensor du = at::empty_like(u), ddelta = at::empty_like(u);
  at::Tensor dz = z.has_value() ? at::empty_like(u) : at::empty({0}, u.options());
  at::Tensor dA = at::empty({p.batch, p.dim, p.dstate}, f32);
  at::Tensor dD = at::empty({p.batch, p.dim}, f32), ddb = at::empty({p.batch, p.dim}, f32);
  at::Tensor dBp = at::empty({p.batch, p.ngroups, p.tiles_per_group, p.dstate, p.seqlen}, f32);
  at::Tensor dCp = at::empty_like(dBp);
  p.dout = dout.data_ptr();
  p.dlast = dlast.has_value() ? dlast->data_ptr<float>() : nullptr;
  p.carries = carries.data_ptr<float>();
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dz = z.has_value() ? dz.data_ptr() : nullptr;
  p.dA_part = dA.data_ptr<float>();
  p.dD_part = dD.data_ptr<float>();
  p.ddb_part = ddb.data_ptr<float>();
  p.dB_part = dBp.data_ptr<float>();
  p.dC_part = dCp.data_ptr<float>();
  C10_CUDA_CHECK(launch_selective_scan_bwd(p, scan_dtype(u), c10::cuda::getCurrentCUDAStream()));
  return {du, ddelta, dz, dA, dBp, dCp, dD, ddb};
}

}  // namespace lops_ssm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightning_ops Mamba-1 selective scan (CUDA)";
  m.def("fwd", &lops_ssm::selective_scan_fwd, "selective scan forward");
  m.def("bwd", &lops_ssm::selective_scan_bwd, "selective scan backward");
  m.attr("CHUNK") = lops_ssm::kChunk;
}
