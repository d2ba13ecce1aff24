// Torch binding and launcher of the dual-side sparse MoE kernels (moe_dual_sparse_sm80.cuh):
// the CUDA implementation of samoyeds::moe_sparse_prepacked (schema defined in samoyeds_vllm/ops/library.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "moe_dual_sparse_sm80.cuh"
#include "moe_wgmma_sp_sm90.cuh"

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

// The kernels move activations, values and metadata with 16-byte loads and copies: their base addresses must
// be 16-byte aligned (row strides are multiples of 64 bytes). Weights come from ops.prepare_moe_weights (fresh
// allocations); an activation view at an odd offset is copied.
bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }
at::Tensor contiguous_aligned(const at::Tensor& x) {
  at::Tensor c = x.contiguous();
  return aligned16(c) ? c : c.clone();
}
// The routing inputs both ops hand to dispatch_tiles, in the layout the kernels read.
struct RoutingInputs {
  at::Tensor x, ids, map;  // contiguous (x 16-byte aligned), int32 expert map or undefined
  const at::Tensor* map_ptr;
  double pairs_per_expert;  // T * k / E_global (pairs a local expert gets on average): picks the token tile
  RoutingInputs(const at::Tensor& x_in, const at::Tensor& topk_ids, const std::optional<at::Tensor>& expert_map,
                int64_t num_experts)
      : x(contiguous_aligned(x_in)),
        ids(topk_ids.contiguous()),
        map(expert_map ? expert_map->to(at::kInt).contiguous() : at::Tensor()),
        map_ptr(expert_map ? &map : nullptr),
        pairs_per_expert(static_cast<double>(x_in.size(0)) * topk_ids.size(1) /
                         (expert_map ? expert_map->size(0) : num_experts)) {}
  RoutingInputs(const RoutingInputs&) = delete;  // map_ptr points into this object
  RoutingInputs& operator=(const RoutingInputs&) = delete;
};

// Calls f with a tag whose ::type is the CUDA element type of x (bf16 or fp16; the ops check which).
template <typename T>
struct TypeTag {
  using type = T;
};
template <typename F>
void with_activation_type(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kBFloat16) {
    f(TypeTag<__nv_bfloat16>{});
  } else {
    f(TypeTag<__half>{});
  }
}

#define SAMOYEDS_CHECK_ALIGNED(op, t, name) \
  TORCH_CHECK(aligned16(t), "samoyeds::", op, ": ", name, " must be 16-byte aligned (prepare_moe_weights allocates it so)")

// Arguments shared by both GEMM kernels (see moe_dual_sparse_sm80.cuh for units and layouts).
struct GemmArgs {
  const void* act;
  const void* values;
  const void* meta;
  const uint8_t* rowsel;
  const int32_t* sorted_pairs;
  const int32_t* tile_expert;
  const int32_t* num_tiles;
  const float* topk_weights;
  void* out;
  int K, num_mtiles, chunk_shift, topk, out_ld, num_pairs, max_tiles;
};

// Kernel configurations. Only these are instantiated (compile time), all measured on H100/H200:
//   split-K kernel  (BN = 8, K >= 2048): 8 warps split K within the CTA, KB = 4 k-steps per load batch.
//   pipelined kernel (BN = 8 with short K, BN = 16, 32, 64): one m-tile per warp (two in the 64-token 2:4 w2),
//       a cp.async ring of KB-k-step stages (PipeConfig), long-K w2 GEMMs split over grid.z.
//   wgmma.sp kernel (moe_wgmma_sp_sm90.cuh; capability 9.0, BN = 32, 48, 64, 128): from 16 pairs per expert.
// The token tile BN = 8 * NT (8, 16, 32, 64; 48 and 128 for wgmma.sp) is chosen in dispatch_tiles.
constexpr int kSplitKWarps = 8, kSplitKBlock = 4;
constexpr int kSplitKMinSteps = 64;  // below 64 k-steps (K < 2048) 8 warps would idle: use the pipelined kernel

// Tuning overrides read once per process (documented in samoyeds_vllm/envs.py); 0 = automatic.
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v != '\0') ? std::atoi(v) : fallback;
}
// A device attribute, asked once per device (the launch path runs for every MoE layer call).
template <cudaDeviceAttr ATTR>
int device_attribute(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  const bool cached = device >= 0 && device < static_cast<int>(cache.size());
  int value = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    cudaDeviceGetAttribute(&value, ATTR, device);
    if (cached) cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}
int sm_count(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device); }
int forced_token_tile() {
  static const int v = env_int("SAMOYEDS_TOKEN_TILE", 0);
  return v;
}
// Pipelined-kernel configuration per pattern, from two H200 sweeps (warps x k-steps per stage x stages; bf16,
// Mixtral-8x7B and Qwen3-30B-A3B shapes at 8-512 tokens; docs/PERFORMANCE.md):
//   2:4        8 warps x KB 2 x 4 stages: 8 m-tiles share each token stage (half the token traffic per weight
//              byte of 4 warps), 16 warps per SM. 4x2x4, 8x4x3 and 8x2x5 were within 3.5% at 8-64 tokens and
//              6-19% slower at 128 (Mixtral).
//   1:2:V+2:4  4 warps x KB 4 x 2 stages: 54 KB per CTA, four CTAs (16 warps) per SM. Occupancy beat depth:
//              at 32-128 tokens (Mixtral) 7-29% faster than 4x4x3 (two CTAs per SM), 4x2x4 and 8x2x4; at
//              32-64 tokens (another run) 11-16% faster than 8x4x2 and 19-23% faster than 4x2x2.
//   dense      (fusion control, moe_dense_prepacked) 4 warps x KB 2 x 4 stages: twice the weight bytes per
//              stage of 2:4; not tuned beyond fitting two CTAs per SM.
// Tuning sweeps override the shapes at build time (SAMOYEDS_EXTRA_NVCC_FLAGS, samoyeds_vllm/envs.py) as three
// digits warps|k-steps per stage|stages, e.g. -DSAMOYEDS_PIPE_24=424 -DSAMOYEDS_PIPE_SAMOYEDS=443.
#ifndef SAMOYEDS_PIPE_24
#define SAMOYEDS_PIPE_24 824
#endif
#ifndef SAMOYEDS_PIPE_SAMOYEDS
#define SAMOYEDS_PIPE_SAMOYEDS 442
#endif
template <int CODE>
struct PipeShape {
  static constexpr int kWarps = CODE / 100, kBlock = CODE / 10 % 10, kStages = CODE % 10;
};
template <bool SAMOYEDS, bool DENSE = false>
using PipeConfig = PipeShape<DENSE ? 424 : (SAMOYEDS ? SAMOYEDS_PIPE_SAMOYEDS : SAMOYEDS_PIPE_24)>;

// Lets Kernel use smem bytes of dynamic shared memory (above the 48 KB default): once per kernel, before any
// CUDA-graph capture.
template <auto Kernel>
void reserve_dynamic_smem(int smem, const char* what) {
  static const cudaError_t configured = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  TORCH_CHECK(configured == cudaSuccess, "samoyeds MoE kernels: cannot reserve ", smem,
              " bytes of shared memory for ", what, ": ", cudaGetErrorString(configured));
}

template <typename T, int G, int NT, bool SAMOYEDS, bool DENSE>
void launch_pipelined(const GemmArgs& a, int splits, cudaStream_t stream, const char* what) {
  using C = PipeConfig<SAMOYEDS, DENSE>;
  constexpr auto kernel = moe_mma_sp_pipelined_kernel<T, G, NT, C::kWarps, C::kBlock, C::kStages, SAMOYEDS, DENSE>;
  constexpr int smem = pipelined_smem_bytes<T, G, NT, C::kWarps, C::kBlock, C::kStages, SAMOYEDS, DENSE>();
  reserve_dynamic_smem<kernel>(smem, what);
  constexpr int mtiles_per_cta = C::kWarps * (kernel_streams<G, NT, SAMOYEDS, DENSE>() / G);  // w2: 2 per warp
  const dim3 grid(a.max_tiles, (a.num_mtiles + mtiles_per_cta - 1) / mtiles_per_cta, splits);
  kernel<<<grid, C::kWarps * 32, smem, stream>>>(static_cast<const T*>(a.act), static_cast<const uint4*>(a.values),
                                                 static_cast<const uint32_t*>(a.meta), a.rowsel, a.sorted_pairs,
                                                 a.tile_expert, a.num_tiles, a.topk_weights, a.out, a.K,
                                                 a.num_mtiles, a.chunk_shift, a.topk, a.out_ld, a.num_pairs);
}

template <typename T, int G, int NT, bool SAMOYEDS, bool DENSE>
void launch_gemm(const GemmArgs& a, bool pipelined, int splits, cudaStream_t stream, const char* what) {
  if (pipelined) {
    launch_pipelined<T, G, NT, SAMOYEDS, DENSE>(a, splits, stream, what);
  } else {
    if constexpr (NT == 1 && !DENSE) {
      moe_mma_sp_kernel<T, G, 1, kSplitKWarps, kSplitKBlock, SAMOYEDS>
          <<<dim3(a.max_tiles, a.num_mtiles), kSplitKWarps * 32, 0, stream>>>(
              static_cast<const T*>(a.act), static_cast<const uint4*>(a.values),
              static_cast<const uint32_t*>(a.meta), a.rowsel, a.sorted_pairs, a.tile_expert, a.num_tiles,
              a.topk_weights, a.out, a.K, a.num_mtiles, a.chunk_shift, a.topk, a.out_ld, a.num_pairs);
    }
  }
  SAMOYEDS_CHECK_LAUNCH(what);
}

// Token tiles per raster block of the wgmma.sp work items (WgWork::at): as many as keep their token rows
// (tile_bytes each) within a share of L2 (SAMOYEDS_WG_RASTER_KB, default a third of the device's L2; 0 = one
// block of all tiles).
int wg_tile_block(long long tile_bytes, int device) {
  static const int kb = env_int("SAMOYEDS_WG_RASTER_KB", -1);
  if (kb == 0) return 1 << 30;
  const long long budget =
      kb > 0 ? static_cast<long long>(kb) << 10 : device_attribute<cudaDevAttrL2CacheSize>(device) / 3;
  return static_cast<int>(std::max(1LL, std::min(budget / std::max(tile_bytes, 1LL), 1LL << 30)));
}

// Hopper path (moe_wgmma_sp_sm90.cuh): a persistent grid of WgTile::kCtasPerSm CTAs per SM (at most one per work
// item) over the (token tile, WgTile::kAWarps m-tiles, K split) work items.
template <typename T, int G, bool SAMOYEDS, bool EXPAND, int BN>
void launch_wgmma(const GemmArgs& a, int splits, int device, cudaStream_t stream, const char* what) {
  using Tile = WgTile<SAMOYEDS, EXPAND, BN>;
  constexpr auto kernel = moe_wgmma_sp_kernel<T, G, SAMOYEDS, EXPAND, BN>;
  constexpr int smem = WgSmem<T, G, SAMOYEDS, EXPAND, BN>::bytes();
  reserve_dynamic_smem<kernel>(smem, what);
  const WgWork work{(a.num_mtiles + Tile::kAWarps - 1) / Tile::kAWarps, splits,
                    wg_tile_block(static_cast<long long>(Tile::kBN) * a.K * sizeof(T), device)};
  const long long items = static_cast<long long>(a.max_tiles) * work.mgroups * work.splits;  // >= the real count
  const long long slots = static_cast<long long>(sm_count(device)) * Tile::kCtasPerSm;
  const int grid = static_cast<int>(std::min(items, slots));
  kernel<<<grid, Tile::kThreads, smem, stream>>>(static_cast<const T*>(a.act), static_cast<const uint4*>(a.values),
                                                 static_cast<const uint32_t*>(a.meta), a.rowsel, a.sorted_pairs,
                                                 a.tile_expert, a.num_tiles, a.topk_weights, a.out, a.K, a.num_mtiles,
                                                 a.chunk_shift, a.topk, a.out_ld, a.num_pairs, work);
  SAMOYEDS_CHECK_LAUNCH(what);
}

// The wgmma path (capability 9.0; the JIT build targets sm_90a there) takes the calls where an expert gets
// >= kWgmmaMinPairs pairs on average (2:4 and 1:2:V+2:4 with V >= 128), 1:2:V+2:4 with V < 128 from
// kWgmmaMinPairsShortChunks; wg_token_tile picks the token tile. H200 crossovers (benchmarks/results/
// kernel_tuning_*.json, runs 23-25; wgmma_crossover_*.json for the 128-token 2:4 tiles): at 16 pairs per expert
// the 32-token tiles beat mma.sp on Mixtral-8x7B (2:4 399 vs 429 us, 1:2:128+2:4 237-256 vs 254 us) and are within
// 2% elsewhere (Qwen3-30B-A3B, OLMoE); at 8 mma.sp is 2-10% faster. 1:2:32+2:4 at 32 pairs per expert was equal or
// 6% slower on wgmma.sp (64-token tiles). 1:2:32+2:4 runs with its row pairs expanded in registers (EXPAND): V = 32
// starts a chunk at every k-step, where the accumulator banks drain the wgmma pipeline (EXPAND 3-9% faster at
// 256-8192 tokens; with V = 128 20-40% slower, and at decode slower for every V).
// SAMOYEDS_WGMMA (samoyeds_vllm/envs.py): 1 (default) by that rule, 0 never, 2 for every call (tests);
// SAMOYEDS_WG_EXPAND: 1 (default) for V = 32, 0 never, 2 for every 1:2:V+2:4 call on the wgmma path (tests).
constexpr double kWgmmaMinPairs = 16.0, kWgmmaMinPairsShortChunks = 64.0;
enum class WgPath { kNone, kBanks, kExpand };
WgPath wgmma_path(double pairs_per_expert, int chunk, int device) {
  static const int mode = env_int("SAMOYEDS_WGMMA", 1), expand = env_int("SAMOYEDS_WG_EXPAND", 1);
  if (mode == 0) return WgPath::kNone;
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major != 9 || minor != 0) return WgPath::kNone;
  const bool samoyeds = chunk != 0;
  const double min_pairs = (samoyeds && chunk < 128) ? kWgmmaMinPairsShortChunks : kWgmmaMinPairs;
  if (mode == 1 && pairs_per_expert < min_pairs) return WgPath::kNone;
  return (samoyeds && (expand == 2 || (expand == 1 && chunk == 32))) ? WgPath::kExpand : WgPath::kBanks;
}

// Token tile of the wgmma path (2:4, and 1:2:V+2:4 with accumulator banks) by the pairs p an expert gets on
// average: 32 while p + 2 sd (of a Poisson count) fits, then 48; beyond, 1:2:V+2:4 64 and 2:4 64 below 64 pairs,
// 128 from there. Narrower tiles issue narrower wgmmas (m64nBNk32) and hold fewer accumulators (1:2:V+2:4: two
// banks of BN / 2 per group and thread; below 64 tokens ptxas no longer serialises its w13 wgmmas). H200
// (kernel_tuning_*.json, runs 23-25), at p = 32 the 48-token tiles beat 32 and 64 on all three shapes: 2:4 Mixtral-
// 8x7B 128 tokens 410 vs 458 / 413 us (mma.sp 464), 1:2:128+2:4 260 vs 283 / 289 us; at p = 64 2:4 on 128-token tiles
// beat 64 by 7-10%, and 1:2:128+2:4 on 64-token tiles beat 48 on OLMoE by 5% (Mixtral -2%).
// SAMOYEDS_WG_TOKEN_TILE=32|48|64 forces one (tests, tuning).
int wg_token_tile(double pairs_per_expert, bool samoyeds) {
  static const int forced = env_int("SAMOYEDS_WG_TOKEN_TILE", 0);
  if (forced == 32 || forced == 48 || forced == 64) return forced;
  const double busy = pairs_per_expert + 2.0 * std::sqrt(pairs_per_expert);
  if (busy <= 32.0) return 32;
  if (busy <= 48.0) return 48;
  return (samoyeds || pairs_per_expert < 64.0) ? 64 : 128;
}

// DENSE: the fusion control (moe_dense_prepacked): dense kernel-layout weights, no metadata (w13_meta and
// w2_meta are not read), always the pipelined kernel. WGMMA: both GEMMs on the Hopper path (BN = 8 NT; EXPAND: 64),
// with the 1:2:V+2:4 row pairs expanded in registers if EXPAND.
template <typename T, int NT, bool SAMOYEDS, bool DENSE, bool WGMMA = false, bool EXPAND = false>
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
  const int chunk_shift = SAMOYEDS ? __builtin_ctz(static_cast<unsigned>(chunk / 32)) : 0;  // V = 32 << shift
  // Each tile holds >= 1 pair and each expert wastes < 1 tile: tiles <= min(pairs, pairs / BN + E).
  const int max_tiles = std::max(1, std::min(num_pairs, (num_pairs + BN - 1) / BN + num_experts));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto i32 = x.options().dtype(at::kInt);

  const bool pipelined13 = DENSE || NT > 1 || hidden / 32 < kSplitKMinSteps;
  const bool pipelined2 = DENSE || NT > 1 || inter / 32 < kSplitKMinSteps;
  // w2 K splits (pipelined and wgmma.sp kernels): ~16 CTAs (wgmma.sp: work items) per SM in total (wgmma.sp: ~2
  // per persistent CTA), >= 64 k-steps per split, at most 8.
  constexpr int kWgBN = WGMMA ? BN : 0;  // (WgTile takes no mma.sp tiles)
  using Wg = WgTile<SAMOYEDS, EXPAND, kWgBN>;
  static_assert(!WGMMA || !DENSE, "the wgmma path runs sparse weights");
  static_assert(!EXPAND || (WGMMA && SAMOYEDS), "EXPAND: 1:2:V+2:4 on the wgmma path");
  int splits = 1;
  if (pipelined2) {
    using C = PipeConfig<SAMOYEDS, DENSE>;
    const int kb = WGMMA ? kWgKB : C::kBlock;
    const int mtiles_per_cta = WGMMA ? Wg::kAWarps : C::kWarps * kernel_streams<1, NT, SAMOYEDS, DENSE>();
    const int ctas_per_sm = WGMMA ? 2 * Wg::kCtasPerSm : 16;
    const int total_blk = (inter / 32 + kb - 1) / kb;
    const int ctas = max_tiles * ((mt2 + mtiles_per_cta - 1) / mtiles_per_cta);
    const int sms = sm_count(x.get_device());
    splits = std::max(1, std::min({8, total_blk * kb / 64, (ctas_per_sm * sms + ctas - 1) / ctas}));
  }

  at::Tensor pair_expert = at::empty({std::max(num_pairs, 1)}, i32);
  at::Tensor sorted_pairs = at::empty({max_tiles * BN}, i32);
  at::Tensor tile_expert = at::empty({max_tiles}, i32);
  at::Tensor num_tiles = at::empty({1}, i32);
  at::Tensor intermediate = at::empty({max_tiles * BN, inter}, x.options());
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

  GemmArgs a13{x.data_ptr(), w13_values.data_ptr(), DENSE ? nullptr : w13_meta.data_ptr(),
               w13_rowsel ? w13_rowsel->data_ptr<uint8_t>() : nullptr, sorted_pairs.data_ptr<int32_t>(),
               tile_expert.data_ptr<int32_t>(), num_tiles.data_ptr<int32_t>(), nullptr, intermediate.data_ptr(),
               hidden, mt13, chunk_shift, topk, inter, num_pairs, max_tiles};
  if constexpr (WGMMA) {
    launch_wgmma<T, 2, SAMOYEDS, EXPAND, kWgBN>(a13, 1, x.get_device(), stream, "w13 GEMM + SwiGLU (wgmma)");
  } else {
    launch_gemm<T, 2, NT, SAMOYEDS, DENSE>(a13, pipelined13, 1, stream, "w13 GEMM + SwiGLU");
  }
  GemmArgs a2{intermediate.data_ptr(), w2_values.data_ptr(), DENSE ? nullptr : w2_meta.data_ptr(),
              w2_rowsel ? w2_rowsel->data_ptr<uint8_t>() : nullptr, sorted_pairs.data_ptr<int32_t>(),
              tile_expert.data_ptr<int32_t>(), num_tiles.data_ptr<int32_t>(), weights.data_ptr<float>(),
              slot_out.data_ptr(), inter, mt2, chunk_shift, topk, hidden, num_pairs, max_tiles};
  if constexpr (WGMMA) {
    launch_wgmma<T, 1, SAMOYEDS, EXPAND, kWgBN>(a2, splits, x.get_device(), stream, "w2 GEMM + routing weight (wgmma)");
  } else {
    launch_gemm<T, 1, NT, SAMOYEDS, DENSE>(a2, pipelined2, splits, stream, "w2 GEMM + routing weight");
  }

  const long long work = static_cast<long long>(num_tokens) * (hidden / 8);
  const int threads = 256;
  moe_combine_kernel<T><<<static_cast<unsigned>((work + threads - 1) / threads), threads, 0, stream>>>(
      slot_out.data_ptr<float>(), pair_expert.data_ptr<int32_t>(), reinterpret_cast<T*>(out.data_ptr()), num_tokens,
      topk, hidden, splits);
  SAMOYEDS_CHECK_LAUNCH("moe_combine_kernel");
}

template <typename T, bool SAMOYEDS, bool DENSE = false>
void dispatch_tiles(const RoutingInputs& r, const at::Tensor& topk_weights, const at::Tensor& w13_values,
                    const at::Tensor& w13_meta, const at::Tensor* w13_rowsel, const at::Tensor& w2_values,
                    const at::Tensor& w2_meta, const at::Tensor* w2_rowsel, int chunk, at::Tensor& out) {
  const double pairs_per_expert = r.pairs_per_expert;
  // Token tile by the average pairs per expert p. BN = 8 (split-K decode kernel) below 4; BN = 16 up to 10,
  // although the busiest experts then overflow into a second tile; BN = 32 while the busiest expert (mean + 3
  // sd of a Poisson count) fits, else the wide tile. Wider tiles skip their empty n-tiles at run time, but an
  // expert that overflows a tile reads all of its weights again. The 4 and 10 come from an H200 sweep of forced
  // tiles (SAMOYEDS_TOKEN_TILE) on Mixtral-8x7B, Qwen3-30B-A3B and OLMoE shapes, 2:4 and 1:2:128+2:4: at p = 4
  // BN = 16 beat 8 by 3-11%; at p = 8 BN = 16 beat 32 by 1-9%; at p = 12 OLMoE lost 10-14% with 16.
  const double sd = std::sqrt(pairs_per_expert);
  const double busiest = pairs_per_expert + 3.0 * sd;
  auto run = [&](auto nt) {
    launch_moe<T, decltype(nt)::value, SAMOYEDS, DENSE>(r.x, topk_weights, r.ids, w13_values, w13_meta, w13_rowsel,
                                                 w2_values, w2_meta, w2_rowsel, chunk, r.map_ptr, out);
  };
  // Wide tiles: 64 tokens for 2:4. 1:2:V+2:4 stays at 32 and lets the busiest experts overflow into a second
  // tile: its two accumulator banks make 64-token tiles need ~250 registers, and the alternatives measured
  // slower at 128 tokens on Mixtral (H200): 48-token tiles (168 registers, three CTAs per SM) by 6%, two warps
  // per m-tile splitting a 64-token tile by 26%, the gate and the up rows of an m-tile on two warps (64-token
  // tiles, cac1df2) by 29%.
  auto run_wide = [&] {
    if constexpr (SAMOYEDS) {
      run(std::integral_constant<int, 4>{});
    } else {
      run(std::integral_constant<int, 8>{});
    }
  };
  const int forced = forced_token_tile();
  if constexpr (!DENSE) {
    const bool tile_forced = forced == 8 || forced == 16 || forced == 32 || forced == 64;
    const WgPath path = tile_forced ? WgPath::kNone : wgmma_path(pairs_per_expert, chunk, r.x.get_device());
    if constexpr (SAMOYEDS) {
      if (path == WgPath::kExpand) {
        launch_moe<T, WgTile<true, true>::kBN / 8, true, false, true, true>(
            r.x, topk_weights, r.ids, w13_values, w13_meta, w13_rowsel, w2_values, w2_meta, w2_rowsel, chunk,
            r.map_ptr, out);
        return;
      }
    }
    if (path != WgPath::kNone) {
      auto run_wg = [&](auto nt) {
        launch_moe<T, decltype(nt)::value, SAMOYEDS, DENSE, true>(r.x, topk_weights, r.ids, w13_values, w13_meta,
                                                                 w13_rowsel, w2_values, w2_meta, w2_rowsel, chunk,
                                                                 r.map_ptr, out);
      };
      const int bn = wg_token_tile(pairs_per_expert, SAMOYEDS);
      if (bn == 32) run_wg(std::integral_constant<int, 4>{});
      if (bn == 48) run_wg(std::integral_constant<int, 6>{});
      if (bn == 64) run_wg(std::integral_constant<int, 8>{});
      if constexpr (!SAMOYEDS) {
        if (bn == 128) run_wg(std::integral_constant<int, 16>{});
      }
      return;
    }
  }
  if (forced == 8 || forced == 16 || forced == 32 || forced == 64) {
    if (forced == 8) run(std::integral_constant<int, 1>{});
    if (forced == 16) run(std::integral_constant<int, 2>{});
    if (forced == 32) run(std::integral_constant<int, 4>{});
    if (forced == 64) run_wide();
  } else if (pairs_per_expert < 4.0) {
    run(std::integral_constant<int, 1>{});
  } else if (pairs_per_expert <= 10.0) {
    run(std::integral_constant<int, 2>{});
  } else if (busiest <= 32.0) {
    run(std::integral_constant<int, 4>{});
  } else {
    run_wide();
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
    SAMOYEDS_CHECK_ALIGNED("moe_sparse_prepacked", *w13_rowsel, "w13_rowsel");  // 4-byte copies (wgmma.sp)
    SAMOYEDS_CHECK_ALIGNED("moe_sparse_prepacked", *w2_rowsel, "w2_rowsel");
  }
  SAMOYEDS_CHECK_ALIGNED("moe_sparse_prepacked", w13_values, "w13_values");
  SAMOYEDS_CHECK_ALIGNED("moe_sparse_prepacked", w13_meta, "w13_meta");
  SAMOYEDS_CHECK_ALIGNED("moe_sparse_prepacked", w2_values, "w2_values");
  SAMOYEDS_CHECK_ALIGNED("moe_sparse_prepacked", w2_meta, "w2_meta");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.size(0) == 0) return out;
  const RoutingInputs r(x, topk_ids, expert_map, w13_values.size(0));
  const at::Tensor* rs13 = w13_rowsel ? &*w13_rowsel : nullptr;
  const at::Tensor* rs2 = w2_rowsel ? &*w2_rowsel : nullptr;
  const int c = static_cast<int>(chunk);
  with_activation_type(x, [&](auto type) {
    using T = typename decltype(type)::type;
    if (samoyeds)
      dispatch_tiles<T, true>(r, topk_weights, w13_values, w13_meta, rs13, w2_values, w2_meta, rs2, c, out);
    else
      dispatch_tiles<T, false>(r, topk_weights, w13_values, w13_meta, rs13, w2_values, w2_meta, rs2, c, out);
  });
  return out;
}

// Fusion control: the same four launches on dense weights (samoyeds::moe_dense_prepacked), so benchmarks can
// separate what sparsity buys from what the fused, gathered, routing-aware pipeline buys.
at::Tensor moe_dense_prepacked_cuda(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                    const at::Tensor& w13_values, const at::Tensor& w2_values,
                                    const std::optional<at::Tensor>& expert_map) {
  SAMOYEDS_CHECK_CUDA_TENSOR(x, "x");
  TORCH_CHECK(topk_ids.is_cuda(), "samoyeds::moe_dense_prepacked: topk_ids must be a CUDA tensor");
  SAMOYEDS_CHECK_CUDA_TENSOR(w13_values, "w13_values");
  SAMOYEDS_CHECK_CUDA_TENSOR(w2_values, "w2_values");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "samoyeds::moe_dense_prepacked: the CUDA kernel takes bf16 or fp16 activations, got ", x.scalar_type());
  SAMOYEDS_CHECK_ALIGNED("moe_dense_prepacked", w13_values, "w13_values");
  SAMOYEDS_CHECK_ALIGNED("moe_dense_prepacked", w2_values, "w2_values");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  if (x.size(0) == 0) return out;
  const RoutingInputs r(x, topk_ids, expert_map, w13_values.size(0));
  // The metadata arguments are not read on the dense path (see launch_moe).
  with_activation_type(x, [&](auto type) {
    using T = typename decltype(type)::type;
    dispatch_tiles<T, false, true>(r, topk_weights, w13_values, w13_values, nullptr, w2_values, w2_values, nullptr, 0,
                                   out);
  });
  return out;
}

}  // namespace
}  // namespace samoyeds

TORCH_LIBRARY_IMPL(samoyeds, CUDA, m) {
  m.impl("moe_sparse_prepacked", &samoyeds::moe_sparse_prepacked_cuda);
  m.impl("moe_dense_prepacked", &samoyeds::moe_dense_prepacked_cuda);
}
