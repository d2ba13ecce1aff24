// Hopper (sm_90a) grouped sparse MoE GEMM with wgmma.mma_async.sp (2:4 and 1:2:V+2:4), for 16 or more tokens per
// expert: 32- and 48-token tiles at decode, 64 and 128 at prefill.
//
// Same job, operands and epilogues as moe_mma_sp_pipelined_kernel (moe_dual_sparse_sm80.cuh). A CTA is two
// consumer warpgroups stacked along M, 128 stored rows (8 m-tiles, one per warp) of its G groups x BN tokens, one
// m64nBNk32 sparse wgmma per (warpgroup, group, k-step), plus one producer warpgroup (warp-specialised, persistent:
// see moe_wgmma_sp_kernel):
//   A (weights)  from registers ("RS" form): the sm80 kernel-layout fragment of each warp's m-tile is exactly
//                the per-warp A fragment of wgmma.sp, and its metadata register is the mma.sp one (selector 0);
//                it moves global -> shared (the producer's cp.async ring) -> registers.
//   B (tokens)   from shared memory through a matrix descriptor: gathered by cp.async (16 B per copy) into the
//                K-major 128-byte-swizzled layout (a token row's 64 k of a slot = one 128-byte row of an 8-row,
//                1024-byte atom; eight threads copy one row, i.e. one whole 128-byte line). The no-swizzle
//                core-matrix layout (LBO 128, SBO between 8-token groups; commit cb67ef8) is correct too but
//                made the w13 kernel 1.8x slower on an H200 (4x the L2 requests).
//   C/D          f32 in registers; per warp d[4j + r] is the mma.sync m16n8 fragment of n-tile j, so the
//                store_epilogue of the sm80 kernel applies unchanged.
// Per k-block of KB k-steps a consumer waits on the slot's "full" mbarrier, fence.proxy.async (the producer's
// cp.async writes are generic-proxy writes that wgmma reads through the async proxy), loads the block's A and
// metadata into registers, wgmma.fence, issues, commits, waits for all but this block (wait_group 1) and releases
// the block before on its slot's "empty" mbarrier.
// 1:2:V+2:4 (SAMOYEDS) runs in one of two forms (moe_dual_sparse.cu picks by V):
//   banks   on 32-, 48- or 64-token tiles (moe_dual_sparse.cu picks by the pairs per expert). Two accumulator banks
//           of BN tokens for gate and up (128 registers at BN = 64, 216 in all). The row-pair banks are swapped as in
//           the sm80 kernel (select_banks) at chunk starts, after wgmma.wait_group 0 and before a wgmma.fence; in place
//           (one asm statement per pair) in w2 and in the 32- and 48-token w13, which keeps ptxas from serialising
//           their wgmmas. ptxas serialises the 64-token w13 wgmmas (C7511: registers): the form it does not
//           serialise (in-place swap, one A register set, token rows re-read from shared memory; 255 registers)
//           measured 5-13% slower on an H200 (docs/HOPPER_PREFILL_NOTES.md, section 8). The producer copies each
//           block's row selections into the slot (the consumers' own one-chunk-ahead global loads were waited for
//           by every block's proxy fence: 2-5% slower).
//   EXPAND  (V = 32, a chunk start at every k-step) two warps share a stored m-tile and expand its row pairs in
//           registers into 16-output-row A fragments (ExpandedPair): no banks, no drains, twice the MMAs
//           (section 10 of the notes).
#pragma once

#include <type_traits>

#include "moe_dual_sparse_sm80.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SAMOYEDS_HAS_WGMMA 1
#endif

namespace samoyeds {

// d[N/2] += A (64 x 32 logical, 2:4-compressed; this warp's 16 rows from registers) * B (32 x N tokens, K-major,
// through the shared-memory descriptor); f32 accumulate, sparsity selector 0. N = the token tile: 32, 48, 64 or 128
// (2:4 only). One asm template; the accumulator operands come in blocks of 8 (%0-%7, %8-%15, ...), then A, the
// descriptor and the metadata.
#define SAMOYEDS_ACC_REGS_0 "%0,%1,%2,%3,%4,%5,%6,%7"
#define SAMOYEDS_ACC_REGS_8 "%8,%9,%10,%11,%12,%13,%14,%15"
#define SAMOYEDS_ACC_REGS_16 "%16,%17,%18,%19,%20,%21,%22,%23"
#define SAMOYEDS_ACC_REGS_24 "%24,%25,%26,%27,%28,%29,%30,%31"
#define SAMOYEDS_ACC_REGS_32 "%32,%33,%34,%35,%36,%37,%38,%39"
#define SAMOYEDS_ACC_REGS_40 "%40,%41,%42,%43,%44,%45,%46,%47"
#define SAMOYEDS_ACC_REGS_48 "%48,%49,%50,%51,%52,%53,%54,%55"
#define SAMOYEDS_ACC_REGS_56 "%56,%57,%58,%59,%60,%61,%62,%63"
#define SAMOYEDS_ACC_OPS_0                                                                                            \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),                                                                     \
  "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
#define SAMOYEDS_ACC_OPS_8                                                                                            \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),                                                                   \
  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define SAMOYEDS_ACC_OPS_16                                                                                           \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),                                                                 \
  "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23])
#define SAMOYEDS_ACC_OPS_24                                                                                           \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),                                                                 \
  "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define SAMOYEDS_ACC_OPS_32                                                                                           \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),                                                                 \
  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
#define SAMOYEDS_ACC_OPS_40                                                                                           \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),                                                                 \
  "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
#define SAMOYEDS_ACC_OPS_48                                                                                           \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]),                                                                 \
  "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55])
#define SAMOYEDS_ACC_OPS_56                                                                                           \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),                                                                 \
  "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define SAMOYEDS_WGMMA_SP_ASM(SHAPE, PTX_TYPE, REGS, TAIL, ...)                                                       \
  asm volatile("wgmma.mma_async.sp.sync.aligned." SHAPE ".f32." PTX_TYPE "." PTX_TYPE " {" REGS "}, " TAIL            \
               : __VA_ARGS__                                                                                          \
               : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(desc), "r"(meta))
#define SAMOYEDS_WGMMA_SP_N(SHAPE, REGS, TAIL, ...)                                  \
  if constexpr (kBf16) {                                                          \
    SAMOYEDS_WGMMA_SP_ASM(SHAPE, "bf16", REGS, TAIL, __VA_ARGS__);                \
  } else {                                                                        \
    SAMOYEDS_WGMMA_SP_ASM(SHAPE, "f16", REGS, TAIL, __VA_ARGS__);                 \
  }

template <typename T, int N>
__device__ __forceinline__ void wgmma_sp(float (&d)[N / 2], const uint4& a, uint64_t desc, uint32_t meta) {
  static_assert(N == 32 || N == 48 || N == 64 || N == 128, "the kernels use m64nNk32 with N = 32, 48, 64, 128");
#if defined(SAMOYEDS_HAS_WGMMA)
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (N == 32) {
    SAMOYEDS_WGMMA_SP_N("m64n32k32", SAMOYEDS_ACC_REGS_0 "," SAMOYEDS_ACC_REGS_8,
                        "{%16,%17,%18,%19}, %20, %21, 0, 1, 1, 1, 0;\n", SAMOYEDS_ACC_OPS_0, SAMOYEDS_ACC_OPS_8);
  } else if constexpr (N == 48) {
    SAMOYEDS_WGMMA_SP_N("m64n48k32", SAMOYEDS_ACC_REGS_0 "," SAMOYEDS_ACC_REGS_8 "," SAMOYEDS_ACC_REGS_16,
                        "{%24,%25,%26,%27}, %28, %29, 0, 1, 1, 1, 0;\n", SAMOYEDS_ACC_OPS_0, SAMOYEDS_ACC_OPS_8,
                        SAMOYEDS_ACC_OPS_16);
  } else if constexpr (N == 64) {
    SAMOYEDS_WGMMA_SP_N("m64n64k32",
                        SAMOYEDS_ACC_REGS_0 "," SAMOYEDS_ACC_REGS_8 "," SAMOYEDS_ACC_REGS_16 "," SAMOYEDS_ACC_REGS_24,
                        "{%32,%33,%34,%35}, %36, %37, 0, 1, 1, 1, 0;\n", SAMOYEDS_ACC_OPS_0, SAMOYEDS_ACC_OPS_8,
                        SAMOYEDS_ACC_OPS_16, SAMOYEDS_ACC_OPS_24);
  } else {
    SAMOYEDS_WGMMA_SP_N("m64n128k32",
                        SAMOYEDS_ACC_REGS_0 "," SAMOYEDS_ACC_REGS_8 "," SAMOYEDS_ACC_REGS_16 "," SAMOYEDS_ACC_REGS_24
                        "," SAMOYEDS_ACC_REGS_32 "," SAMOYEDS_ACC_REGS_40 "," SAMOYEDS_ACC_REGS_48
                        "," SAMOYEDS_ACC_REGS_56,
                        "{%64,%65,%66,%67}, %68, %69, 0, 1, 1, 1, 0;\n", SAMOYEDS_ACC_OPS_0, SAMOYEDS_ACC_OPS_8,
                        SAMOYEDS_ACC_OPS_16, SAMOYEDS_ACC_OPS_24, SAMOYEDS_ACC_OPS_32, SAMOYEDS_ACC_OPS_40,
                        SAMOYEDS_ACC_OPS_48, SAMOYEDS_ACC_OPS_56);
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

// mbarrier ring (PTX ISA: mbarrier, cp.async.mbarrier.arrive). bar is a shared-window address.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
// Release the barrier initialisation before any arrival on it (the CTA barrier after it publishes it to the
// other threads).
__device__ __forceinline__ void mbar_init_fence() {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// Block until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(SAMOYEDS_HAS_WGMMA)
  // The retry loop stays inside the asm: a C++ loop would be a divergent path to ptxas, which then serialises
  // the wgmmas after it (C7520).
  asm volatile(
      "{\n .reg .pred p;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT;\n}\n" ::"r"(
          bar),
      "r"(parity)
      : "memory");
#endif
}
// One arrival by the threads where pred holds (a predicated instruction, not a branch).
__device__ __forceinline__ void mbar_arrive(uint32_t bar, bool pred) {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %1, 0;\n @p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(bar),
      "r"(static_cast<int>(pred))
      : "memory");
#endif
}
// One arrival, triggered when every cp.async this thread issued before it has landed (counts as an expected
// arrival: .noinc).
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t bar) {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
#endif
}
// Hand registers between warpgroups (all warps of a warpgroup execute it): the producer gives up, the consumers
// take.
template <int N>
__device__ __forceinline__ void warpgroup_reg_dealloc() {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void warpgroup_reg_alloc() {
#if defined(SAMOYEDS_HAS_WGMMA)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// Tiles of the wgmma kernel (WgTile): kGroups consumer warpgroups stacked along M (each 64 stored rows = 4
// m-tiles, one per warp) x BN tokens, plus one producer warpgroup; a ring of kStages slots of kWgKB = 2 k-steps
// (64 k: one 128-byte swizzled row per token and slot).
//   2:4        BN 32, 48, 64 or 128 (the WgTile argument; 0 = 128), 2 consumer warpgroups, SAMOYEDS_WG_STAGES slots.
//   1:2:V+2:4  BN 32, 48 or 64 (the WgTile argument; 0 = 64), SAMOYEDS_WG_SAM = consumer warpgroups x 10 + slots:
//              two accumulator banks of BN tokens per group (216 registers in the 64-token w13).
// H200, prefill shapes (kernel_tuning_*.json): 6 slots 1-5% faster than 5, 4 slots 1-10% slower; one consumer
// warpgroup with two CTAs per SM (SAMOYEDS_WG_SAM=14) no faster for 1:2:V+2:4. Decode shapes, 32- and 48-token
// tiles: 8 slots, or a 112-register producer, within 2% of 6 slots and 64 registers.
#ifndef SAMOYEDS_WG_STAGES
#define SAMOYEDS_WG_STAGES 6
#endif
#ifndef SAMOYEDS_WG_SAM
#define SAMOYEDS_WG_SAM 26
#endif
// Registers the producer warpgroup keeps after setmaxnreg: 1:2:V+2:4 (its consumers need 216 for the banks) and
// 2:4. With 64 the 2:4 producer reused one address register pair for every copy and waited for each cp.async to
// read it (ncu: the consumers of the 2:4 w13 kernel stalled on full slots at prefill); 112 made 2:4 prefill on an
// H200 11-22% faster at Mixtral-8x7B 512-2048 tokens, 3-9% elsewhere, while 1:2:V+2:4 lost 2-4% with 112 and
// was unchanged with 96 (kernel_tuning_*.json).
#ifndef SAMOYEDS_WG_PRODUCER_REGS
#define SAMOYEDS_WG_PRODUCER_REGS 64
#endif
#ifndef SAMOYEDS_WG_PRODUCER_REGS_24
#define SAMOYEDS_WG_PRODUCER_REGS_24 112
#endif
#ifndef SAMOYEDS_WG_EXP_STAGES  // EXPAND: 2 consumer warpgroups (64 stored rows) x BN 64, this many slots
#define SAMOYEDS_WG_EXP_STAGES 6
#endif
#ifndef SAMOYEDS_WG_ROWSEL_AHEAD
#define SAMOYEDS_WG_ROWSEL_AHEAD 4
#endif
constexpr int kWgRowSelAhead = SAMOYEDS_WG_ROWSEL_AHEAD;
constexpr int kWgKB = 2;
template <bool SAMOYEDS, bool EXPAND = false, int BN = 0>
struct WgTile {
  static_assert(SAMOYEDS || !EXPAND, "EXPAND is a 1:2:V+2:4 tile");
  static constexpr int kBN = BN != 0 ? BN : SAMOYEDS ? 64 : 128;
  static_assert(kBN % 16 == 0 && kBN >= 32 && (kBN <= 64 || !SAMOYEDS), "token tiles: 2:4 32-128, 1:2:V+2:4 32-64");
  static constexpr int kGroups = EXPAND ? 2 : SAMOYEDS ? SAMOYEDS_WG_SAM / 10 : 2;
  static constexpr int kWarps = 4 * kGroups;          // consumer warps (one m-tile each; EXPAND: half of one)
  static constexpr int kAWarps = EXPAND ? kWarps / 2 : kWarps;  // stored m-tiles per work item
  static constexpr int kThreads = 32 * kWarps + 128;  // + the producer warpgroup
  // CTAs per SM: two with one consumer warpgroup, else one. Registers per thread after setmaxnreg (multiples of
  // 8): the launch gives every thread kLaunchRegs (64K per SM); the consumers can take only what the producer
  // gave back to the CTA's pool (asking for more blocks setmaxnreg.inc forever).
  static constexpr int kCtasPerSm = kGroups == 1 ? 2 : 1;
  static constexpr int kLaunchRegs = 65536 / (kThreads * kCtasPerSm) / 8 * 8;
  static constexpr int kProducerRegs = SAMOYEDS ? SAMOYEDS_WG_PRODUCER_REGS : SAMOYEDS_WG_PRODUCER_REGS_24;
  static constexpr int kConsumerRegs = (kLaunchRegs + (kLaunchRegs - kProducerRegs) / kGroups) / 8 * 8;
  static_assert(128 * kProducerRegs + 128 * kGroups * kConsumerRegs <= kLaunchRegs * kThreads, "register pool");
  static constexpr int kStages = EXPAND ? SAMOYEDS_WG_EXP_STAGES : SAMOYEDS ? SAMOYEDS_WG_SAM % 10 : SAMOYEDS_WG_STAGES;
  static_assert(kStages >= 3, "a slot is released one block after its wgmmas were issued");
};

// Ring slot layout (bytes): weights [m-tile][group][k-step][lane] x 16, metadata [m-tile][group][k-step][16] x 4,
// tokens: 8-token group j at j * kSbo, one 1024-byte 128B-swizzle atom; 1:2:V+2:4 with banks also the row
// selections [warp][group][row half][g] x 8 bytes (the aligned 4-byte word holding the block's first chunk, and
// the next word). Per slot one "full" and one "empty" mbarrier.
template <typename T, int G, bool SAMOYEDS, bool EXPAND = false, int BN = 0>
struct WgSmem {
  using Tile = WgTile<SAMOYEDS, EXPAND, BN>;
  static constexpr int kKBlk = 32 * kWgKB;
  static constexpr uint32_t kAWarp = kWgKB * G * 512, kMWarp = kWgKB * G * 64;
  static constexpr uint32_t kAStage = Tile::kAWarps * kAWarp, kMStage = Tile::kAWarps * kMWarp;
  static constexpr uint32_t kSbo = 8 * 128;
  static constexpr uint32_t kBStage = (Tile::kBN / 8) * kSbo;
  static constexpr uint32_t kMOff = Tile::kStages * kAStage, kBOff = kMOff + Tile::kStages * kMStage;
  static constexpr uint32_t kRStage = (SAMOYEDS && !EXPAND) ? Tile::kWarps * G * 2 * 8 * 8 : 0;
  static constexpr uint32_t kROff = kBOff + Tile::kStages * kBStage;
  static constexpr uint32_t kBarOff = kROff + Tile::kStages * kRStage;  // full[kStages], empty[kStages]
  static constexpr int bytes() { return static_cast<int>(kBarOff + 2 * 8 * Tile::kStages) + 1024; }  // + alignment
};

// Work items of the persistent grid: (token tile, CTA m-tile group, K split) over the tiles the routing plan
// made (tiles, read on the device), token tile fastest within raster blocks of tile_block tiles, so that the CTAs
// running at the same time read the same weights and token rows (once from DRAM, the rest from L2). With one block
// of all tiles, prefill re-read every tile's token rows from DRAM for each m-tile group once they outgrew L2
// (Mixtral-8x7B w2 at 8192 tokens: 470 MB of intermediate rows per group). H200, one call (kernel_tuning_*.json,
// run 30; blocks of a third of L2 against one block): 2:4 Mixtral 8192 tokens 8105-8113 vs 9490-9557 µs, 2048
// 1886-1888 vs 2011-2025; Qwen3-30B-A3B and OLMoE 9-11% faster at 8192; 1:2:128+2:4 Mixtral 4% faster.
// SAMOYEDS_WG_BALANCE_ROUNDS: the most rounds for which WgWork::stride balances them (0: never).
#ifndef SAMOYEDS_WG_BALANCE_ROUNDS
#define SAMOYEDS_WG_BALANCE_ROUNDS 4
#endif
struct WgWork {
  int mgroups, splits;
  int tile_block;  // token tiles per raster block (at(): all m-tile groups of a block's tiles before the next block)
  __device__ __forceinline__ int items(int tiles) const { return tiles * mgroups * splits; }
  // CTAs that take items. Up to SAMOYEDS_WG_BALANCE_ROUNDS rounds (decode): as few as give every CTA the same
  // number of items (448 items on 132 CTAs: 112 CTAs of 4 instead of 52 of 4 and 80 of 3), the others take none;
  // the fewer SMs still saturate DRAM. H200 (kernel_tuning_*.json, run 27): Mixtral-8x7B 1:2:128+2:4 at 128 tokens
  // 250 vs 258 µs, OLMoE and Qwen3-30B-A3B at 128-256 tokens 2-4% faster. Beyond (prefill), all CTAs: a short last
  // round runs alone and fast, and balanced rounds measured up to 5% slower (Mixtral 2:4 at 8192 tokens).
  __device__ __forceinline__ int stride(int items) const {
    const int rounds = (items + gridDim.x - 1) / gridDim.x;
    if (rounds <= 1 || rounds > SAMOYEDS_WG_BALANCE_ROUNDS) return gridDim.x;
    return (items + rounds - 1) / rounds;
  }
  // Item -> (token tile, m-tile group, K split): token tile fastest within blocks of tile_block tiles, so that the
  // CTAs running at the same time share both the weights of a few m-tile groups and the token rows of a few tiles
  // in L2 (with every routed tile in one block, the token rows of all of them were read again from DRAM for each
  // m-tile group once they outgrew L2: prefill).
  __device__ __forceinline__ int3 at(int item, int tiles) const {
    const int tb = min(tile_block, tiles);  // (tile_block may be huge: one block)
    const int per_block = tb * mgroups * splits;
    const int block = item / per_block, j = item - block * per_block;
    const int t0 = block * tb, n = min(tb, tiles - t0);
    const int rest = j / n;
    return make_int3(t0 + j - rest * n, rest % mgroups, rest / mgroups);
  }
};

// Persistent and warp-specialised. Each CTA walks the work items blockIdx.x, + stride, ...; one ring runs
// through all of them, so the producer fills the next item's first slots while the consumers finish the last
// one (epilogue included).
//   producer warpgroup (the last one; setmaxnreg gives its registers to the consumers): gathers the tile's
//     token rows and copies the weights and metadata of every consumer warp, all by cp.async (16 B each; tokens
//     128-byte-swizzled as above), then one cp.async.mbarrier.arrive.noinc per thread on the slot's "full"
//     barrier (128 arrivals).
//   consumer warpgroups: wait on "full", read A and metadata into registers, issue the wgmmas, and release the
//     slot of the block before (retired at wait_group 1) with one arrival per warp on its "empty" barrier; the
//     last block of an item is released after wait_group 0.
// (Weights by cp.async.bulk instead, 1 KB per warp and group: 1.5-1.8x slower on an H200.)
template <typename T, int G, bool SAMOYEDS, bool EXPAND = false, int TILE_BN = 0>
__global__ void __launch_bounds__(WgTile<SAMOYEDS, EXPAND, TILE_BN>::kThreads,
                                  WgTile<SAMOYEDS, EXPAND, TILE_BN>::kCtasPerSm)
moe_wgmma_sp_kernel(const T* __restrict__ act, const uint4* __restrict__ kvalues, const uint32_t* __restrict__ kmeta,
                    const uint8_t* __restrict__ rowsel, const int32_t* __restrict__ sorted_pairs,
                    const int32_t* __restrict__ tile_expert, const int32_t* __restrict__ num_tiles,
                    const float* __restrict__ topk_weights, void* __restrict__ out, int K, int num_mtiles,
                    int chunk_shift, int topk, int out_ld, int num_pairs,  // G=1: slot_out [splits, pairs, H]
                    WgWork work) {
#if defined(SAMOYEDS_HAS_WGMMA)
  using L = WgSmem<T, G, SAMOYEDS, EXPAND, TILE_BN>;
  using Tile = WgTile<SAMOYEDS, EXPAND, TILE_BN>;
  constexpr int BN = Tile::kBN, WARPS = Tile::kWarps, A_WARPS = Tile::kAWarps;
  constexpr int NT = BN / 8, KB = kWgKB, STAGES = Tile::kStages;
  constexpr int BANKS = (SAMOYEDS && !EXPAND) ? 2 : 1;
  constexpr int KBLK = L::kKBlk;
  static_assert(KBLK * sizeof(T) == 128, "a slot holds one 128-byte row per token");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tiles = *num_tiles;
  const int items = work.items(tiles);
  const int stride = work.stride(items);
  const int first_item = blockIdx.x < stride ? blockIdx.x : items;  // past the last CTA that takes items: none
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int S = K >> 5;
  const int total_blk = (S + KB - 1) / KB;
  const uint32_t smem = (smem_addr(smem_raw) + 1023) & ~1023u;  // swizzle atoms are 1024-byte aligned
  const uint32_t full_bar = smem + L::kBarOff, empty_bar = full_bar + 8 * STAGES;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(full_bar + 8 * st, 128);
      mbar_init(empty_bar + 8 * st, WARPS);
    }
    mbar_init_fence();
  }
  __syncthreads();

  // Roles by warpgroup; the shuffle makes the index visibly warp-uniform to the compiler.
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) >> 7, 0);
  if (wg == Tile::kGroups) {  // ------------------------------------------------------- producer warpgroup
    warpgroup_reg_dealloc<Tile::kProducerRegs>();
    const int p = threadIdx.x - 32 * WARPS;
    // Tokens: thread p copies 16-byte chunk c = p % 8 of rows p / 8 + 16 i; 128-byte swizzle: a token row's
    // KBLK = 64 values are one 128-byte row of an 8-row atom (8-token group q at q * kSbo), chunk c stored at
    // chunk c ^ (row % 8).
    constexpr int COPIES = BN / 16;
    const int c = p & 7, r16 = p >> 3, r8 = r16 & 7;
    const uint32_t tok_dst = smem + L::kBOff + (r16 >> 3) * L::kSbo + r8 * 128 + ((c ^ r8) << 4);
    // Weights: 16-byte vector p + 128 i of the block's A ([warp][group][kk][lane]): copy i of thread p is lane
    // p % 32 of (kk, group, warp) = (q % KB, q / KB % G, q / (KB G)) with q = p / 32 + 4 i, i.e. A_STEP consumer
    // warps on per copy. Metadata: 16-byte vector p. Rows of m-tiles past the last are not copied (the wgmmas of
    // their warps read stale shared memory; those warps store nothing).
    constexpr int A_COPIES = A_WARPS * G * KB * 32 / 128;
    static_assert(4 % (KB * G) == 0, "copy i + 1 of a thread is A_STEP whole warps on");
    constexpr int A_STEP = 4 / (KB * G);
    const int a_q = p >> 5, a_kk = a_q % KB, a_g = (a_q / KB) % G, a_w = a_q / (KB * G);
    const uint32_t a_dst = smem + a_w * L::kAWarp + (a_g * KB + a_kk) * 512 + lane * 16;
    const int mq4 = p >> 2, m_kk = mq4 % KB, m_g = (mq4 / KB) % G, m_w = mq4 / (KB * G);
    const bool m_ok = mq4 < A_WARPS * G * KB;
    const uint32_t m_dst = smem + L::kMOff + m_w * L::kMWarp + (m_g * KB + m_kk) * 64 + (p & 3) * 16;
    // Row selections (1:2:V+2:4 with banks): row q = p + 128 i of the item's [warp][group][half][g] rows; per
    // block the aligned 4-byte word of the row holding the block's first chunk, and for V = 32 (a chunk per k-step)
    // the next word when the second chunk starts it. The consumers read the bytes from the slot: loaded by each
    // consumer from global memory one chunk ahead, the proxy fence of every block waited for them (2-5%
    // slower on an H200).
    constexpr bool STAGE_RS = SAMOYEDS && !EXPAND;
    constexpr int RS_ROWS = STAGE_RS ? WARPS * G * 16 : 0;  // 64 with one consumer warpgroup and G = 1
    constexpr int RS_COPIES = (RS_ROWS + 127) / 128;
    const int chunks = SAMOYEDS ? S >> chunk_shift : 1;
    uint32_t rs_dst[RS_COPIES > 0 ? RS_COPIES : 1];
#pragma unroll
    for (int i = 0; i < RS_COPIES; ++i) rs_dst[i] = smem + L::kROff + (p + 128 * i) * 8;
    int slot = 0, produced = 0;
    uint32_t empty_parity = 1;  // round r >= 1 of the ring waits for phase r - 1 of the slot's empty barrier
    for (int item = first_item; item < items; item += stride) {
      const int3 w = work.at(item, tiles);
      const int expert = tile_expert[w.x];
      int tok_row[COPIES];  // activation row, -1 for padding
#pragma unroll
      for (int i = 0; i < COPIES; ++i) {
        const int r = w.x * BN + r16 + 16 * i;
        const int pair = sorted_pairs[r];
        tok_row[i] = pair < 0 ? -1 : (G == 2 ? pair / topk : r);
      }
      const T* tok_base = act + c * 8;
      const int mt0 = w.y * A_WARPS;
      const long long stream0 = (static_cast<long long>(expert) * num_mtiles + mt0) * G;  // first (m-tile, group)
      const uint4* a_src = kvalues + ((stream0 + a_w * G + a_g) * S + a_kk) * 32 + lane;
      const long long a_step = static_cast<long long>(A_STEP) * G * S * 32;
      const int a_rows = num_mtiles - mt0 - a_w;  // copy i's m-tile mt0 + a_w + A_STEP i exists iff A_STEP i < a_rows
      const uint4* m_src = reinterpret_cast<const uint4*>(kmeta) + ((stream0 + m_w * G + m_g) * S + m_kk) * 4 + (p & 3);
      const bool m_row = m_ok && mt0 + m_w < num_mtiles;
      long long rs_row[RS_COPIES > 0 ? RS_COPIES : 1];  // byte offset of the row's chunk 0 in rowsel
#pragma unroll
      for (int i = 0; i < RS_COPIES; ++i) {
        const int q = p + 128 * i, rg = q & 7, rh = (q >> 3) & 1, rgr = (q >> 4) % G, rw = q / (16 * G);
        const int rmt = min(mt0 + rw, num_mtiles - 1);  // rows of missing m-tiles: any valid row (never used)
        rs_row[i] = ((static_cast<long long>(expert) * G + rgr) * num_mtiles * 16 + rmt * 16 + rg + 8 * rh) * chunks;
      }
      const int2 range = split_blocks(total_blk, w.z, work.splits);
      for (int blk = range.x; blk < range.y; ++blk) {
        if (produced >= STAGES) mbar_wait(empty_bar + 8 * slot, empty_parity);
        const int s0 = blk * KB, ksteps = min(KB, S - s0);
        const bool a_k = a_kk < ksteps;
#pragma unroll
        for (int i = 0; i < A_COPIES; ++i)
          cp_async_16(a_dst + i * A_STEP * L::kAWarp + slot * L::kAStage, a_src + i * a_step + s0 * 32,
                      a_k && A_STEP * i < a_rows);
        cp_async_16(m_dst + slot * L::kMStage, m_src + s0 * 4, m_row && m_kk < ksteps);
        if constexpr (STAGE_RS) {
          const int c0 = s0 >> chunk_shift;
          const bool second = chunk_shift == 0 && ksteps > 1;  // k-step s0 + 1 starts chunk c0 + 1
#pragma unroll
          for (int i = 0; i < RS_COPIES; ++i) {
            const long long at = rs_row[i] + c0;
            const uint8_t* word = rowsel + (at & ~3ll);
            const bool row = RS_ROWS % 128 == 0 || p + 128 * i < RS_ROWS;
            cp_async_4(rs_dst[i] + slot * L::kRStage, word, row);
            cp_async_4(rs_dst[i] + slot * L::kRStage + 4, word + 4, row && second && (at & 3) == 3);
          }
        }
        const bool k_ok = blk * KBLK + c * 8 < K;
#pragma unroll
        for (int q = 0; q < COPIES; ++q)
          cp_async_16(tok_dst + slot * L::kBStage + 2 * q * L::kSbo,
                      tok_base + static_cast<long long>(max(tok_row[q], 0)) * K + blk * KBLK, k_ok && tok_row[q] >= 0);
        cp_async_mbar_arrive(full_bar + 8 * slot);
        ++produced;
        if (++slot == STAGES) {
          slot = 0;
          empty_parity ^= 1;
        }
      }
    }
    cp_async_wait<0>();  // stay until this thread's copies have landed
    return;
  }
  warpgroup_reg_alloc<Tile::kConsumerRegs>();

  // ----------------------------------------------------------------------------------- consumer warpgroups
  const int g = lane >> 2, t = lane & 3;
  // EXPAND: warps 2j and 2j + 1 share stored m-tile j of the item, each expanding half of its rows (ExpandedPair)
  const int a_slot = EXPAND ? warp >> 1 : warp, half = EXPAND ? warp & 1 : 0;
  const uint32_t a_sm = smem + a_slot * L::kAWarp + lane * 16 + 4 * half;  // EXPAND: a0/a1 (+8: a2/a3) of its rows
  const uint32_t m_sm_r = smem + L::kMOff + a_slot * L::kMWarp + (2 * g + (t & 1)) * 4 + 2 * half;
  int slot = 0;
  uint32_t parity = 0;
  auto release = [&](int s) { mbar_arrive(empty_bar + 8 * s, lane == 0); };
  uint4 a[2][KB][G];
  uint32_t meta[2][KB][G];
  for (int item = first_item; item < items; item += stride) {
    const int3 w = work.at(item, tiles);
    const int tile = w.x, expert = tile_expert[tile];
    const int mt = w.y * A_WARPS + a_slot;
    // wgmma is warpgroup-wide: a warp past the last m-tile still runs it (on clamped, valid weights) and skips
    // only its stores.
    const bool active = mt < num_mtiles;
    const int mt_load = active ? mt : num_mtiles - 1;
    // n-tiles holding tokens (a tile's pairs come first, then padding)
    int valid = 0;
#pragma unroll
    for (int i = 0; i < (BN + 31) / 32; ++i)
      valid += __popc(__ballot_sync(0xffffffffu, 32 * i + lane < BN && sorted_pairs[tile * BN + 32 * i + lane] >= 0));
    const int nt_active = (valid + 7) >> 3;
    const int2 range = split_blocks(total_blk, w.z, work.splits);
    const int blk_begin = range.x, nblk = range.y - range.x;

    float acc[BANKS][G][NT][4];
    float* flat = &acc[0][0][0][0];
#pragma unroll
    for (int i = 0; i < BANKS * G * NT * 4; ++i) flat[i] = 0.f;
    // 1:2:V+2:4 row pairs: the bank state (select_banks), or the expanded pairs and their row selections.
    bool state[G][2] = {};
    ExpandedPair rowpair[G];  // EXPAND: the row of each group's pair that the current chunk keeps
    const int run_begin = blk_begin * KB, run_end = min(range.y * KB, S);
    const int chunks = SAMOYEDS ? S >> chunk_shift : 1;
    RowSelRing<G, kWgRowSelAhead> sel;  // EXPAND: row g + 8 * half, kWgRowSelAhead chunks ahead
    uint32_t rs_mod = 0;  // banks: (row's chunk-0 byte offset) % 4 of rows (group gr, half h) at bits 2 (2 gr + h)
    if constexpr (SAMOYEDS) {
      const long long first_row = static_cast<long long>(expert) * G * num_mtiles * 16 + mt_load * 16 + g;
      if constexpr (EXPAND) {
        sel.begin(rowsel, first_row + 8 * half, num_mtiles * 16, chunks, run_begin, run_end, chunk_shift);
      } else {
#pragma unroll
        for (int gr = 0; gr < G; ++gr)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            rs_mod |= static_cast<uint32_t>(((first_row + gr * num_mtiles * 16 + 8 * h) * chunks) & 3)
                      << (2 * (2 * gr + h));
      }
    }

    // A and metadata of a block go to registers before its wgmmas (RS form); two register sets alternate
    // because the previous block's wgmmas still read theirs.
    auto run_block = [&](int blk, auto buf_c) {
      constexpr int buf = decltype(buf_c)::value;
      mbar_wait(full_bar + 8 * slot, parity);
      fence_proxy_async_shared();  // the producer's cp.async (generic proxy) writes, visible to the wgmma
      const uint32_t a_st = a_sm + slot * L::kAStage, m_st = m_sm_r + slot * L::kMStage;
      const uint32_t b_st = smem + L::kBOff + slot * L::kBStage;
      // banks: this thread's row selections in the slot: [warp][group][half][g] x 8 bytes
      const uint32_t rs_st = smem + L::kROff + slot * L::kRStage + (warp * G * 2 * 8 + g) * 8;
      const int s0 = (blk_begin + blk) * KB;
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) {
        if constexpr (EXPAND) {  // the chunk's row of each pair, taken at its first k-step
          const int s = s0 + kk;
          if (s < S && (s == run_begin || (s & ((1 << chunk_shift) - 1)) == 0)) {
            bool odd[G];
            sel.take(s, odd);
#pragma unroll
            for (int gr = 0; gr < G; ++gr) rowpair[gr].set(odd[gr]);
          }
        }
#pragma unroll
        for (int gr = 0; gr < G; ++gr) {
          if constexpr (EXPAND) {
            const uint32_t at = a_st + (gr * KB + kk) * 512;
            rowpair[gr].expand(a[buf][kk][gr], meta[buf][kk][gr], lds_32(at), lds_32(at + 8),
                               lds_u16(m_st + (gr * KB + kk) * 64));
          } else {
            a[buf][kk][gr] = lds_128(a_st + (gr * KB + kk) * 512);
            meta[buf][kk][gr] = lds_32(m_st + (gr * KB + kk) * 64);
          }
        }
      }
      auto issue_step = [&](int kk) {
#pragma unroll
        for (int gr = 0; gr < G; ++gr)
          wgmma_sp<T, BN>(reinterpret_cast<float(&)[BN / 2]>(acc[0][gr][0][0]), a[buf][kk][gr],
                          token_desc(b_st, kk, L::kSbo), meta[buf][kk][gr]);
      };
      // 1:2:V+2:4: before the first k-step of a chunk (and of this split) every wgmma on the banks must have
      // retired: commit what this block issued so far, wait, swap, fence again.
      auto chunk_start = [&](int s) {
        if constexpr (SAMOYEDS && !EXPAND) {
          if (s == run_begin || (s & ((1 << chunk_shift) - 1)) == 0) {
            bool want[G][2];  // the chunk's row of each pair, from the slot (the producer copied it)
            const int c0 = s0 >> chunk_shift, delta = (s >> chunk_shift) - c0;
#pragma unroll
            for (int gr = 0; gr < G; ++gr)
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const uint32_t off = (((rs_mod >> (2 * (2 * gr + h))) + c0) & 3) + delta;
                want[gr][h] = lds_u8(rs_st + ((gr * 2 + h) * 8) * 8 + off) != 0;
              }
            wgmma_commit();
            wgmma_wait<0>();
            // In place (w2, and w13 below 64 tokens) it keeps ptxas from serialising the wgmmas; the 64-token w13
            // would need 255 registers then.
            select_banks<G, NT, G == 1 || BN < 64>(acc, state, want, nt_active);
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
      wgmma_wait<1>();  // the block before has retired: release its slot
      if (blk > 0) release(slot == 0 ? STAGES - 1 : slot - 1);
      if (++slot == STAGES) {
        slot = 0;
        parity ^= 1;
      }
    };
    int blk = 0;
    for (; blk + 1 < nblk; blk += 2) {
      run_block(blk, std::integral_constant<int, 0>{});
      run_block(blk + 1, std::integral_constant<int, 1>{});
    }
    if (blk < nblk) run_block(blk, std::integral_constant<int, 0>{});
    wgmma_wait<0>();
    if (nblk > 0) release(slot == 0 ? STAGES - 1 : slot - 1);
    float* const slot_out = static_cast<float*>(out) + static_cast<long long>(w.z) * num_pairs * out_ld;
    void* dst = (G == 1) ? static_cast<void*>(slot_out) : out;
    if (active) {
      if constexpr (EXPAND) {
        store_epilogue_expanded<T, G, NT>(acc, nt_active, tile * BN, mt, half, g, t, sorted_pairs, topk_weights, dst,
                                          out_ld);
      } else {
        store_epilogue<T, G, G, NT, SAMOYEDS>(acc, state, nt_active, tile * BN, mt, 1, g, t, sorted_pairs,
                                              topk_weights, dst, out_ld);
      }
    }
  }
#else
  __trap();  // launched only on capability 9.0, where the JIT build targets sm_90a: a build without wgmma fails loudly
#endif
}

}  // namespace samoyeds
