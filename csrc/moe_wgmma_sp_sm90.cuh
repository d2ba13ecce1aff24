// Hopper (sm_90a) grouped sparse MoE GEMM with wgmma.mma_async.sp: the prefill-size path.
//
// Same job, operands and epilogues as moe_mma_sp_pipelined_kernel (moe_dual_sparse_sm80.cuh), for token tiles
// of 64: one warpgroup (4 warps) per CTA computes 64 stored rows (4 m-tiles, one per warp) of its G groups for
// 64 tokens with one m64n64k32 sparse wgmma per (group, k-step) instead of 4 warps x 8 n-tiles of mma.sp:
//   A (weights)  from registers ("RS" form): the sm80 kernel-layout fragment of each warp's m-tile is exactly
//                the per-warp A fragment of wgmma.sp (and its metadata register is the mma.sp one, selector 0);
//                it moves global -> shared (cp.async ring) -> registers like in the sm80 kernel.
//   B (tokens)   from shared memory through a matrix descriptor: gathered by cp.async (16 B per copy) into the
//                K-major, no-swizzle canonical layout of 8x8 core matrices (128 contiguous bytes, 8 token
//                rows x 16 B of K): core matrix (8-token group j, k-chunk c) at j * SBO + c * 128 bytes.
//   C/D          f32 in registers; per warp d[4j + r] is the mma.sync m16n8 fragment of n-tile j, so the
//                store_epilogue of the sm80 kernel applies unchanged.
// Per k-block of KB k-steps: wait for the ring slot, fence.proxy.async (cp.async writes are generic-proxy
// writes that wgmma reads through the async proxy), load A and metadata of the block into registers,
// wgmma.fence, issue the block's wgmmas, commit, wait for them.
// 2:4 only. 1:2:V+2:4 keeps two accumulator banks (128 f32 registers per thread at 64 tokens); with the block's
// A fragments in registers on top, ptxas serialises the wgmmas (C7511, insufficient registers) and spills, so
// that pattern needs A from shared memory (the "SS" form) first. Not yet here either: TMA weight loads, warp
// specialisation, a persistent grid (docs/HOPPER_PREFILL_NOTES.md has the plan).
#pragma once

#include "moe_dual_sparse_sm80.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SAMOYEDS_HAS_WGMMA 1
#endif

namespace samoyeds {

// d += A_sparse(64x32 per warpgroup, this warp's 16 rows in a) * B(32x64 from b_desc); f32 accumulate.
template <typename T>
__device__ __forceinline__ void wgmma_sp_m64n64k32(float (&d)[32], const uint4& a, uint64_t b_desc, uint32_t meta);

template <>
__device__ __forceinline__ void wgmma_sp_m64n64k32<__nv_bfloat16>(float (&d)[32], const uint4& a, uint64_t b_desc,
                                                       uint32_t meta) {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile(
      "wgmma.mma_async.sp.sync.aligned.m64n64k32.f32.bf16.bf16 "
      "{" 
      "%0,%1,%2,%3,%4,%5,%6,%7,"
      "%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,"
      "%24,%25,%26,%27,%28,%29,%30,%31"
      "}, {%32,%33,%34,%35}, %36, %37, 0, 1, 1, 1, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
        "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(b_desc), "r"(meta));
#endif
}

template <>
__device__ __forceinline__ void wgmma_sp_m64n64k32<__half>(float (&d)[32], const uint4& a, uint64_t b_desc,
                                                       uint32_t meta) {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile(
      "wgmma.mma_async.sp.sync.aligned.m64n64k32.f32.f16.f16 "
      "{" 
      "%0,%1,%2,%3,%4,%5,%6,%7,"
      "%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,"
      "%24,%25,%26,%27,%28,%29,%30,%31"
      "}, {%32,%33,%34,%35}, %36, %37, 0, 1, 1, 1, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
        "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
        "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(b_desc), "r"(meta));
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait_all() {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// Make this thread's completed generic-proxy (cp.async) writes to shared memory visible to the async proxy.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Shared-memory matrix descriptor, no swizzle: start address, leading (K-direction core-matrix) byte offset,
// stride (M/N-direction 8-row group) byte offset, each in units of 16 bytes.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32);
}

// Token tile of the wgmma kernel: 64 tokens; ring of STAGES stages of KB k-steps.
constexpr int kWgBN = 64, kWgKB = 4, kWgStages = 3, kWgWarps = 4;

template <typename T, int G>
struct WgSmem {
  static constexpr int kKBlk = 32 * kWgKB;                              // k per stage
  static constexpr uint32_t kAWarp = kWgKB * G * 32 * 16;               // A vectors of one warp and stage
  static constexpr uint32_t kMWarp = kWgKB * G * 16 * 4;                // metadata of one warp and stage
  static constexpr uint32_t kAStage = kWgWarps * kAWarp, kMStage = kWgWarps * kMWarp;
  static constexpr uint32_t kSbo = (kKBlk / 8) * 128;                   // bytes between 8-token groups
  static constexpr uint32_t kBStage = (kWgBN / 8) * kSbo;               // = 64 tokens x kKBlk x 2 bytes
  static constexpr uint32_t kMOff = kWgStages * kAStage, kBOff = kMOff + kWgStages * kMStage;
  static constexpr int bytes() { return static_cast<int>(kBOff + kWgStages * kBStage); }
};

template <typename T, int G>
__global__ void __launch_bounds__(kWgWarps * 32)
moe_wgmma_sp_kernel(const T* __restrict__ act, const uint4* __restrict__ kvalues, const uint32_t* __restrict__ kmeta,
                    const int32_t* __restrict__ sorted_pairs,
                    const int32_t* __restrict__ tile_expert, const int32_t* __restrict__ num_tiles,
                    const float* __restrict__ topk_weights, void* __restrict__ out, int K, int num_mtiles, int topk,
                    int out_ld, int num_pairs) {  // G=1: slot_out [gridDim.z, pairs, H]
#if defined(SAMOYEDS_HAS_WGMMA)
  using L = WgSmem<T, G>;
  constexpr int NT = kWgBN / 8, KB = kWgKB, STAGES = kWgStages, THREADS = kWgWarps * 32;
  constexpr int KBLK = L::kKBlk, CPR = KBLK / 8;  // 16-byte chunks per token row and stage
  constexpr int TOKEN_COPIES = kWgBN * CPR / THREADS;
  static_assert(kWgBN * CPR % THREADS == 0 && CPR % 2 == 0 && THREADS == 8 * CPR, "token copy mapping");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ const T* rows[kWgBN];
  const int tile = blockIdx.x;
  if (tile >= *num_tiles) return;  // uniform across the CTA
  const int expert = tile_expert[tile];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int mt = blockIdx.y * kWgWarps + warp;
  // wgmma is warpgroup-wide: a warp past the last m-tile still runs it (on clamped, valid weights) and skips
  // only its stores.
  const bool active = mt < num_mtiles;
  const int mt_load = active ? mt : num_mtiles - 1;
  const int S = K >> 5;
  const int total_blk = (S + KB - 1) / KB;
  const int blk_begin = static_cast<int>(static_cast<long long>(total_blk) * blockIdx.z / gridDim.z);
  const int blk_end = static_cast<int>(static_cast<long long>(total_blk) * (blockIdx.z + 1) / gridDim.z);
  const int nblk = blk_end - blk_begin;
  bool valid = false;
  if (threadIdx.x < kWgBN) {
    const int r = tile * kWgBN + threadIdx.x;
    const int pair = sorted_pairs[r];
    const long long src = (G == 2) ? static_cast<long long>(pair / topk) : static_cast<long long>(r);
    valid = pair >= 0;
    rows[threadIdx.x] = valid ? act + src * K : nullptr;
  }
  const int nt_active = (__syncthreads_count(valid) + 7) >> 3;
  const int load_rows = nt_active * 8;

  const uint32_t smem = smem_addr(smem_raw);
  const uint32_t a_sm = smem + warp * L::kAWarp + lane * 16;
  const uint32_t m_sm_w = smem + L::kMOff + warp * L::kMWarp + (lane & 3) * 16;
  const uint32_t m_sm_r = smem + L::kMOff + warp * L::kMWarp + (2 * g + (t & 1)) * 4;
  // Token copies: thread -> (row r8 of every 8-token group, k-chunk c): two neighbouring threads copy the two
  // 16-byte halves of one 32-byte sector of a token row; copy i covers token group i.
  const int r8 = (threadIdx.x >> 1) & 7, tok_chunk = (threadIdx.x & 1) + 2 * (threadIdx.x >> 4);
  const int tok_col = tok_chunk * 8;
  const uint32_t b_sm_w = smem + L::kBOff + tok_chunk * 128 + r8 * 16;
  const T* tok_src[TOKEN_COPIES];
  bool tok_ok[TOKEN_COPIES];
#pragma unroll
  for (int i = 0; i < TOKEN_COPIES; ++i) {
    const int row = 8 * i + r8;
    tok_ok[i] = row < load_rows && rows[row] != nullptr;
    tok_src[i] = (tok_ok[i] ? rows[row] : act) + tok_col;
  }
  const long long tile_base = (static_cast<long long>(expert) * num_mtiles + mt_load) * G;
  const uint4* a_grp[G];
  const uint4* m_grp[G];
#pragma unroll
  for (int gr = 0; gr < G; ++gr) {
    a_grp[gr] = kvalues + (tile_base + gr) * S * 32 + lane;
    m_grp[gr] = reinterpret_cast<const uint4*>(kmeta + (tile_base + gr) * S * 16) + (lane & 3);
  }
  const bool meta_lane = lane < 4;

  auto load_stage = [&](int local, int st) {
    const int blk = blk_begin + local;
    const bool k_ok = blk * KBLK + tok_col < K;
#pragma unroll
    for (int i = 0; i < TOKEN_COPIES; ++i)
      cp_async_16(b_sm_w + st * L::kBStage + i * L::kSbo, tok_src[i] + blk * KBLK, k_ok && tok_ok[i]);
    const int s0 = blk * KB;
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) {
      const bool in_k = s0 + kk < S;
#pragma unroll
      for (int gr = 0; gr < G; ++gr) {
        cp_async_16(a_sm + st * L::kAStage + (kk * G + gr) * 512, a_grp[gr] + (s0 + kk) * 32, in_k);
        cp_async_16(m_sm_w + st * L::kMStage + (kk * G + gr) * 64, m_grp[gr] + (s0 + kk) * 4, in_k && meta_lane);
      }
    }
    cp_async_commit();
  };

  float acc[1][G][NT][4];
  float* flat = &acc[0][0][0][0];
#pragma unroll
  for (int i = 0; i < G * NT * 4; ++i) flat[i] = 0.f;

#pragma unroll
  for (int p = 0; p < STAGES - 1; ++p) {
    if (p < nblk) {
      load_stage(p, p);
    } else {
      cp_async_commit();
    }
  }
  int st = 0, st_load = STAGES - 1;
  for (int blk = 0; blk < nblk; ++blk) {
    cp_async_wait<STAGES - 2>();
    fence_proxy_async_shared();  // this thread's landed token rows, visible to the wgmma (async proxy)
    __syncthreads();
    if (blk + STAGES - 1 < nblk) {
      load_stage(blk + STAGES - 1, st_load);
    } else {
      cp_async_commit();
    }
    st_load = st_load + 1 == STAGES ? 0 : st_load + 1;
    const uint32_t a_st = a_sm + st * L::kAStage, m_st = m_sm_r + st * L::kMStage;
    const uint32_t b_st = smem + L::kBOff + st * L::kBStage;
    const int s0 = (blk_begin + blk) * KB;
    // A and metadata of the whole block in registers first: wgmma reads A registers asynchronously, and a
    // metadata load between the wgmmas of a stage would make ptxas serialise them.
    uint4 a[KB][G];
    uint32_t meta[KB][G];
#pragma unroll
    for (int kk = 0; kk < KB; ++kk)
#pragma unroll
      for (int gr = 0; gr < G; ++gr) {
        a[kk][gr] = lds_128(a_st + (kk * G + gr) * 512);
        meta[kk][gr] = lds_32(m_st + (kk * G + gr) * 64);
      }
    wgmma_fence();
    auto issue_step = [&](int kk) {
#pragma unroll
      for (int gr = 0; gr < G; ++gr)
        wgmma_sp_m64n64k32<T>(reinterpret_cast<float(&)[32]>(acc[0][gr][0][0]), a[kk][gr],
                              smem_desc(b_st + kk * 4 * 128, 128, L::kSbo), meta[kk][gr]);
    };
    if (s0 + KB <= S) {  // a whole block: one straight run of wgmmas
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) issue_step(kk);
    } else {  // the last block of a K that is not a multiple of 32 * KB
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) {
        if (s0 + kk >= S) break;  // uniform
        issue_step(kk);
      }
    }
    wgmma_commit();
    wgmma_wait_all();
    st = st + 1 == STAGES ? 0 : st + 1;
  }
  cp_async_wait<0>();
  void* dst = (G == 1) ? static_cast<void*>(static_cast<float*>(out) + static_cast<long long>(blockIdx.z) * num_pairs * out_ld)
                       : out;
  const bool state[G][2] = {};  // (bank bookkeeping of 1:2:V+2:4; unused for 2:4)
  if (active)
    store_epilogue<T, G, NT, false>(acc, state, nt_active, tile * kWgBN, mt, g, t, sorted_pairs, topk_weights, dst,
                                    out_ld);
#endif
}

}  // namespace samoyeds
