// Dual-side sparse grouped MoE on Sparse Tensor Cores (mma.sp.m16n8k32), sm_80 and newer.
//
// Computes, for a SwiGLU MoE layer whose router already ran,
//     out[t] = sum_j w[t,j] * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t])),   e = expert of slot (t, j)
// with W1/W3/W2 stored 2:4 or 1:2:V+2:4 sparse (weight-side sparsity) and each expert touching only the
// tokens routed to it (activation-side sparsity), gathered by index inside the kernels.
//
// Four launches, no host synchronisation (CUDA-graph capturable; every size depends on shapes only):
//   1. moe_prepare_kernel    one CTA: (token, slot) pairs grouped by expert, each expert padded to BN = 8*NT
//                            rows ("token tiles"); tile -> expert list; number of tiles in device memory.
//   2. w13 GEMM + SwiGLU (G = 2 groups): grid (token tile, m-tile[s]). A warp computes 16 stored gate rows AND
//      the 16 matching up rows for BN tokens, so silu(gate) * up happens in registers; writes the
//      intermediate [tiles*BN, I] in the activation dtype.
//   3. w2 GEMM (G = 1): same grid over H; multiplies the routing weight in the epilogue and writes one fp32
//      row per (token, slot) pair and K split: slot_out[splits, T*k, H]. Long-K w2 GEMMs with few CTAs split
//      K over grid.z (each split a plain store, no atomics).
//   4. moe_combine_kernel: out[t] = sum_z sum_j slot_out[z, t*k + j] in fp32, z then j ascending
//      (deterministic: no atomics).
// Steps 2 and 3 each run one of these kernels (the launcher picks per GEMM, see moe_dual_sparse.cu):
//   moe_mma_sp_kernel           BN = 8 and K >= 2048: split-K over the CTA's 8 warps (decode).
//   moe_mma_sp_pipelined_kernel otherwise: one m-tile per warp (two in the 64-token 2:4 w2), tokens and
//                               weights through a cp.async ring, token fragments by ldmatrix, n-tiles
//                               without tokens skipped at run time.
//   moe_wgmma_sp_kernel         (moe_wgmma_sp_sm90.cuh) capability 9.0: from 16 tokens per expert (1:2:V+2:4
//                               with V < 128: 64) on 32- to 128-token tiles (moe_dual_sparse.cu, wgmma_path).
//
// Operands of one mma.sp.m16n8k32 (A = weights, output features on M; B = tokens on N; K = reduction):
//   A (global, kernel layout, see samoyeds_vllm/ops/kernel_layout.py): per (expert, m-tile, group, k-step)
//     32 lanes x 8 values, lane l = 4g + t holds a0..a3 = (row g | g+8) x (stored cols 2t,2t+1 | 2t+8,2t+9):
//     one coalesced 16-byte load per lane. Metadata: 16 x u32 per k-step, entry 2g + h for lanes with t = h:
//     bits 16h..16h+15 of row g's k-step metadata in the low half, of row g+8 in the high half (selector 0).
//   B (activations, gathered by token index): b_i = x[token of column g][32s + 2t + 8i, +1], i = 0..3.
//   C/D: c0, c1 = (row g, tokens 2t, 2t+1), c2, c3 = (row g+8, same tokens); fp32.
// For 1:2:V+2:4 an A row is a stored row p holding, per chunk of V inputs, the segment of output row
// 2p + rowsel[p, chunk]. Each thread keeps an even-row and an odd-row accumulator bank; the MMAs always
// accumulate into bank 0, and at each chunk start the two banks are swapped (masked XOR,
// exact) where the chunk's rowsel bit differs from the row bank 0 holds (select_banks). The row-pair
// resolution never leaves registers.
//
// Work split of one split-K CTA (WARPS warps, reduced through shared memory in a fixed order):
//
//      k-steps:  | blk0 | blk1 | blk2 | blk3 | blk4 | ... |      blk = KB consecutive k-steps of 32
//      warp:        w0     w1     w2    ...    w0     ...        warp w takes blocks w, w + WARPS, ...
//   Each warp issues all loads of a block (A, metadata, B) before its MMAs, so every warp keeps
//   KB * G * 512 bytes of weights in flight; many CTAs per SM hide the rest of the latency (decode is
//   bound by weight bytes; see docs/PERFORMANCE.md).
//
// Requirements: K % 32 == 0; stored rows per group % 16 == 0 (the Python side checks and otherwise uses
// the exact reference). bf16 or fp16 activations and weights, fp32 accumulation. Not supported here:
// Hopper wgmma.sp/TMA (separate prefill path), fp8.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace samoyeds {

template <typename T>
struct MmaTraits;

template <>
struct MmaTraits<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

template <>
struct MmaTraits<__half> {
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
};

// d = A_sparse(16x32, 2:4) * B(32x8) + c. ordered_metadata: positions in a pair are ascending, which the
// canonical format guarantees; ptxas prefers it over plain .sp on sm_80+.
template <typename T>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint4& a, const uint32_t (&b)[4],
                                             const float (&c)[4], uint32_t meta);

template <>
__device__ __forceinline__ void mma_sp_16832<__nv_bfloat16>(float (&d)[4], const uint4& a, const uint32_t (&b)[4],
                                                            const float (&c)[4], uint32_t meta) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%12,%13,%14,%15}, %16, 0x0;\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "f"(c[0]),
        "f"(c[1]), "f"(c[2]), "f"(c[3]), "r"(meta));
}

template <>
__device__ __forceinline__ void mma_sp_16832<__half>(float (&d)[4], const uint4& a, const uint32_t (&b)[4],
                                                     const float (&c)[4], uint32_t meta) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%12,%13,%14,%15}, %16, 0x0;\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "f"(c[0]),
        "f"(c[1]), "f"(c[2]), "f"(c[3]), "r"(meta));
}

// d = A(16x16) * B(16x8) + c, dense: the fusion control (moe_dense_prepacked) runs the same pipeline with
// dense weights, two of these per 32-wide k-step.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// Weights are read exactly once per token tile: stream them past L1 (no_allocate) so the gathered
// activations, which every m-tile re-reads, keep L1 for themselves.
__device__ __forceinline__ uint4 load_streaming(const uint4* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

__device__ __forceinline__ float silu(float v) { return v / (1.0f + __expf(-v)); }

// ---------------------------------------------------------------------------------------------------------
// 1. Routing plan. One CTA; shared memory: 3 * E + 1 ints.
// ---------------------------------------------------------------------------------------------------------
template <typename IdT>
__global__ void moe_prepare_kernel(const IdT* __restrict__ topk_ids,       // [T*k] global expert ids
                                   int num_pairs,                          // T*k
                                   const int32_t* __restrict__ expert_map, // [map_len] global->local or null
                                   int map_len, int num_experts,           // E_local
                                   int tile_rows,                          // BN tokens per tile
                                   int max_tiles,
                                   int32_t* __restrict__ pair_expert,      // [T*k] local expert or -1
                                   int32_t* __restrict__ sorted_pairs,     // [max_tiles*BN] pair or -1
                                   int32_t* __restrict__ tile_expert,      // [max_tiles] expert or -1
                                   int32_t* __restrict__ num_tiles) {      // [1]
  extern __shared__ int smem[];
  int* counts = smem;                    // [E]
  int* fill = smem + num_experts;        // [E]
  int* tile_off = smem + 2 * num_experts;  // [E + 1]
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    counts[e] = 0;
    fill[e] = 0;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_pairs; i += blockDim.x) {
    long long e = static_cast<long long>(topk_ids[i]);
    if (expert_map != nullptr) e = (e >= 0 && e < map_len) ? expert_map[e] : -1;
    if (e < 0 || e >= num_experts) e = -1;  // another rank's expert (or an invalid id): contributes nothing
    pair_expert[i] = static_cast<int32_t>(e);
    if (e >= 0) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // exclusive scan of tiles per expert by one warp: lane l owns a run of experts
    const int lane = threadIdx.x, per = (num_experts + 31) / 32;
    const int e0 = min(lane * per, num_experts), e1 = min(e0 + per, num_experts);
    int mine = 0;
    for (int e = e0; e < e1; ++e) mine += (counts[e] + tile_rows - 1) / tile_rows;
    int incl = mine;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    int off = incl - mine;
    for (int e = e0; e < e1; ++e) {
      tile_off[e] = off;
      off += (counts[e] + tile_rows - 1) / tile_rows;
    }
    if (lane == 31) {
      tile_off[num_experts] = incl;
      *num_tiles = incl;
    }
  }
  __syncthreads();
  const int total = tile_off[num_experts];
  for (int tile = threadIdx.x; tile < max_tiles; tile += blockDim.x) {
    int owner = -1;
    if (tile < total) {  // binary search: last e with tile_off[e] <= tile
      int lo = 0, hi = num_experts - 1;
      while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (tile_off[mid] <= tile) lo = mid; else hi = mid - 1;
      }
      owner = lo;
    }
    tile_expert[tile] = owner;
  }
  for (int r = threadIdx.x; r < max_tiles * tile_rows; r += blockDim.x) sorted_pairs[r] = -1;
  __syncthreads();
  for (int i = threadIdx.x; i < num_pairs; i += blockDim.x) {
    int e = pair_expert[i];
    if (e >= 0) sorted_pairs[tile_off[e] * tile_rows + atomicAdd(&fill[e], 1)] = i;
  }
}

// The A operand of KB consecutive k-steps for the G groups of one m-tile: one 16-byte value load and one
// metadata word per lane and (k-step, group). Kernels keep two of these and load block b+1 while the
// tensor cores work on block b, so each warp always has a block of weights in flight.
template <int KB, int G>
struct WeightBlock {
  uint4 a[KB][G];
  uint32_t meta[KB][G];
};

template <int KB, int G>
__device__ __forceinline__ void load_weight_block(WeightBlock<KB, G>& w, const uint4* __restrict__ a_base,
                                                  const uint32_t* __restrict__ m_base, int blk, int S) {
#pragma unroll
  for (int kk = 0; kk < KB; ++kk) {
    const int s = blk * KB + kk;
    if (s < S) {
#pragma unroll
      for (int gr = 0; gr < G; ++gr) {
        w.a[kk][gr] = load_streaming(a_base + (static_cast<long long>(gr) * S + s) * 32);
        w.meta[kk][gr] = __ldg(m_base + (static_cast<long long>(gr) * S + s) * 16);
      }
    }
  }
}

// 1:2:V+2:4 row-pair resolution ("bank swap"). A stored row p holds, per chunk of V inputs, a segment of
// output row 2p or 2p + 1 (its rowsel bit). Each thread keeps two accumulator banks per (group, n-tile,
// row half): bank 0 is the one the MMAs accumulate into, bank 1 the other output row of the pair, and
// state[gr][h] records which output row bank 0 currently holds (0 = even, 1 = odd). Before the first k-step
// of every chunk (and of every contiguous run of k-steps a warp owns) the banks are swapped where the chunk's
// bit differs from the state: an XOR swap under a mask, exact (bit moves only, no arithmetic on the values),
// so the row-pair selection costs 1.5 instructions per accumulator and chunk and never leaves registers.
// IN_PLACE: one asm statement reads and writes both registers of a pair, so they keep their registers (the
// wgmma.sp w2 kernel: otherwise ptxas moves the wgmma accumulators around the loop and serialises the wgmmas).
template <int G, int NT, bool IN_PLACE = false>
__device__ __forceinline__ void select_banks(float (&acc)[2][G][NT][4], bool (&state)[G][2],
                                             const bool (&want)[G][2], int nt_active = NT) {
#pragma unroll
  for (int gr = 0; gr < G; ++gr) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // Masked XOR swap: x = (a ^ b) & mask, a ^= x, b ^= x; three LOP3 per pair, in place. (Written as C++
      // the compiler turns the mask into a predicate and emits XOR + SEL + 2 XOR, or 2 FSEL + MOV.)
      const uint32_t mask = 0u - static_cast<uint32_t>(want[gr][h] != state[gr][h]);
      state[gr][h] = want[gr][h];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (nt < nt_active) {  // n-tiles without tokens hold zeros in both banks: nothing to swap
#pragma unroll
          for (int r = 2 * h; r < 2 * h + 2; ++r) {  // rows g (regs 0, 1) and g + 8 (regs 2, 3)
            if constexpr (IN_PLACE) {
              asm("{\n .reg .b32 x;\n lop3.b32 x, %0, %1, %2, 0x28;\n xor.b32 %0, %0, x;\n xor.b32 %1, %1, x;\n}"
                  : "+f"(acc[0][gr][nt][r]), "+f"(acc[1][gr][nt][r])
                  : "r"(mask));
            } else {
              uint32_t a = __float_as_uint(acc[0][gr][nt][r]), b = __float_as_uint(acc[1][gr][nt][r]), x;
              asm("lop3.b32 %0, %1, %2, %3, 0x28;" : "=r"(x) : "r"(a), "r"(b), "r"(mask));  // (a ^ b) & mask
              acc[0][gr][nt][r] = __uint_as_float(a ^ x);
              acc[1][gr][nt][r] = __uint_as_float(b ^ x);
            }
          }
        }
      }
    }
  }
}

// The row selections of a warp's NS streams (rows g and g + 8 of each) for the pipelined kernels,
// loaded one chunk ahead so their latency hides behind a chunk of MMAs. Stream gr's byte of row half h and
// chunk c is base[c + gr * stream_stride + h * half_stride]; a stream with ok[gr] false reads as 0 (ok = nullptr:
// every stream is read).
template <int NS>
struct RowPairPrefetch {
  const uint8_t* base = nullptr;
  int stream_stride = 0, half_stride = 0;
  uint8_t next[NS][2] = {};
  // Rows g and g + 8 from rowsel row first_row on (stream gr: stream_rows rows further per stream), chunks per
  // row; loads the first chunk of the caller's run of k-steps [run_begin, run_end).
  __device__ __forceinline__ void begin(const uint8_t* rowsel, long long first_row, int stream_rows, int chunks,
                                        int run_begin, int run_end, int chunk_shift, const bool* ok) {
    base = rowsel + first_row * chunks;
    stream_stride = stream_rows * chunks;
    half_stride = 8 * chunks;
    if (run_begin < run_end) load(run_begin >> chunk_shift, ok);
  }
  __device__ __forceinline__ void load(int chunk, const bool* ok) {
    const uint8_t* p = base + chunk;
#pragma unroll
    for (int gr = 0; gr < NS; ++gr)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        next[gr][h] = (ok == nullptr || ok[gr]) ? __ldg(p + (gr * stream_stride + h * half_stride)) : 0;
  }
  // At k-step s, the first of a chunk (or of the caller's run of k-steps, ending at run_end): swap the banks to
  // the chunk's selection and prefetch the next chunk's. The accumulators must be settled (wgmma: waited for).
  template <int NT, bool IN_PLACE = false>
  __device__ __forceinline__ void enter_chunk(float (&acc)[2][NS][NT][4], bool (&state)[NS][2], int s,
                                              int chunk_shift, int run_end, const bool* ok, int nt_active) {
    bool want[NS][2];
#pragma unroll
    for (int gr = 0; gr < NS; ++gr)
#pragma unroll
      for (int h = 0; h < 2; ++h) want[gr][h] = next[gr][h] != 0;
    select_banks<NS, NT, IN_PLACE>(acc, state, want, nt_active);
    const int chunk = (s >> chunk_shift) + 1;
    if ((chunk << chunk_shift) < run_end) load(chunk, ok);
  }
};

// The row selections of a warp's NS streams, one row each (the EXPAND kernels), D chunks ahead: a ring of D bytes
// per stream (V = 32 starts a chunk at every k-step, too soon for a load one chunk ahead under a weight stream).
template <int NS, int D>
struct RowSelRing {
  const uint8_t* base = nullptr;
  int stream_stride = 0, run_end = 0, chunk_shift = 0;
  uint8_t ring[NS][D] = {};
  // Stream gr's byte of chunk c is rowsel[(first_row + gr * stream_rows) * chunks + c]; the caller's k-steps are
  // [run_begin, run_end).
  __device__ __forceinline__ void begin(const uint8_t* rowsel, long long first_row, int stream_rows, int chunks,
                                        int run_begin, int run_end_, int chunk_shift_) {
    base = rowsel + first_row * chunks;
    stream_stride = stream_rows * chunks;
    run_end = run_end_;
    chunk_shift = chunk_shift_;
    const int c0 = run_begin >> chunk_shift;
#pragma unroll
    for (int i = 0; i < D; ++i) load(i, c0 + i);
  }
  __device__ __forceinline__ void load(int i, int chunk) {
    if ((chunk << chunk_shift) < run_end) {
#pragma unroll
      for (int gr = 0; gr < NS; ++gr) ring[gr][i] = __ldg(base + gr * stream_stride + chunk);
    }
  }
  // At k-step s, a chunk start (or the run's first k-step): odd[gr] = the chunk keeps the odd row of stream gr's
  // pair; then the ring moves on by one chunk.
  __device__ __forceinline__ void take(int s, bool (&odd)[NS]) {
#pragma unroll
    for (int gr = 0; gr < NS; ++gr) {
      odd[gr] = ring[gr][0] != 0;
#pragma unroll
      for (int i = 0; i + 1 < D; ++i) ring[gr][i] = ring[gr][i + 1];
    }
    load(D - 1, (s >> chunk_shift) + D);
  }
};

// 1:2:V+2:4 row pairs expanded in registers (EXPAND: the wgmma.sp kernels for V = 32, see moe_dual_sparse.cu).
// Two warps share a stored m-tile: warp half h takes its stored rows 8h..8h+7 (pairs P = 16 mt + 8h + g) and
// builds from each k-step's stored A fragment a fragment of 16 *output* rows, row g = even row 2P and row g + 8 =
// odd row 2P + 1; the row of the pair that the chunk does not keep gets zero values and valid dummy metadata
// (positions 0, 1 of every group). The accumulators are then output rows as for 2:4: no banks, no swaps, no
// drained pipeline at chunk starts, for twice the MMAs per stored byte. (On the mma.sp kernels that doubling made
// it 1.65x slower at decode, acb84af.)
struct ExpandedPair {
  uint32_t keep_odd = 0;        // all ones where the chunk keeps the odd row of the pair
  uint32_t meta_sel = 0x5410u;  // byte_perm selector: the stored metadata to the even (low) or odd (high) half
  __device__ __forceinline__ void set(bool odd) {
    keep_odd = 0u - static_cast<uint32_t>(odd);
    meta_sel = odd ? 0x1054u : 0x5410u;
  }
  // lo, hi: this lane's stored values of its pair (cols 2t, 2t+1 and 2t+8, 2t+9); m16: the pair's metadata bits
  // of this lane's half of the k-step (selector 0 layout, see the operand description at the top).
  __device__ __forceinline__ void expand(uint4& a, uint32_t& meta, uint32_t lo, uint32_t hi, uint32_t m16) const {
    a.x = lo & ~keep_odd;  // row g (even): cols 2t, 2t+1
    a.y = lo & keep_odd;   // row g + 8 (odd)
    a.z = hi & ~keep_odd;  // row g: cols 2t+8, 2t+9
    a.w = hi & keep_odd;
    meta = __byte_perm(m16, 0x44444444u, meta_sel);
  }
};

// Epilogue of an EXPAND warp: accumulator rows g / g + 8 are the even / odd output rows of pair
// P = 16 mt + 8 half + g, adjacent features, stored together (two T for w13, G = 2; a float2 for w2, G = 1).
template <typename T, int G, int NT>
__device__ __forceinline__ void store_epilogue_expanded(const float (&acc)[1][G][NT][4], int nt_active, int col0,
                                                        int mt, int half, int g, int t,
                                                        const int32_t* __restrict__ sorted_pairs,
                                                        const float* __restrict__ topk_weights, void* __restrict__ out,
                                                        int out_ld) {
  const int pair_row = mt * 16 + 8 * half + g;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if (nt >= nt_active) break;
#pragma unroll
    for (int c = 0; c < 2; ++c) {  // token columns 2t, 2t + 1: registers c (even row) and c + 2 (odd row)
      const int col = col0 + nt * 8 + 2 * t + c;
      if constexpr (G == 2) {
        uint32_t packed;
        T* two = reinterpret_cast<T*>(&packed);
        two[0] = MmaTraits<T>::from_float(silu(acc[0][0][nt][c]) * acc[0][1][nt][c]);
        two[1] = MmaTraits<T>::from_float(silu(acc[0][0][nt][c + 2]) * acc[0][1][nt][c + 2]);
        *reinterpret_cast<uint32_t*>(static_cast<T*>(out) + static_cast<long long>(col) * out_ld + 2 * pair_row) =
            packed;
      } else {
        const int pair = sorted_pairs[col];
        if (pair < 0) continue;
        const float w = topk_weights[pair];
        *reinterpret_cast<float2*>(static_cast<float*>(out) + static_cast<long long>(pair) * out_ld + 2 * pair_row) =
            make_float2(acc[0][0][nt][c] * w, acc[0][0][nt][c + 2] * w);
      }
    }
  }
}

// One k-step of one warp: acc[0][gr][nt] += A[gr] * B[nt] for every group and the first nt_active n-tiles
// (nt_active is uniform across the warp; n-tiles beyond it hold only padding rows).
template <typename T, int G, int NT, int BANKS>
__device__ __forceinline__ void mma_kstep(float (&acc)[BANKS][G][NT][4], const uint4 (&a)[G],
                                          const uint32_t (&meta)[G], const uint32_t (&b)[NT][4],
                                          int nt_active) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if (nt < nt_active) {
#pragma unroll
      for (int gr = 0; gr < G; ++gr) mma_sp_16832<T>(acc[0][gr][nt], a[gr], b[nt], acc[0][gr][nt], meta[gr]);
    }
  }
}

// Epilogue of one warp's m-tile. Output feature of stored row (g + 8h) of m-tile mt:
//   2:4: o = mt*16 + g + 8h (bank 0);  1:2:V+2:4: even row o = 2 * (mt*16 + g + 8h) and odd row o + 1, held
//   by bank state[gr][h] ^ 1 and bank state[gr][h] respectively (see select_banks).
//   G = 2: out = intermediate row (tile row), value silu(gate) * up.
//   G = 1: out = fp32 slot_out row of the (token, slot) pair, value acc * routing weight; padding rows skipped.
// G = 1 with NS = 2 streams (pipelined w2): streams s < streams are m-tiles mt + s.
// The warp's n-tiles start at token row col0 of the tiled layout; only its first nt_active n-tiles are written
// (later intermediate rows are padding, never read by w2).
template <typename T, int G, int NS, int NT, bool SAMOYEDS>
__device__ __forceinline__ void store_epilogue(const float (&acc)[SAMOYEDS ? 2 : 1][NS][NT][4],
                                               const bool (&state)[NS][2], int nt_active, int col0, int mt,
                                               int streams, int g, int t, const int32_t* __restrict__ sorted_pairs,
                                               const float* __restrict__ topk_weights, void* __restrict__ out,
                                               int out_ld) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if (nt >= nt_active) break;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int col = col0 + nt * 8 + 2 * t + (r & 1);
      const int stored = mt * 16 + g + 8 * (r >> 1);
      // value of group gr for output row parity b
      auto value = [&](int gr, int b) -> float {
        if constexpr (SAMOYEDS) {
          const float bank0 = acc[0][gr][nt][r], bank1 = acc[1][gr][nt][r];
          return (state[gr][r >> 1] == (b != 0)) ? bank0 : bank1;
        } else {
          return acc[0][gr][nt][r];
        }
      };
      if constexpr (G == 2) {
        T* dst = static_cast<T*>(out) + static_cast<long long>(col) * out_ld;
#pragma unroll
        for (int b = 0; b < (SAMOYEDS ? 2 : 1); ++b)
          dst[SAMOYEDS ? 2 * stored + b : stored] = MmaTraits<T>::from_float(silu(value(0, b)) * value(1, b));
      } else {
        const int pair = sorted_pairs[col];
        if (pair < 0) continue;
        const float w = topk_weights[pair];
        float* dst = static_cast<float*>(out) + static_cast<long long>(pair) * out_ld;
#pragma unroll
        for (int sm = 0; sm < NS; ++sm) {
          if (sm >= streams) break;
          const int row = stored + 16 * sm;  // stored row of m-tile mt + sm
          if constexpr (SAMOYEDS) {
            *reinterpret_cast<float2*>(dst + 2 * row) = make_float2(value(sm, 0) * w, value(sm, 1) * w);
          } else {
            dst[row] = value(sm, 0) * w;
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// 2./3. Grouped sparse GEMM with fused epilogue.
//   G = 2: w13 stage (gate + up groups, SwiGLU epilogue, writes the intermediate).
//   G = 1: w2 stage (routing-weight epilogue, writes slot_out rows).
// ---------------------------------------------------------------------------------------------------------
template <typename T, int G, int NT, int WARPS, int KB, bool SAMOYEDS>
__global__ void __launch_bounds__(WARPS * 32)
moe_mma_sp_kernel(const T* __restrict__ act,            // G=2: x [T, K]; G=1: intermediate [tiles*BN, K]
                  const uint4* __restrict__ kvalues,    // [E, MT, G, S, 32] (8 values per lane)
                  const uint32_t* __restrict__ kmeta,   // [E, MT, G, S, 16]
                  const uint8_t* __restrict__ rowsel,   // [E, G*MT*16, K/V] (SAMOYEDS only)
                  const int32_t* __restrict__ sorted_pairs,  // [max_tiles*BN]
                  const int32_t* __restrict__ tile_expert,   // [max_tiles]
                  const int32_t* __restrict__ num_tiles,     // [1]
                  const float* __restrict__ topk_weights,    // [T*k] (G=1 only)
                  void* __restrict__ out,  // G=2: intermediate T [tiles*BN, out_ld]; G=1: slot_out fp32 [T*k, out_ld]
                  int K,                // reduction length (H for w13, I for w2)
                  int num_mtiles,       // MT: m-tiles of 16 stored rows per group
                  int chunk_shift,      // log2(V / 32) (SAMOYEDS; V is a power of two)
                  int topk,             // k
                  int out_ld,           // output features (I for w13, H for w2)
                  int /*num_pairs*/) {  // (uniform signature with the pipelined kernel; no K splits here)
  constexpr int BN = NT * 8;
  constexpr int BANKS = SAMOYEDS ? 2 : 1;
  constexpr int NACC = BANKS * G * NT * 4;
  const int tile = blockIdx.x;
  if (tile >= *num_tiles) return;
  const int mt = blockIdx.y;
  const int expert = tile_expert[tile];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int S = K >> 5;

  // Rows of B this thread reads: column g of every n-tile.
  const T* brow[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int r = tile * BN + nt * 8 + g;
    const int pair = sorted_pairs[r];
    const long long src = (G == 2) ? static_cast<long long>(pair / topk) : static_cast<long long>(r);
    brow[nt] = pair >= 0 ? act + src * K + 2 * t : nullptr;
  }

  float acc[BANKS][G][NT][4];
#pragma unroll
  for (int b = 0; b < BANKS; ++b)
#pragma unroll
    for (int gr = 0; gr < G; ++gr)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[b][gr][nt][r] = 0.f;
  bool state[G][2] = {};  // 1:2:V+2:4: output row parity bank 0 holds (see select_banks)

  const long long tile_base = (static_cast<long long>(expert) * num_mtiles + mt) * G;  // (e, mt, grp=0)
  const uint4* a_base = kvalues + tile_base * S * 32 + lane;
  const uint32_t* m_base = kmeta + tile_base * S * 16 + 2 * g + (t & 1);
  const int rows_per_group = num_mtiles * 16;
  const int chunks = SAMOYEDS ? S >> chunk_shift : 1;
  const uint8_t* rs_base[G][2] = {};
  if constexpr (SAMOYEDS) {
#pragma unroll
    for (int gr = 0; gr < G; ++gr)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        rs_base[gr][h] = rowsel + (static_cast<long long>(expert) * G * rows_per_group + gr * rows_per_group +
                                   mt * 16 + g + 8 * h) * chunks;
  }

  // Blocks of this warp: warp, warp + WARPS, ...; a block is a contiguous run of KB k-steps.
  auto consume = [&](const WeightBlock<KB, G>& w, int blk) {
    uint32_t bfrag[KB][NT][4];
    bool want[KB][G][2] = {};
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) {
      const int s = blk * KB + kk;
      if (s < S) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            bfrag[kk][nt][i] =
                brow[nt] ? __ldg(reinterpret_cast<const uint32_t*>(brow[nt] + s * 32 + 8 * i)) : 0u;
        if constexpr (SAMOYEDS) {
          if (kk == 0 || (s & ((1 << chunk_shift) - 1)) == 0) {  // only chunk starts read their row selection
#pragma unroll
            for (int gr = 0; gr < G; ++gr)
#pragma unroll
              for (int h = 0; h < 2; ++h) want[kk][gr][h] = __ldg(rs_base[gr][h] + (s >> chunk_shift)) != 0;
          }
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) {
      const int s = blk * KB + kk;
      if (s >= S) break;
      if constexpr (SAMOYEDS) {
        if (kk == 0 || (s & ((1 << chunk_shift) - 1)) == 0) select_banks<G, NT>(acc, state, want[kk]);
      }
      mma_kstep<T, G, NT, BANKS>(acc, w.a[kk], w.meta[kk], bfrag[kk], NT);
    }
  };
  // Measured on H200: double-buffering the weights here raised registers to 171 (one CTA per SM) and ran
  // 1.4x slower at 1-8 tokens; a single block per warp with 8 warps per CTA keeps more bytes in flight.
  const int nblk = (S + KB - 1) / KB;
  for (int blk = warp; blk < nblk; blk += WARPS) {
    WeightBlock<KB, G> w;
    load_weight_block<KB, G>(w, a_base, m_base, blk, S);
    consume(w, blk);
  }
  if constexpr (SAMOYEDS) {  // every warp brings bank 0 to even rows, so the banks add up element-wise
    const bool even[G][2] = {};
    select_banks<G, NT>(acc, state, even);
  }

  // Split-K reduction across the CTA's warps (fixed order: deterministic).
  if constexpr (WARPS > 1) {
    __shared__ float red[WARPS - 1][NACC][32];
    float* flat = &acc[0][0][0][0];
    if (warp > 0) {
#pragma unroll
      for (int i = 0; i < NACC; ++i) red[warp - 1][i][lane] = flat[i];
    }
    __syncthreads();
    if (warp > 0) return;
    for (int w = 0; w < WARPS - 1; ++w)
#pragma unroll
      for (int i = 0; i < NACC; ++i) flat[i] += red[w][i][lane];
  }

  store_epilogue<T, G, G, NT, SAMOYEDS>(acc, state, NT, tile * BN, mt, 1, g, t, sorted_pairs, topk_weights, out,
                                        out_ld);
}

// ---------------------------------------------------------------------------------------------------------
// 2./3. (wider token tiles) Pipelined M-split variant: used when an expert receives more than ~8 pairs.
//
// With split-K every m-tile's CTA re-reads the whole token tile from L2, which costs BN/16 (2:4) to BN/8
// (samoyeds) times the weight bytes: fine for BN = 8, ruinous beyond. Here each warp owns one m-tile (its G
// groups) over the full K, and the CTA's warps share the token tile. Weights, metadata and tokens all move
// with cp.async into a STAGES-deep shared-memory ring, so STAGES-1 k-blocks are always in flight:
//
//   k-block:      b        b+1      b+2          (STAGES = 3)
//   ring slot:  [ MMA ] [ landing ] [ landing ]  <- cp.async issued STAGES-1 blocks ahead
//   per slot:   tokens [BN x 32*KB] (rows padded by 16 B: conflict-free B reads)
//               weights [WARPS][KB][NS][32 lanes] x 16 B,  metadata [WARPS][KB][NS][16] x 4 B
//               (NS A streams per warp, kernel_streams: w13 gate + up of one m-tile, 64-token 2:4 w2 two
//               m-tiles)
// ---------------------------------------------------------------------------------------------------------
// Shared-memory access by 32-bit shared-window address: every ring address of a thread is one base register
// plus a compile-time offset (k-step, n-tile, copy) and one add per k-block for the ring slot.
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
__device__ __forceinline__ uint4 lds_128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds_32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds_u8(uint32_t addr) {
  uint16_t v;
  asm volatile("ld.shared.u8 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds_u16(uint32_t addr) {
  uint16_t v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}
// 16-byte global -> shared copy, issued only where pred (a predicated instruction, not a branch).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred = true) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p cp.async.cg.shared.global [%0], [%1], 16;\n}\n" ::"r"(dst),
      "l"(src), "r"(static_cast<int>(pred)));
}
// 4-byte global -> shared copy (both addresses 4-byte aligned), issued only where pred.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool pred = true) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p cp.async.ca.shared.global [%0], [%1], 4;\n}\n" ::"r"(dst),
      "l"(src), "r"(static_cast<int>(pred)));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// Four 8x8 b16 matrices from shared memory; lane l supplies the address of row l % 8 of matrix l / 8 and
// receives, in register i, elements (row l / 4, cols 2(l % 4), +1) of matrix i: for rows = tokens and
// matrix i = k offset 8i that is exactly the B fragment b_i of mma.m16n8k32.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Shared-memory ring of moe_mma_sp_pipelined_kernel, in bytes. Per stage:
//   weights  [WARPS][KB][NS][AV][32 lanes] x 16 B   (AV = 2 16-byte vectors per lane for the dense control)
//   metadata [WARPS][KB][NS][16] x 4 B             (sparse only)
//   tokens   [BN][32 * KB + 8] x sizeof(T)         (rows padded by 16 B: conflict-free ldmatrix)
template <typename T, int NS, int NT, int WARPS, int KB, bool DENSE>
struct PipeSmem {
  static constexpr int kAV = DENSE ? 2 : 1;
  static constexpr int kLD = 32 * KB + 8;  // token row, elements
  static constexpr uint32_t kAWarp = KB * NS * kAV * 32 * 16;
  static constexpr uint32_t kMWarp = DENSE ? 0 : KB * NS * 16 * 4;
  static constexpr uint32_t kAStage = WARPS * kAWarp;
  static constexpr uint32_t kMStage = WARPS * kMWarp;
  static constexpr uint32_t kBStage = NT * 8 * kLD * sizeof(T);
  static constexpr uint32_t kRow = kLD * sizeof(T);
  template <int STAGES>
  static constexpr uint32_t bytes() {
    return STAGES * (kAStage + kMStage + kBStage);
  }
};

// A streams a warp of the pipelined kernel multiplies with each token fragment: the G = 2 groups of its m-tile
// (w13: gate and up rows, SwiGLU in the epilogue), or for the 64-token 2:4 w2 (G = 1) two adjacent m-tiles, so
// every ldmatrix of tokens feeds two MMAs there too. Only there: on narrower tiles and on 1:2:V+2:4 halving
// w2's CTAs cost more than the saved ldmatrix traffic (H200, kernel_tuning_*.json).
#ifndef SAMOYEDS_W2_STREAMS  // build-time override for A/B runs (1 = one m-tile per warp in every w2)
#define SAMOYEDS_W2_STREAMS 2
#endif
template <int G, int NT, bool SAMOYEDS, bool DENSE>
__host__ __device__ constexpr int kernel_streams() {
  return (G == 1 && NT == 8 && !SAMOYEDS && !DENSE) ? SAMOYEDS_W2_STREAMS : G;
}

// K split z of splits (w2 only) owns k-blocks [x, y) of total_blk.
template <typename I>
__device__ __forceinline__ int2 split_blocks(int total_blk, I z, I splits) {
  return make_int2(static_cast<int>(static_cast<long long>(total_blk) * z / splits),
                   static_cast<int>(static_cast<long long>(total_blk) * (z + 1) / splits));
}
// The pipelined kernels: split blockIdx.z of gridDim.z.
__device__ __forceinline__ int2 k_split_blocks(int total_blk) { return split_blocks(total_blk, blockIdx.z, gridDim.z); }

// Block-wide (one barrier): rows[i] = the activation row of the tile's i-th pair (x row token for w13, G = 2;
// intermediate row for w2), nullptr for padding; returns the n-tiles of 8 that hold tokens (a tile's pairs fill
// its first rows, moe_prepare_kernel).
template <typename T, int BN, int G>
__device__ __forceinline__ int gather_tile_rows(const T* act, const int32_t* __restrict__ sorted_pairs, int tile,
                                                int topk, int K, const T** rows) {
  bool valid = false;
  if (threadIdx.x < BN) {
    const int r = tile * BN + threadIdx.x;
    const int pair = sorted_pairs[r];
    const long long src = (G == 2) ? static_cast<long long>(pair / topk) : static_cast<long long>(r);
    valid = pair >= 0;
    rows[threadIdx.x] = valid ? act + src * K : nullptr;
  }
  return (__syncthreads_count(valid) + 7) >> 3;
}

// Bytes of dynamic shared memory moe_mma_sp_pipelined_kernel needs.
template <typename T, int G, int NT, int WARPS, int KB, int STAGES, bool SAMOYEDS, bool DENSE = false>
constexpr int pipelined_smem_bytes() {
  constexpr int NS = kernel_streams<G, NT, SAMOYEDS, DENSE>();
  return static_cast<int>(PipeSmem<T, NS, NT, WARPS, KB, DENSE>::template bytes<STAGES>());
}

// Below sm_90 ptxas capped the 2:4 w2 kernel (8 warps, 64-token tile) at 64 registers with an 8-byte spill unless
// told that one CTA per SM is acceptable; the sm_90a build (the one measured) keeps ptxas's own choice.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define SAMOYEDS_PIPELINED_MIN_BLOCKS , 1
#else
#define SAMOYEDS_PIPELINED_MIN_BLOCKS
#endif
template <typename T, int G, int NT, int WARPS, int KB, int STAGES, bool SAMOYEDS, bool DENSE = false>
__global__ void __launch_bounds__(WARPS * 32 SAMOYEDS_PIPELINED_MIN_BLOCKS)
moe_mma_sp_pipelined_kernel(const T* __restrict__ act, const uint4* __restrict__ kvalues,
                            const uint32_t* __restrict__ kmeta, const uint8_t* __restrict__ rowsel,
                            const int32_t* __restrict__ sorted_pairs, const int32_t* __restrict__ tile_expert,
                            const int32_t* __restrict__ num_tiles, const float* __restrict__ topk_weights,
                            void* __restrict__ out, int K, int num_mtiles, int chunk_shift, int topk, int out_ld,
                            int num_pairs) {  // G=1: slot_out is [gridDim.z, num_pairs, out_ld]
  constexpr int NS = kernel_streams<G, NT, SAMOYEDS, DENSE>();  // A streams per warp (see kernel_streams)
  constexpr int MPW = NS / G;                      // m-tiles per warp
  using L = PipeSmem<T, NS, NT, WARPS, KB, DENSE>;
  constexpr int BN = NT * 8;
  static_assert(WARPS * 32 >= BN && KB >= 1 && STAGES >= 2, "pipeline shape: the token-row table needs a thread "
                "per row, a stage at least one k-step, the ring two stages");
  constexpr int KBLK = 32 * KB;  // k per stage
  constexpr int AV = L::kAV;
  constexpr int THREADS = WARPS * 32;
  constexpr int CHUNKS_PER_ROW = KBLK / 8;  // 16-byte token chunks per row and stage
  static_assert(THREADS % CHUNKS_PER_ROW == 0, "a thread copies the same column of every row it owns");
  constexpr int ROWS_PER_PASS = THREADS / CHUNKS_PER_ROW;
  constexpr int TOKEN_COPIES = (BN + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
  // Dynamic shared memory (PipeSmem): the ring is larger than the 48 KB static limit.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr uint32_t M_OFF = STAGES * L::kAStage, B_OFF = M_OFF + STAGES * L::kMStage;
  __shared__ const T* rows[BN];
  const int tile = blockIdx.x;
  if (tile >= *num_tiles) return;  // uniform across the CTA
  const int expert = tile_expert[tile];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int mt = (blockIdx.y * WARPS + warp) * MPW;  // the warp's (first) m-tile
  const bool active = mt < num_mtiles;
  // w2 with two m-tiles per warp: the last warp may own one only (never for today's shapes: H / 16 is even);
  // otherwise every stream is the warp's own
  const int streams = NS == G ? NS : min(NS, num_mtiles - mt);
  const int S = K >> 5;
  const int2 blk_range = k_split_blocks((S + KB - 1) / KB);  // K split z (w2 only): k-blocks [x, y)
  const int blk_begin = blk_range.x, blk_end = blk_range.y;
  const int nblk = blk_end - blk_begin;
  // Only the first nt_active n-tiles hold tokens: the rest are neither loaded nor multiplied (a tile sized for
  // the busiest expert costs the others nothing).
  const int nt_active = gather_tile_rows<T, BN, G>(act, sorted_pairs, tile, topk, K, rows);
  const int load_rows = nt_active * 8;

  // Ring addresses of this thread (stage 0; stage st adds st * stage bytes):
  const uint32_t smem = smem_addr(smem_raw);
  const uint32_t a_sm = smem + warp * L::kAWarp + lane * 16;  // the warp's A vectors (copied and read)
  const uint32_t m_sm_w = smem + M_OFF + warp * L::kMWarp + (lane & 3) * 16;  // lanes 0..3 copy 16 B each
  const uint32_t m_sm_r = smem + M_OFF + warp * L::kMWarp + (2 * g + (t & 1)) * 4;  // entry 2g + (t & 1)
  // ldmatrix.x4 source of this lane: matrix i = lane / 8 (k offset 8i), row lane % 8 (token) of an n-tile.
  const uint32_t b_sm_r = smem + B_OFF + (lane & 7) * L::kRow + 8 * (lane >> 3) * sizeof(T);

  // Token rows this thread copies each stage: column tok_col of rows first_row + i * ROWS_PER_PASS (fixed for
  // the whole K loop). Padding rows of active n-tiles are not loaded: an MMA column depends only on its own B
  // column, so whatever a padding column holds reaches only padding outputs, which no epilogue stores.
  const int first_row = threadIdx.x / CHUNKS_PER_ROW, tok_col = (threadIdx.x % CHUNKS_PER_ROW) * 8;
  const uint32_t b_sm_w = smem + B_OFF + first_row * L::kRow + tok_col * sizeof(T);
  const T* tok_src[TOKEN_COPIES];
  bool tok_ok[TOKEN_COPIES];
#pragma unroll
  for (int i = 0; i < TOKEN_COPIES; ++i) {
    const int row = first_row + i * ROWS_PER_PASS;
    tok_ok[i] = row < load_rows && rows[row] != nullptr;
    tok_src[i] = (tok_ok[i] ? rows[row] : act) + tok_col;  // never dereferenced unless tok_ok
  }
  // Stream s is group s of m-tile mt (G = 2) or m-tile mt + s (G = 1): layout index (expert * MT + mt) * G + s.
  const long long tile_base = (static_cast<long long>(expert) * num_mtiles + (active ? mt : 0)) * G;
  const uint4* a_grp[NS];
  const uint4* m_grp[NS];  // metadata as 16-byte vectors: 4 per (stream, k-step)
  bool stream_ok[NS];
#pragma unroll
  for (int gr = 0; gr < NS; ++gr) {
    stream_ok[gr] = gr < streams;
    const long long idx = tile_base + (stream_ok[gr] ? gr : 0);  // a missing stream is never loaded
    a_grp[gr] = kvalues + (idx * S * 32 + lane) * AV;
    m_grp[gr] = reinterpret_cast<const uint4*>(kmeta + idx * S * 16) + (lane & 3);
  }
  const bool meta_lane = !DENSE && lane < 4;

  auto load_stage = [&](int local, int st) {  // local k-block index within this split, ring slot st
    const int blk = blk_begin + local;
    const bool k_ok = blk * KBLK + tok_col < K;  // the last block of a K that is not a multiple of KBLK
#pragma unroll
    for (int i = 0; i < TOKEN_COPIES; ++i)
      cp_async_16(b_sm_w + st * L::kBStage + i * ROWS_PER_PASS * L::kRow, tok_src[i] + blk * KBLK, k_ok && tok_ok[i]);
    if (active) {
      const int s0 = blk * KB;
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) {
        const bool in_k = s0 + kk < S;  // predicated, not branched: only the last block of a tail is partial
#pragma unroll
        for (int gr = 0; gr < NS; ++gr) {
#pragma unroll
          for (int v = 0; v < AV; ++v)
            cp_async_16(a_sm + st * L::kAStage + ((kk * NS + gr) * AV + v) * 512, a_grp[gr] + (s0 + kk) * 32 * AV + v,
                        in_k && stream_ok[gr]);
          if constexpr (!DENSE)
            cp_async_16(m_sm_w + st * L::kMStage + (kk * NS + gr) * 64, m_grp[gr] + (s0 + kk) * 4,
                        in_k && meta_lane && stream_ok[gr]);
        }
      }
    }
    cp_async_commit();
  };

  float acc[SAMOYEDS ? 2 : 1][NS][NT][4];
  float* flat = &acc[0][0][0][0];
#pragma unroll
  for (int i = 0; i < (SAMOYEDS ? 2 : 1) * NS * NT * 4; ++i) flat[i] = 0.f;
  bool state[NS][2] = {};  // 1:2:V+2:4: output row parity bank 0 holds (see select_banks)
  const int run_begin = blk_begin * KB;  // this split's k-steps are [run_begin, run_end)
  const int run_end = min(blk_end * KB, S);
  const int chunks = SAMOYEDS ? S >> chunk_shift : 1;
  // Row selections (1:2:V+2:4); the next stream is the next group (G = 2) or the next m-tile (G = 1).
  RowPairPrefetch<NS> pairs;
  if constexpr (SAMOYEDS) {
    pairs.begin(rowsel, static_cast<long long>(expert) * G * num_mtiles * 16 + (active ? mt : 0) * 16 + g,
                G == 2 ? num_mtiles * 16 : 16, chunks, run_begin, run_end, chunk_shift, stream_ok);
  }

#pragma unroll
  for (int p = 0; p < STAGES - 1; ++p) {
    if (p < nblk) {
      load_stage(p, p);
    } else {
      cp_async_commit();  // empty groups keep the wait count uniform
    }
  }
  int st = 0, st_load = STAGES - 1;  // ring slots of the block computed and of the block loaded next
  for (int blk = 0; blk < nblk; ++blk) {
    cp_async_wait<STAGES - 2>();  // block blk has landed (this thread's copies)
    __syncthreads();              // ... everyone's; and slot (blk - 1) % STAGES is free again
    if (blk + STAGES - 1 < nblk) {
      load_stage(blk + STAGES - 1, st_load);
    } else {
      cp_async_commit();
    }
    st_load = st_load + 1 == STAGES ? 0 : st_load + 1;
    if (active) {
      const uint32_t a_st = a_sm + st * L::kAStage, m_st = m_sm_r + st * L::kMStage;
      const uint32_t b_st = b_sm_r + st * L::kBStage;
      const int s0 = (blk_begin + blk) * KB;
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) {
        const int s = s0 + kk;
        if (s >= S) break;
        if constexpr (SAMOYEDS) {
          if (s == run_begin || (s & ((1 << chunk_shift) - 1)) == 0)
            pairs.enter_chunk<NT>(acc, state, s, chunk_shift, run_end, stream_ok, nt_active);
        }
        uint4 a[NS], a_hi[NS];
        uint32_t meta[NS];
#pragma unroll
        for (int gr = 0; gr < NS; ++gr) {
          a[gr] = lds_128(a_st + (kk * NS + gr) * AV * 512);
          if constexpr (DENSE) {
            a_hi[gr] = lds_128(a_st + ((kk * NS + gr) * AV + 1) * 512);
          } else {
            meta[gr] = lds_32(m_st + (kk * NS + gr) * 64);
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          if (nt < nt_active) {  // B fragment loaded right before its MMAs: 4 live registers, not 4 * NT
            uint32_t b[4];
            ldmatrix_x4(b, b_st + nt * 8 * L::kRow + kk * 32 * sizeof(T));
#pragma unroll
            for (int gr = 0; gr < NS; ++gr) {
              if constexpr (DENSE) {  // k 0..15 of the step from b0, b1; k 16..31 from b2, b3
                mma_16816<T>(acc[0][gr][nt], a[gr], b[0], b[1]);
                mma_16816<T>(acc[0][gr][nt], a_hi[gr], b[2], b[3]);
              } else {
                mma_sp_16832<T>(acc[0][gr][nt], a[gr], b, acc[0][gr][nt], meta[gr]);
              }
            }
          }
        }
      }
    }
    st = st + 1 == STAGES ? 0 : st + 1;
  }
  cp_async_wait<0>();
  void* dst = (G == 1) ? static_cast<void*>(static_cast<float*>(out) + static_cast<long long>(blockIdx.z) * num_pairs * out_ld)
                       : out;
  if (active)
    store_epilogue<T, G, NS, NT, SAMOYEDS>(acc, state, nt_active, tile * BN, mt, streams, g, t, sorted_pairs,
                                           topk_weights, dst, out_ld);
}

// ---------------------------------------------------------------------------------------------------------
// 4. Combine: out[t, :] = sum_z sum_j slot_out[z, t*k + j, :] over this rank's slots, fp32, z then j ascending.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void moe_combine_kernel(const float* __restrict__ slot_out,     // [splits, T*k, H]
                                   const int32_t* __restrict__ pair_expert,  // [T*k]
                                   T* __restrict__ out,                      // [T, H]
                                   int num_tokens, int topk, int hidden, int splits) {
  const long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;  // one per 8 outputs
  const int per_row = hidden / 8;
  if (idx >= static_cast<long long>(num_tokens) * per_row) return;
  const int token = static_cast<int>(idx / per_row), col = static_cast<int>(idx % per_row) * 8;
  const long long split_stride = static_cast<long long>(num_tokens) * topk * hidden;
  float sum[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int z = 0; z < splits; ++z) {
    // Unrolled with predicated loads (no branch per slot), so the slots' loads are in flight together:
    // decode is latency-bound here.
#pragma unroll 4
    for (int j = 0; j < topk; ++j) {
      const int pair = token * topk + j;
      const bool mine = __ldg(pair_expert + pair) >= 0;  // another rank's expert: no row was written
      const float4* src =
          reinterpret_cast<const float4*>(slot_out + z * split_stride + static_cast<long long>(pair) * hidden + col);
      float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
      if (mine) {
        lo = src[0];
        hi = src[1];
      }
      sum[0] += lo.x; sum[1] += lo.y; sum[2] += lo.z; sum[3] += lo.w;
      sum[4] += hi.x; sum[5] += hi.y; sum[6] += hi.z; sum[7] += hi.w;
    }
  }
  uint4 packed;
  T* o = reinterpret_cast<T*>(&packed);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = MmaTraits<T>::from_float(sum[i]);
  *reinterpret_cast<uint4*>(out + static_cast<long long>(token) * hidden + col) = packed;
}

}  // namespace samoyeds
