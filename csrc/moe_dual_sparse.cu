// Torch binding and launcher of the dual-side sparse MoE kernels (moe_dual_sparse_sm80.cuh):
// the CUDA implementation of samoyeds::moe_sparse_prepacked (schema defined in samoyeds_vllm/ops/library.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "moe_dual_sparse_sm80.cuh"

namespace samoyeds {
namespace {

#define SAMOYEDS_CHECK_CUDA_TENSOR(t, name)                                                        \
  TORCH_CHECK((t).is_cuda(), "samoyeds::moe_sparse_prepacked: ", name, " must be a CUDA tensor"); \
  TORCH_CHECK((t).is_contiguous(), "samoyeds::moe_sparse_prepacked: ", name, " must be contiguous")

#define SAMOYEDS_CHECK_LAUNCH(kernel)                                                                     \
  do {                                                                                                     \
    const cudaError_t err = cudaGetLastError();                                                            \
    TORCH_CHECK(err == cudaSuccess, "samoyeds::moe_sparse_prepacked: launch of ", kernel, " failed: ",      \
                cudaGetErrorString(err));                                                                  \
  } while (0)

// Tile configurations. Only these are instantiated (compile time). The token tile BN = 8 * NT is the
// smallest that holds an expert's pairs in one tile with high probability (mean + 2 standard deviations
// of a Poisson count), since every extra tile re-reads the expert's weights:
//   BN = 8:   split-K kernel, WARPS=8 warps split K, KB=4 k-steps per load batch  (decode)
//   BN = 16, 32: pipelined M-split kernel, 4 warps x 1 m-tile each, 5-stage cp.async ring of KB=2 k-steps
//                (<= 69 KB dynamic shared memory: two CTAs per SM, 8 blocks of weights in flight per CTA)
template <typename T, int NT, int WARPS, int KB, bool SAMOYEDS, bool MSPLIT, int STAGES = 5>
void launch_moe(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                const at::Tensor& w13_values, const at::Tensor& w13_meta, const at::Tensor* w13_rowsel,
                const at::Tensor& w2_values, const at::Tensor& w2_meta, const at::Tensor* w2_rowsel, int chunk,
                const at::Tensor* expert_map, at::Tensor& out) {
  constexpr int BN = NT * 8;
  const int num_tokens = x.size(0), hidden = x.size(1), topk = topk_ids.size(1);
  const int num_pairs = num_tokens * topk;
  const int num_experts = w13_values.size(0);
  const int mt13 = w13_values.size(1), mt2 = w2_values.size(1);
  const int inter = w2_values.size(3) * 32;
  const int chunk_steps = SAMOYEDS ? chunk / 32 : 1;
  // Each tile holds >= 1 pair and each expert wastes < 1 tile: tiles <= min(pairs, pairs / BN + E).
  const int max_tiles = std::max(1, std::min(num_pairs, (num_pairs + BN - 1) / BN + num_experts));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto i32 = x.options().dtype(at::kInt);

  at::Tensor pair_expert = at::empty({std::max(num_pairs, 1)}, i32);
  at::Tensor sorted_pairs = at::empty({max_tiles * BN}, i32);
  at::Tensor tile_expert = at::empty({max_tiles}, i32);
  at::Tensor num_tiles = at::empty({1}, i32);
  at::Tensor intermediate = at::empty({max_tiles * BN, inter}, x.options());
  // w2 K splits (pipelined kernel only): enough CTAs to fill the GPU ~8 times over, >= 32 k-blocks each.
  int splits = 1;
  if constexpr (MSPLIT) {
    const int total_blk = (inter / 32 + KB - 1) / KB;
    const int ctas = max_tiles * ((mt2 + WARPS - 1) / WARPS);
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device());
    splits = std::max(1, std::min({8, total_blk / 32, (16 * sms + ctas - 1) / ctas}));
  }
  at::Tensor slot_out = at::empty({splits, std::max(num_pairs, 1), hidden}, x.options().dtype(at::kFloat));
  at::Tensor weights = topk_weights.to(at::kFloat).contiguous();

  const int32_t* map_ptr = expert_map ? expert_map->data_ptr<int32_t>() : nullptr;
  const int map_len = expert_map ? expert_map->size(0) : 0;
  const size_t prep_smem = (3 * num_experts + 1) * sizeof(int);
  if (topk_ids.scalar_type() == at::kLong) {
    moe_prepare_kernel<int64_t><<<1, 1024, prep_smem, stream>>>(
        topk_ids.data_ptr<int64_t>(), num_pairs, map_ptr, map_len, num_experts, BN, max_tiles,
        pair_expert.data_ptr<int32_t>(), sorted_pairs.data_ptr<int32_t>(), tile_expert.data_ptr<int32_t>(),
        num_tiles.data_ptr<int32_t>());
  } else {
    moe_prepare_kernel<int32_t><<<1, 1024, prep_smem, stream>>>(
        topk_ids.data_ptr<int32_t>(), num_pairs, map_ptr, map_len, num_experts, BN, max_tiles,
        pair_expert.data_ptr<int32_t>(), sorted_pairs.data_ptr<int32_t>(), tile_expert.data_ptr<int32_t>(),
        num_tiles.data_ptr<int32_t>());
  }
  SAMOYEDS_CHECK_LAUNCH("moe_prepare_kernel");

  const T* x_ptr = reinterpret_cast<const T*>(x.data_ptr());
  T* inter_ptr = reinterpret_cast<T*>(intermediate.data_ptr());
  float* slot_ptr = slot_out.data_ptr<float>();
  const uint8_t* rs13 = w13_rowsel ? w13_rowsel->data_ptr<uint8_t>() : nullptr;
  const uint8_t* rs2 = w2_rowsel ? w2_rowsel->data_ptr<uint8_t>() : nullptr;

  using Kernel = void (*)(const T*, const uint4*, const uint32_t*, const uint8_t*, const int32_t*,
                          const int32_t*, const int32_t*, const float*, void*, int, int, int, int, int, int);
  Kernel w13_kernel, w2_kernel;  // instantiate only the selected family
  int smem13 = 0, smem2 = 0;
  if constexpr (MSPLIT) {
    w13_kernel = moe_mma_sp_pipelined_kernel<T, 2, NT, WARPS, KB, STAGES, SAMOYEDS>;
    w2_kernel = moe_mma_sp_pipelined_kernel<T, 1, NT, WARPS, KB, STAGES, SAMOYEDS>;
    smem13 = pipelined_smem_bytes<T, 2, NT, WARPS, KB, STAGES>();
    smem2 = pipelined_smem_bytes<T, 1, NT, WARPS, KB, STAGES>();
    static const bool configured = [&] {  // once per instantiation, before any graph capture
      cudaFuncSetAttribute(w13_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem13);
      cudaFuncSetAttribute(w2_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem2);
      return true;
    }();
    (void)configured;
  } else {
    w13_kernel = moe_mma_sp_kernel<T, 2, NT, WARPS, KB, SAMOYEDS>;
    w2_kernel = moe_mma_sp_kernel<T, 1, NT, WARPS, KB, SAMOYEDS>;
  }
  const int grid13 = MSPLIT ? (mt13 + WARPS - 1) / WARPS : mt13;
  const int grid2 = MSPLIT ? (mt2 + WARPS - 1) / WARPS : mt2;
  w13_kernel<<<dim3(max_tiles, grid13), WARPS * 32, smem13, stream>>>(
      x_ptr, reinterpret_cast<const uint4*>(w13_values.data_ptr()),
      reinterpret_cast<const uint32_t*>(w13_meta.data_ptr()), rs13, sorted_pairs.data_ptr<int32_t>(),
      tile_expert.data_ptr<int32_t>(), num_tiles.data_ptr<int32_t>(), nullptr, inter_ptr, hidden, mt13,
      chunk_steps, topk, inter, num_pairs);
  SAMOYEDS_CHECK_LAUNCH("moe_mma_sp_kernel<w13+SwiGLU>");

  w2_kernel<<<dim3(max_tiles, grid2, splits), WARPS * 32, smem2, stream>>>(
      inter_ptr, reinterpret_cast<const uint4*>(w2_values.data_ptr()),
      reinterpret_cast<const uint32_t*>(w2_meta.data_ptr()), rs2, sorted_pairs.data_ptr<int32_t>(),
      tile_expert.data_ptr<int32_t>(), num_tiles.data_ptr<int32_t>(), weights.data_ptr<float>(), slot_ptr, inter,
      mt2, chunk_steps, topk, hidden, num_pairs);
  SAMOYEDS_CHECK_LAUNCH("moe_mma_sp_kernel<w2+routing>");

  if (num_tokens > 0) {
    const long long work = static_cast<long long>(num_tokens) * (hidden / 8);
    const int threads = 256;
    moe_combine_kernel<T><<<static_cast<unsigned>((work + threads - 1) / threads), threads, 0, stream>>>(
        slot_ptr, pair_expert.data_ptr<int32_t>(), reinterpret_cast<T*>(out.data_ptr()), num_tokens, topk,
        hidden, splits);
    SAMOYEDS_CHECK_LAUNCH("moe_combine_kernel");
  }
}

template <typename T, bool SAMOYEDS>
void dispatch_tiles(double pairs_per_expert, const at::Tensor& x, const at::Tensor& topk_weights,
                    const at::Tensor& topk_ids, const at::Tensor& w13_values, const at::Tensor& w13_meta,
                    const at::Tensor* w13_rowsel, const at::Tensor& w2_values, const at::Tensor& w2_meta,
                    const at::Tensor* w2_rowsel, int chunk, const at::Tensor* expert_map, at::Tensor& out) {
  const double likely_max = pairs_per_expert + 2.0 * std::sqrt(pairs_per_expert);
  if (likely_max <= 8.0) {
    launch_moe<T, 1, 8, 4, SAMOYEDS, false>(x, topk_weights, topk_ids, w13_values, w13_meta, w13_rowsel,
                                            w2_values, w2_meta, w2_rowsel, chunk, expert_map, out);
  } else if (likely_max <= 16.0) {
    launch_moe<T, 2, 4, 2, SAMOYEDS, true>(x, topk_weights, topk_ids, w13_values, w13_meta, w13_rowsel,
                                           w2_values, w2_meta, w2_rowsel, chunk, expert_map, out);
  } else {
    launch_moe<T, 4, 4, 2, SAMOYEDS, true>(x, topk_weights, topk_ids, w13_values, w13_meta, w13_rowsel,
                                           w2_values, w2_meta, w2_rowsel, chunk, expert_map, out);
  }
}

at::Tensor moe_sparse_prepacked_cuda(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                     const at::Tensor& w13_values, const at::Tensor& w13_meta,
                                     const std::optional<at::Tensor>& w13_rowsel, const at::Tensor& w2_values,
                                     const at::Tensor& w2_meta, const std::optional<at::Tensor>& w2_rowsel,
                                     int64_t chunk, const std::optional<at::Tensor>& expert_map) {
  // Shapes and dtypes were checked by the Python op wrapper's shared check (same as the fake); here only
  // what the kernel itself relies on.
  SAMOYEDS_CHECK_CUDA_TENSOR(x, "x");
  TORCH_CHECK(topk_ids.is_cuda(), "samoyeds::moe_sparse_prepacked: topk_ids must be a CUDA tensor");
  SAMOYEDS_CHECK_CUDA_TENSOR(w13_values, "w13_values");
  SAMOYEDS_CHECK_CUDA_TENSOR(w13_meta, "w13_meta");
  SAMOYEDS_CHECK_CUDA_TENSOR(w2_values, "w2_values");
  SAMOYEDS_CHECK_CUDA_TENSOR(w2_meta, "w2_meta");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "samoyeds::moe_sparse_prepacked: the CUDA kernel takes bf16 or fp16 activations, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(1) % 32 == 0, "samoyeds::moe_sparse_prepacked: H must be a multiple of 32, got ", x.size(1));
  const bool samoyeds = chunk != 0;
  TORCH_CHECK(samoyeds == w13_rowsel.has_value() && samoyeds == w2_rowsel.has_value(),
              "samoyeds::moe_sparse_prepacked: rowsel tensors must be given exactly when chunk != 0");
  if (samoyeds) {
    SAMOYEDS_CHECK_CUDA_TENSOR(*w13_rowsel, "w13_rowsel");
    SAMOYEDS_CHECK_CUDA_TENSOR(*w2_rowsel, "w2_rowsel");
  }
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.size(0) == 0) return out;
  const at::Tensor xc = x.contiguous();
  const at::Tensor ids = topk_ids.contiguous();
  const at::Tensor* rs13 = w13_rowsel ? &*w13_rowsel : nullptr;
  const at::Tensor* rs2 = w2_rowsel ? &*w2_rowsel : nullptr;
  at::Tensor map;
  if (expert_map) map = expert_map->to(at::kInt).contiguous();
  const at::Tensor* map_ptr = expert_map ? &map : nullptr;
  const double pairs_per_expert = static_cast<double>(x.size(0)) * topk_ids.size(1) / w13_values.size(0);
  const int c = static_cast<int>(chunk);
  if (x.scalar_type() == at::kBFloat16) {
    if (samoyeds)
      dispatch_tiles<__nv_bfloat16, true>(pairs_per_expert, xc, topk_weights, ids, w13_values, w13_meta, rs13,
                                          w2_values, w2_meta, rs2, c, map_ptr, out);
    else
      dispatch_tiles<__nv_bfloat16, false>(pairs_per_expert, xc, topk_weights, ids, w13_values, w13_meta,
                                           rs13, w2_values, w2_meta, rs2, c, map_ptr, out);
  } else {
    if (samoyeds)
      dispatch_tiles<__half, true>(pairs_per_expert, xc, topk_weights, ids, w13_values, w13_meta, rs13,
                                   w2_values, w2_meta, rs2, c, map_ptr, out);
    else
      dispatch_tiles<__half, false>(pairs_per_expert, xc, topk_weights, ids, w13_values, w13_meta, rs13,
                                    w2_values, w2_meta, rs2, c, map_ptr, out);
  }
  return out;
}

}  // namespace
}  // namespace samoyeds

TORCH_LIBRARY_IMPL(samoyeds, CUDA, m) { m.impl("moe_sparse_prepacked", &samoyeds::moe_sparse_prepacked_cuda); }
