// Hopper (sm_90a) grouped sparse MoE GEMM with wgmma.mma_async.sp, for prefill-size token tiles (2:4).
//
// Same job, operands and epilogues as moe_mma_sp_pipelined_kernel (moe_dual_sparse_sm80.cuh). A CTA is two
// warpgroups stacked along M: 128 stored rows (8 m-tiles, one per warp) of its G groups x 128 tokens, one
// m64n128k32 sparse wgmma per (warpgroup, group, k-step):
//   A (weights)  from registers ("RS" form): the sm80 kernel-layout fragment of each warp's m-tile is exactly
//                the per-warp A fragment of wgmma.sp, and its metadata register is the mma.sp one (selector 0);
//                it moves global -> shared (cp.async ring) -> registers as in the sm80 kernel.
//   B (tokens)   from shared memory through a matrix descriptor: gathered by cp.async (16 B per copy) into the
//                K-major 128-byte-swizzled layout (a token row's 64 k of a slot = one 128-byte row of an 8-row,
//                1024-byte atom; eight threads copy one row, i.e. one whole 128-byte line). The no-swizzle
//                core-matrix layout (LBO 128, SBO between 8-token groups; commit cb67ef8) is correct too but
//                made the w13 kernel 1.8x slower on an H200 (4x the L2 requests).
//   C/D          f32 in registers; per warp d[4j + r] is the mma.sync m16n8 fragment of n-tile j, so the
//                store_epilogue of the sm80 kernel applies unchanged.
// Per k-block of KB k-steps: wait for the ring slot, fence.proxy.async (cp.async writes are generic-proxy writes
// that wgmma reads through the async proxy), barrier, refill the slot retired two blocks ago, load the block's
// A and metadata into registers, wgmma.fence, issue, commit, wait_group 1 (the block stays in flight while the
// next one is prepared).
// 1:2:V+2:4 (SAMOYEDS) runs one warpgroup x 64 tokens: two accumulator banks of 64 tokens for gate and up take
// 128 registers (220 in all). The row-pair banks are swapped as in the sm80 kernel (select_banks) at chunk starts,
// after wgmma.wait_group 0 and before a wgmma.fence; in w2 in place (one asm statement per pair), which keeps
// ptxas from serialising its wgmmas. ptxas serialises the w13 wgmmas (C7511: registers): the w13 form it does not
// serialise (in-place swap, one A register set, token rows re-read from shared memory; 255 registers) measured
// 5-13% slower on an H200 (docs/HOPPER_PREFILL_NOTES.md, section 8).
#pragma once

#include <type_traits>

#include "moe_dual_sparse_sm80.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SAMOYEDS_HAS_WGMMA 1
#endif

namespace samoyeds {

// d[N/2] += A (64 x 32 logical, 2:4-compressed; this warp's 16 rows from registers) * B (32 x N tokens, K-major,
// through the shared-memory descriptor); f32 accumulate, sparsity selector 0. N = 128 (2:4 tiles) and N = 64
// (1:2:V+2:4 tiles). One asm template; the accumulator operands come in blocks of 32 (registers %0-%31, %32-%63).
#define SAMOYEDS_ACC_REGS_0                                                                                           \
  "%0,%1,%2,%3,%4,%5,%6,%7,"                                                                                          \
  "%8,%9,%10,%11,%12,%13,%14,%15,"                                                                                    \
  "%16,%17,%18,%19,%20,%21,%22,%23,"                                                                                  \
  "%24,%25,%26,%27,%28,%29,%30,%31"
#define SAMOYEDS_ACC_OPS_0                                                                                            \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),                                                                     \
  "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                                                                     \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),                                                                   \
  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),                                                                 \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),                                                                 \
  "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),                                                                 \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),                                                                 \
  "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define SAMOYEDS_ACC_REGS_32                                                                                          \
  "%32,%33,%34,%35,%36,%37,%38,%39,"                                                                                  \
  "%40,%41,%42,%43,%44,%45,%46,%47,"                                                                                  \
  "%48,%49,%50,%51,%52,%53,%54,%55,"                                                                                  \
  "%56,%57,%58,%59,%60,%61,%62,%63"
#define SAMOYEDS_ACC_OPS_32                                                                                           \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),                                                                 \
  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),                                                                 \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),                                                                 \
  "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),                                                                 \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]),                                                                 \
  "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),                                                                 \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),                                                                 \
  "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define SAMOYEDS_WGMMA_SP_ASM(SHAPE, PTX_TYPE, REGS, TAIL, ...)                                                       \
  asm volatile("wgmma.mma_async.sp.sync.aligned." SHAPE ".f32." PTX_TYPE "." PTX_TYPE " {" REGS "}, " TAIL            \
               : __VA_ARGS__                                                                                          \
               : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(desc), "r"(meta))

template <typename T, int N>
__device__ __forceinline__ void wgmma_sp(float (&d)[N / 2], const uint4& a, uint64_t desc, uint32_t meta) {
  static_assert(N == 64 || N == 128, "the kernels use m64n64k32 and m64n128k32");
#if defined(SAMOYEDS_HAS_WGMMA)
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (N == 64 && kBf16) {
    SAMOYEDS_WGMMA_SP_ASM("m64n64k32", "bf16", SAMOYEDS_ACC_REGS_0, "{%32,%33,%34,%35}, %36, %37, 0, 1, 1, 1, 0;\n",
                          SAMOYEDS_ACC_OPS_0);
  } else if constexpr (N == 64) {
    SAMOYEDS_WGMMA_SP_ASM("m64n64k32", "f16", SAMOYEDS_ACC_REGS_0, "{%32,%33,%34,%35}, %36, %37, 0, 1, 1, 1, 0;\n",
                          SAMOYEDS_ACC_OPS_0);
  } else if constexpr (kBf16) {
    SAMOYEDS_WGMMA_SP_ASM("m64n128k32", "bf16", SAMOYEDS_ACC_REGS_0 "," SAMOYEDS_ACC_REGS_32,
                          "{%64,%65,%66,%67}, %68, %69, 0, 1, 1, 1, 0;\n", SAMOYEDS_ACC_OPS_0, SAMOYEDS_ACC_OPS_32);
  } else {
    SAMOYEDS_WGMMA_SP_ASM("m64n128k32", "f16", SAMOYEDS_ACC_REGS_0 "," SAMOYEDS_ACC_REGS_32,
                          "{%64,%65,%66,%67}, %68, %69, 0, 1, 1, 1, 0;\n", SAMOYEDS_ACC_OPS_0, SAMOYEDS_ACC_OPS_32);
  }
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
// Wait until at most N committed wgmma groups of this warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Make this thread's completed generic-proxy (cp.async) writes to shared memory visible to the async proxy.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Shared-memory matrix descriptor, no swizzle: start address, leading (K-direction core-matrix) byte offset,
// stride (M/N-direction 8-row group) byte offset, each in units of 16 bytes (PTX ISA, matrix descriptor; on an
// H200 the swapped roles gave garbage, these pass every test).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32);
}

// Descriptor of k-step kk of a 128-byte-swizzled token slot at addr: k-step kk starts kk * 64 bytes into each
// 128-byte row (the hardware applies the XOR on the address bits), layout type 1 (128B), LBO unused (encoded
// 1), SBO = one 8-row atom.
__device__ __forceinline__ uint64_t token_desc(uint32_t addr, int kk, uint32_t sbo) {
  return smem_desc(addr + kk * 64, 16, sbo) | (1ull << 62);
}

// Tiles of the wgmma kernel (WgTile): WGS warpgroups stacked along M (each 64 stored rows = 4 m-tiles, one per
// warp) x BN tokens; a ring of STAGES slots of kWgKB = 2 k-steps (64 k: one 128-byte swizzled row per token and
// slot).
//   2:4        BN 128, 2 warpgroups, SAMOYEDS_WG_STAGES (5) slots: prefill-size calls.
//   1:2:V+2:4  BN 64, SAMOYEDS_WG_SAM = warpgroups x 10 + slots (14: one warpgroup, 4 slots, two CTAs per SM):
//              two accumulator banks of 64 tokens per group (220 registers in w13); 128-token tiles with gate and
//              up on two warpgroups fit (199 registers) but measured mostly slower.
//              H200 sweep at 128-8192 tokens (kernel_tuning_*.json): 4 and 5 slots within run-to-run noise, 3
//              slots 4-25% slower, 6 slots 0-11% slower, two warpgroups (one CTA per SM) 6-25% slower.
#ifndef SAMOYEDS_WG_STAGES
#define SAMOYEDS_WG_STAGES 5
#endif
#ifndef SAMOYEDS_WG_SAM
#define SAMOYEDS_WG_SAM 14
#endif
constexpr int kWgKB = 2;
template <bool SAMOYEDS>
struct WgTile {
  static constexpr int kBN = SAMOYEDS ? 64 : 128;
  static constexpr int kGroups = SAMOYEDS ? SAMOYEDS_WG_SAM / 10 : 2;
  static constexpr int kWarps = 4 * kGroups;
  static constexpr int kStages = SAMOYEDS ? SAMOYEDS_WG_SAM % 10 : SAMOYEDS_WG_STAGES;
  static_assert(kStages >= 3, "a slot is refilled two blocks after its wgmmas were issued");
};

// Ring slot layout (bytes): weights [warp][group][k-step][lane] x 16, metadata [warp][group][k-step][16] x 4,
// tokens: 8-token group j at j * kSbo, one 1024-byte 128B-swizzle atom.
template <typename T, int G, bool SAMOYEDS>
struct WgSmem {
  using Tile = WgTile<SAMOYEDS>;
  static constexpr int kKBlk = 32 * kWgKB;
  static constexpr uint32_t kAWarp = kWgKB * G * 512, kMWarp = kWgKB * G * 64;
  static constexpr uint32_t kAStage = Tile::kWarps * kAWarp, kMStage = Tile::kWarps * kMWarp;
  static constexpr uint32_t kSbo = 8 * 128;
  static constexpr uint32_t kBStage = (Tile::kBN / 8) * kSbo;
  static constexpr uint32_t kMOff = Tile::kStages * kAStage, kBOff = kMOff + Tile::kStages * kMStage;
  static constexpr int bytes() { return static_cast<int>(kBOff + Tile::kStages * kBStage) + 1024; }  // + alignment
};

template <typename T, int G, bool SAMOYEDS>
__global__ void __launch_bounds__(WgTile<SAMOYEDS>::kWarps * 32, 1)
moe_wgmma_sp_kernel(const T* __restrict__ act, const uint4* __restrict__ kvalues, const uint32_t* __restrict__ kmeta,
                    const uint8_t* __restrict__ rowsel, const int32_t* __restrict__ sorted_pairs,
                    const int32_t* __restrict__ tile_expert, const int32_t* __restrict__ num_tiles,
                    const float* __restrict__ topk_weights, void* __restrict__ out, int K, int num_mtiles,
                    int chunk_shift, int topk, int out_ld, int num_pairs) {  // G=1: slot_out [gridDim.z, pairs, H]
#if defined(SAMOYEDS_HAS_WGMMA)
  using L = WgSmem<T, G, SAMOYEDS>;
  using Tile = WgTile<SAMOYEDS>;
  constexpr int BN = Tile::kBN, WARPS = Tile::kWarps;
  constexpr int NT = BN / 8, KB = kWgKB, STAGES = Tile::kStages, THREADS = WARPS * 32;
  constexpr int BANKS = SAMOYEDS ? 2 : 1;
  constexpr int KBLK = L::kKBlk;
  constexpr int GROUPS_PER_PASS = THREADS / 64;  // 8 threads per token row, 8 rows per 8-token group
  constexpr int TOKEN_COPIES = NT / GROUPS_PER_PASS;
  static_assert(KBLK * sizeof(T) == 128 && NT % GROUPS_PER_PASS == 0, "a slot holds one 128-byte row per token");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ const T* rows[BN];
  const int tile = blockIdx.x;
  if (tile >= *num_tiles) return;  // uniform across the CTA
  const int expert = tile_expert[tile];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int mt = blockIdx.y * WARPS + warp;
  // wgmma is warpgroup-wide: a warp past the last m-tile still runs it (on clamped, valid weights) and skips
  // only its stores.
  const bool active = mt < num_mtiles;
  const int mt_load = active ? mt : num_mtiles - 1;
  const int S = K >> 5;
  const int2 blk_range = k_split_blocks((S + KB - 1) / KB);
  const int blk_begin = blk_range.x;
  const int nblk = blk_range.y - blk_begin;
  const int nt_active = gather_tile_rows<T, BN, G>(act, sorted_pairs, tile, topk, K, rows);
  const int load_rows = nt_active * 8;

  const uint32_t smem = (smem_addr(smem_raw) + 1023) & ~1023u;  // swizzle atoms are 1024-byte aligned
  const uint32_t a_sm = smem + warp * L::kAWarp + lane * 16;
  const uint32_t m_sm_w = smem + L::kMOff + warp * L::kMWarp + (lane & 3) * 16;
  const uint32_t m_sm_r = smem + L::kMOff + warp * L::kMWarp + (2 * g + (t & 1)) * 4;
  const int tid = threadIdx.x;
  // 128-byte swizzle: a token row's KBLK = 64 values are one 128-byte row of an 8-row atom (1024 bytes, 8-token
  // group j at j * kSbo), its 16-byte chunk c stored at chunk c ^ (row % 8). Eight neighbouring threads copy one
  // row (a whole 128-byte line of global memory, one contiguous 128 bytes of shared memory); copy i moves
  // GROUPS_PER_PASS groups on.
  const int tok_chunk = tid & 7, r8 = (tid >> 3) & 7, grp0 = tid >> 6;
  const uint32_t b_sm_w = smem + L::kBOff + grp0 * L::kSbo + r8 * 128 + ((tok_chunk ^ r8) << 4);
  const int tok_col = tok_chunk * 8;
  const T* tok_src[TOKEN_COPIES];
  bool tok_ok[TOKEN_COPIES];
#pragma unroll
  for (int i = 0; i < TOKEN_COPIES; ++i) {
    const int row = 8 * (grp0 + i * GROUPS_PER_PASS) + r8;
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

  auto load_slot = [&](int local, int slot) {
    const int blk = blk_begin + local;
    const bool k_ok = blk * KBLK + tok_col < K;
#pragma unroll
    for (int i = 0; i < TOKEN_COPIES; ++i)
      cp_async_16(b_sm_w + slot * L::kBStage + i * GROUPS_PER_PASS * L::kSbo, tok_src[i] + blk * KBLK,
                  k_ok && tok_ok[i]);
    const int s0 = blk * KB;
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) {
      const bool in_k = s0 + kk < S;
#pragma unroll
      for (int gr = 0; gr < G; ++gr) {
        cp_async_16(a_sm + slot * L::kAStage + (gr * KB + kk) * 512, a_grp[gr] + (s0 + kk) * 32, in_k);
        cp_async_16(m_sm_w + slot * L::kMStage + (gr * KB + kk) * 64, m_grp[gr] + (s0 + kk) * 4, in_k && lane < 4);
      }
    }
    cp_async_commit();
  };

  float acc[BANKS][G][NT][4];
  float* flat = &acc[0][0][0][0];
#pragma unroll
  for (int i = 0; i < BANKS * G * NT * 4; ++i) flat[i] = 0.f;

  // 1:2:V+2:4 row pairs (select_banks): the bank state and the row selections of the next chunk.
  bool state[G][2] = {};
  const int run_begin = blk_begin * KB, run_end = min(blk_range.y * KB, S);
  const int chunks = SAMOYEDS ? S >> chunk_shift : 1;
  RowPairPrefetch<G> pairs;
  if constexpr (SAMOYEDS) {
    pairs.begin(rowsel, static_cast<long long>(expert) * G * num_mtiles * 16 + mt_load * 16 + g, num_mtiles * 16,
                chunks, run_begin, run_end, chunk_shift, nullptr);
  }

  // Ring: the wgmmas of block b stay in flight while block b + 1 is issued (wgmma.wait_group 1), so the slot
  // of block b is refilled only at iteration b + 2, with block b + STAGES: STAGES - 2 blocks land ahead.
#pragma unroll
  for (int p = 0; p < STAGES - 2; ++p) {
    if (p < nblk) {
      load_slot(p, p);
    } else {
      cp_async_commit();
    }
  }
  // A and metadata of a block go to registers before its wgmmas (RS form); two register sets alternate
  // because the previous block's wgmmas still read theirs.
  uint4 a[2][KB][G];
  uint32_t meta[2][KB][G];
  auto run_block = [&](int blk, int slot, auto buf_c) {
    constexpr int buf = decltype(buf_c)::value;
    cp_async_wait<STAGES - 3>();
    fence_proxy_async_shared();  // this thread's landed token rows, visible to the wgmma (async proxy)
    __syncthreads();             // everyone's rows landed; every warpgroup retired block blk - 2
    {
      const int next = blk + STAGES - 2;
      int next_slot = slot + STAGES - 2;
      if (next_slot >= STAGES) next_slot -= STAGES;
      if (next < nblk) {
        load_slot(next, next_slot);
      } else {
        cp_async_commit();
      }
    }
    const uint32_t a_st = a_sm + slot * L::kAStage, m_st = m_sm_r + slot * L::kMStage;
    const uint32_t b_st = smem + L::kBOff + slot * L::kBStage;
#pragma unroll
    for (int kk = 0; kk < KB; ++kk)
#pragma unroll
      for (int gr = 0; gr < G; ++gr) {
        a[buf][kk][gr] = lds_128(a_st + (gr * KB + kk) * 512);
        meta[buf][kk][gr] = lds_32(m_st + (gr * KB + kk) * 64);
      }
    const int s0 = (blk_begin + blk) * KB;
    auto issue_step = [&](int kk) {
#pragma unroll
      for (int gr = 0; gr < G; ++gr)
        wgmma_sp<T, BN>(reinterpret_cast<float(&)[BN / 2]>(acc[0][gr][0][0]), a[buf][kk][gr],
                        token_desc(b_st, kk, L::kSbo), meta[buf][kk][gr]);
    };
    // 1:2:V+2:4: before the first k-step of a chunk (and of this split) every wgmma on the banks must have
    // retired: commit what this block issued so far, wait, swap, fence again.
    auto chunk_start = [&](int s) {
      if constexpr (SAMOYEDS) {
        if (s == run_begin || (s & ((1 << chunk_shift) - 1)) == 0) {
          wgmma_commit();
          wgmma_wait<0>();
          // w2: the in-place swap keeps ptxas from serialising the wgmmas (w13 would need 255 registers then)
          pairs.enter_chunk<NT, G == 1>(acc, state, s, chunk_shift, run_end, nullptr, nt_active);
          wgmma_fence();
        }
      }
    };
    wgmma_fence();
    if (s0 + KB <= S) {  // a whole block: one straight run of wgmmas
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) {
        chunk_start(s0 + kk);
        issue_step(kk);
      }
    } else {  // the last block of a K that is not a multiple of 32 * KB
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) {
        if (s0 + kk >= S) break;  // uniform
        chunk_start(s0 + kk);
        issue_step(kk);
      }
    }
    wgmma_commit();
    wgmma_wait<1>();
  };
  int slot = 0;
  int blk = 0;
  for (; blk + 1 < nblk; blk += 2) {
    run_block(blk, slot, std::integral_constant<int, 0>{});
    slot = slot + 1 == STAGES ? 0 : slot + 1;
    run_block(blk + 1, slot, std::integral_constant<int, 1>{});
    slot = slot + 1 == STAGES ? 0 : slot + 1;
  }
  if (blk < nblk) run_block(blk, slot, std::integral_constant<int, 0>{});
  wgmma_wait<0>();
  cp_async_wait<0>();
  void* dst = (G == 1) ? static_cast<void*>(static_cast<float*>(out) + static_cast<long long>(blockIdx.z) * num_pairs * out_ld)
                       : out;
  if (active)
    store_epilogue<T, G, G, NT, SAMOYEDS>(acc, state, nt_active, tile * BN, mt, 1, g, t, sorted_pairs, topk_weights,
                                          dst, out_ld);
#else
  __trap();  // launched only on capability 9.0, where the JIT build targets sm_90a: a build without wgmma fails loudly
#endif
}

}  // namespace samoyeds
