"""The NF4 decode matmul in CUDA C++ (NVRTC, :mod:`nvrtc`): weights straight from memory into
the tensor cores' operand registers, no shared memory and no barriers in the loop.

``out = x @ W.T`` for 1 to 16 rows of ``x`` and up to three weights sharing ``x``, as
:mod:`nf4_triton`'s kernel computes it, from bitsandbytes' packed weights as stored. The
weight is the ``A`` operand of ``mma.m16n8k16`` (16 weight rows by 16 columns), ``x`` the
``B`` operand (rows padded to 8 or 16 with zeros). A dot product may take its columns in any
order as long as the weight and ``x`` agree: within one 64-block each thread of a group of four
takes 16 neighbouring columns (8 packed bytes of a weight row, one 64-bit load; 32 bytes of
``x``, two 128-bit loads) and feeds them to its own slots of four consecutive ``mma`` steps.
So each thread's loads are its operand fragments and no data moves between threads. All 16
columns of one ``mma`` lie in one 64-block: its fp32 result is scaled by the rows' absmax
(double quantization decoded in the kernel) before it is added up.

Each warp keeps ``PIPE`` blocks of loads in flight (registers only), a CTA's warps take
interleaved blocks of the same ``RT`` row tiles and add up their sums through shared memory in
warp order; with ``splits > 1`` CTAs also split the reduction and the last one of a row group
adds the partials up in split order, as the Triton kernel does, through a global workspace
or (``CudaShape.cluster``, sm_90) the shared memory of the splits' thread-block cluster: the
same bits. Deterministic either way.
The 4-bit codes become table values by byte permutes, as :func:`nf4_codes.lookup_asm` does,
with the output pairs in column order; or (``CudaShape.table`` > 0) each packed byte is looked
up in a shared-memory table of its two values, which the CTA builds by those permutes before
its loop: one shared load and two instructions per byte instead of about four and a half
integer-pipe instructions, whose pipe is half as wide as the others. ``table`` copies of the
table's 256 words interleaved word by word spread a warp's lookups over more banks (lane
``l`` reads copy ``l % table``). Same values, same ``mma`` order: both decodes give the same
bits.

Launched with programmatic dependent launch (``programmatic=True``, compute capability 9.0+),
a CTA may start while the kernel before it in the stream is still finishing: it issues the loads
of its first ``PIPE`` blocks of weights and absmax (which no kernel writes; in the sm_90 SASS all
of them come before the wait), and waits (``griddepcontrol.wait``, once the first of them has
arrived) before it reads ``x`` or writes anything; every CTA waits, so the kernel ends after the
one before it. ``x`` is then read by plain loads (the wait makes the kernel before's writes
visible to them; the non-coherent path, ``ld.global.nc``, assumes data that no one writes while
the kernel lives, and ``ld.global.cg`` skips L1, which the warps of a CTA share ``x`` through:
5% slower at 1 row, 9-11% at 8, ``gpu_pdl_chain.json``). Right after its wait a CTA lets the
next kernel launch (``griddepcontrol.launch_dependents``; that kernel in turn waits for this
one's end, so at most two kernels overlap).

A decode step's elementwise work can be folded into its launches (``x_fold``, ``residual``):
RMSNorm into the ``x`` loads of q+k+v and gate+up (``x`` is then the residual stream times the
norm's weight, one packed multiply per two elements; each row's 1 / rms, from the sums of
squares per 16 columns that the launch before wrote, scales the sums at the end), SiLU(gate) *
up into down's ``x`` loads, and the residual add into the o and down epilogues (``out += x @
W.T`` in place, rounded as torch adds two tensors, and the rows' sums of squares per tile for
the next norm). The decode step folds the norm the other way (``norm_out``, ``FOLD_SCALE``):
the o and down epilogues also write the next norm's weight times the new stream beside it (the
same packed multiply), and q+k+v and gate+up read that plainly and only scale their sums; SiLU
* up is a kernel of its own, or gate+up's epilogue writes it (``act_out``: the CTA takes gate's
and up's tiles of the same rows in turn, so an even ``row_tiles``). The norm's roundings
differ from transformers' (no rounding of ``h * rstd`` before the weight). What the epilogues
need is read early so that the loop hides its latency: the sums of squares go to shared memory
(``cp.async``) right after the wait, the stream's values and the next norm's weights are loaded
before the loop.

A model of bf16 layers with fp16 compute (the article's checkpoint) launches with
``io_bf16``: ``x`` and the output are bf16, each ``x`` pair is rounded to fp16 as it is loaded
and the product to fp16 and then bf16 as it is stored (the bits of the copies around an fp16
launch, without them). Its folds do the elementwise work in bf16, the storage dtype (the
residual add, the next norm's weight times the stream, SiLU(gate) * up), and only the products
in fp16; a ``FOLD_SCALE`` launch (``PRESCALE``) adds each row's sums of squares up before its
loop and scales its ``x`` rows by their 1 / rms before rounding them to fp16 (the norm's
weight times the stream may exceed fp16's range; the normed values do not), its sums left as
they are. The norm folded into the ``x`` loads (``FOLD_NORM``) is not built so.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

from . import nvrtc
from .nf4_codes import table_words
from .torch_support import require_torch

KERNEL_NAME = 'nf4_mma'


@dataclass(frozen=True)
class CudaShape:
    """A compiled variant's shape: warps per CTA, row tiles of 16 per warp, blocks in flight,
    copies of the shared-memory decode table (0: decode by byte permutes in registers),
    whether each warp loads ``x`` a block ahead (``x_ahead``) or right before its use, and
    whether a split reduction's CTAs form a thread-block cluster (``cluster``, sm_90+: the
    first adds the others' sums up from their shared memory, no workspace, no counter; at
    most :data:`MAX_CLUSTER_SPLITS` splits)."""
    warps: int = 4
    row_tiles: int = 1
    pipe: int = 4
    table: int = 0
    x_ahead: bool = False
    cluster: bool = False


TABLE_COPIES = (0, 2, 4, 8, 16)
"""The ``CudaShape.table`` values the kernel compiles (a power of two: copy = lane modulo it)."""
MAX_CLUSTER_SPLITS = 8
"""The most CTAs of a cluster that every sm_90 GPU launches (the portable cluster size)."""
STATIC_SHARED_LIMIT = 48 * 1024
"""Bytes of static shared memory a CTA may declare."""


def shared_bytes(shape: CudaShape, n_tiles: int) -> int:
    """Static shared memory of one variant: the warps' partial sums, the flag, the table, and
    the folded variants' row statistics (the sums of squares in flight and the warps' row
    sums) and residual sums at most (:data:`FOLDS`)."""
    stat_quads = (3 if shape.warps >= 8 else 5) * 32 * shape.warps  # STAT_PRE x threads
    return (shape.warps * shape.row_tiles * n_tiles * 4 * 32 * 4 + 4 + 1024 * shape.table
            + 16 * stat_quads + 64 * shape.warps + 1024 * shape.row_tiles
            + 1024 * shape.row_tiles * shape.cluster)


def fits(shape: CudaShape, n_tiles: int = 2) -> bool:
    """Whether a variant compiles: a known table size and static shared memory in the limit
    (``n_tiles`` 2, rows 9-16, takes the most)."""
    return shape.table in TABLE_COPIES and shared_bytes(shape, n_tiles) <= STATIC_SHARED_LIMIT


FOLD_NONE, FOLD_NORM, FOLD_ACT, FOLD_SCALE = 0, 1, 2, 3
"""What a launch does to ``x`` before the product (``x_fold``): nothing; Qwen3's RMSNorm (``x``
is the residual stream, the kernel before wrote its sums of squares per 16 columns); SiLU(gate)
* up (``x`` holds gate, up lies ``act_offset`` columns further on); the rest of the RMSNorm
(``x`` is the norm's weight times the residual stream, as a residual launch with ``norm_out``
wrote it beside the stream, and its sums of squares: 1 / rms scales the sums, nothing touches
``x``)."""
FOLDS = (FOLD_NONE, FOLD_NORM, FOLD_ACT, FOLD_SCALE)


SOURCE = r'''
#define PRESCALE (IO_BF16 && XFORM == 3)  // 1 / rms applied to x before the fp16 product
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

// Loads predicated on ``on`` (a stage past the warp's last block loads nothing; its registers
// keep stale values that are never used), so the loop has no branches around them.
__device__ __forceinline__ void load_weight(uint2& v, const u8* p, bool on) {
    asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %3, 0;\n"
                 " @q ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n}"
                 : "+r"(v.x), "+r"(v.y) : "l"(p), "r"((int)on));
}

#if PDL  // x may be written while this kernel already runs (before its wait): not .nc
#define X_LOAD " @q ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
#else
#define X_LOAD " @q ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
#endif
__device__ __forceinline__ void load_x(uint4& v, const u16* p, bool on) {
    asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n" X_LOAD
                 : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w) : "l"(p), "r"((int)on));
}

__device__ __forceinline__ void load_absmax(u32& v, const u8* p, bool on) {
#if NESTED
    asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n @q ld.global.nc.u8 %0, [%1];\n}"
                 : "+r"(v) : "l"(p), "r"((int)on));
#else
    asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n @q ld.global.nc.u32 %0, [%1];\n}"
                 : "+r"(v) : "l"(p), "r"((int)on));
#endif
}

__device__ __forceinline__ u32 high_half(u32 v) {  // v >> 16 on the multiply-add pipe
    u32 r;
    asm("mul.hi.u32 %0, %1, 0x10000;" : "=r"(r) : "r"(v));
    return r;
}

// Programmatic dependent launch (the PDL variant on sm_90+; nothing otherwise). The wait is
// predicated on ``(loaded & (positive >> 31)) == 0``: ``loaded`` a register of the first weight
// load, ``positive`` a kernel argument above zero, so always true, which ptxas cannot know.
// Without that dependence ptxas moves the wait above the weight loads.
__device__ __forceinline__ void wait_for_previous_kernel(u32 loaded, int positive) {
#if PDL && __CUDA_ARCH__ >= 900
    asm volatile("{\n .reg .pred p;\n .reg .b32 z;\n shr.u32 z, %1, 31;\n and.b32 z, z, %0;\n"
                 " setp.eq.u32 p, z, 0;\n @p griddepcontrol.wait;\n}"
                 :: "r"(loaded), "r"(positive) : "memory");
#endif
}

__device__ __forceinline__ void let_next_kernel_launch() {
#if PDL && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// 16 bytes from global to shared memory through L2, no registers (zero-filled when !on)
__device__ __forceinline__ void copy16_async(void* to, const void* from, bool on) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"((u32)__cvta_generic_to_shared(to)), "l"(from), "r"(on ? 16 : 0)
                 : "memory");
}

#if CLUSTER  // sm_90: a thread-block cluster's barrier and its CTAs' shared memory
__device__ __forceinline__ void cluster_sync() {  // every thread of every CTA of the cluster
    asm volatile("barrier.cluster.arrive.release.aligned;\n"
                 "barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// *p as it is in the shared memory of the cluster's CTA ``rank`` (p: this CTA's address)
__device__ __forceinline__ float cluster_load(const float* p, u32 rank) {
    u32 remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
                 : "=r"(remote) : "r"((u32)__cvta_generic_to_shared(p)), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}
#endif

struct Table { u32 hi0, hi2, lo0, lo2, pick; };  // kept in registers (see decode8)

// prmt as it is (__byte_perm masks the selector to 3 bits per byte: one more instruction)
template <u32 B> __device__ __forceinline__ u32 perm(u32 a, u32 s) {  // B: an immediate
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "n"(B), "r"(s));
    return r;
}

__device__ __forceinline__ u32 pick(u32 a, u32 b, u32 s) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s));
    return r;
}

// 8 codes (4 packed bytes, high nibble first) -> 4 registers of two table values each, in
// column order: o0 = (c0, c1), o1 = (c2, c3), o2 = (c4, c5), o3 = (c6, c7). s: each code's low
// three bits, a byte index into 8 table bytes; t: per byte, which of two lookups (entries 0-7
// or 8-15) to keep, from the code's top bit. prmt takes one table word from a register and
// one as an immediate.
__device__ __forceinline__ void decode8(const Table& tb, u32 w, u32& o0, u32& o1, u32& o2,
                                        u32& o3) {
    u32 s = w & 0x77777777u, t;
    asm("mul.hi.u32 %0, %1, 0x80000000;" : "=r"(t) : "r"(w));  // w >> 1
    asm("lop3.b32 %0, %0, 0x44444444, %1, 0xEA;" : "+r"(t) : "r"(tb.pick));  // (t & 4s) | pick
    u32 h = pick(perm<HI1>(tb.hi0, s), perm<HI3>(tb.hi2, s), t);
    u32 l = pick(perm<LO1>(tb.lo0, s), perm<LO3>(tb.lo2, s), t);
    o0 = pick(l, h, 0x4051u);
    o1 = pick(l, h, 0x6273u);
    s = high_half(s);
    t = high_half(t);
    h = pick(perm<HI1>(tb.hi0, s), perm<HI3>(tb.hi2, s), t);
    l = pick(perm<LO1>(tb.lo0, s), perm<LO3>(tb.lo2, s), t);
    o2 = pick(l, h, 0x4051u);
    o3 = pick(l, h, 0x6273u);
}

#if TABLE
// Word b * TABLE + c: the two table values of packed byte b (high nibble first, in the low
// half), copy c. Lane l reads copy l % TABLE: lanes of one copy share banks.
__shared__ u32 pairs[256 * TABLE];

__device__ __forceinline__ u32 pair_at(u32 offset) {  // offset in bytes
    return *reinterpret_cast<const u32*>(reinterpret_cast<const u8*>(pairs) + offset);
}

// 8 codes (4 packed bytes) -> o0..o3 as decode8 gives them, from the table: per byte its word
// offset by a shift on the multiply-add pipe and one lop3 (the copy's 4 * c in the low bits).
__device__ __forceinline__ void decode8_table(u32 w, u32 copy4, u32& o0, u32& o1, u32& o2,
                                              u32& o3) {
    constexpr u32 MASK = 0xFFu << TABLE_SHIFT;
    u32 a0, a1, a2, a3;
    asm("mul.lo.u32 %0, %1, %2;" : "=r"(a0) : "r"(w), "n"(1u << TABLE_SHIFT));
    asm("mul.hi.u32 %0, %1, %2;" : "=r"(a1) : "r"(w), "n"(1u << (24 + TABLE_SHIFT)));
    asm("mul.hi.u32 %0, %1, %2;" : "=r"(a2) : "r"(w), "n"(1u << (16 + TABLE_SHIFT)));
    asm("mul.hi.u32 %0, %1, %2;" : "=r"(a3) : "r"(w), "n"(1u << (8 + TABLE_SHIFT)));
    o0 = pair_at((a0 & MASK) | copy4);
    o1 = pair_at((a1 & MASK) | copy4);
    o2 = pair_at((a2 & MASK) | copy4);
    o3 = pair_at((a3 & MASK) | copy4);
}
#endif

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." DTYPE "." DTYPE ".f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u16 to_out(float v) {
    u16 r;
    asm("cvt.rn." DTYPE ".f32 %0, %1;" : "=h"(r) : "f"(v));
    return r;
}

__device__ __forceinline__ float from_out(u16 v) {
#if IS_BF16
    return __uint_as_float((u32)v << 16);
#else
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(v));
    return r;
#endif
}

__device__ __forceinline__ u32 pair_of(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

// Two fp32 values -> their pair in the compute dtype (lo in the low half), one instruction
__device__ __forceinline__ u32 pair_from(float lo, float hi) {
    u32 r;
    asm("cvt.rn." DTYPE "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

#if IO_BF16  // x and out stored as bf16, the product in fp16 (bf16 layers, fp16 compute)
#define STORE "bf16"  // the storage dtype: x, out, the residual stream, the norms' weights
__device__ __forceinline__ u16 to_store(float v) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
    return r;
}

__device__ __forceinline__ float from_store(u16 v) { return __uint_as_float((u32)v << 16); }

__device__ __forceinline__ u32 store_pair_from(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// A pair of bf16 times s -> the pair rounded to fp16: with s = 1 the bits of x.to(float16)
__device__ __forceinline__ u32 f16_pair(u32 p, float s = 1.f) {
    return pair_from(__uint_as_float(p << 16) * s, __uint_as_float(p & 0xffff0000u) * s);
}

// The product as the fp16 layer stores it, then as bf16: the bits of out.to(torch.bfloat16)
__device__ __forceinline__ u16 to_io(float v) { return to_store(from_out(to_out(v))); }
#else  // stored in the compute dtype
#define STORE DTYPE
#define to_store to_out
#define from_store from_out
#define store_pair_from pair_from
#define to_io to_out
#endif

#if XFORM == 1 || NORM_OUT
// Two elements of the norm's weight times h, one packed multiply; 1 / rms scales the sums
__device__ __forceinline__ u32 times_pair(u32 h, u32 w) {
    u32 r;
    asm("fma.rn." STORE "x2 %0, %1, %2, %3;" : "=r"(r) : "r"(h), "r"(w), "r"(0x80008000u));
    return r;
}
#endif
#if XFORM == 2 || ACT_OUT
__device__ __forceinline__ float silu_times(float g, float u) {
    return __fdividef(g, 1.f + __expf(-g)) * u;
}
#endif
#if XFORM == 2
// Two elements of SiLU(gate) * up, in fp32 and rounded once (to the storage dtype)
__device__ __forceinline__ u32 act_pair(u32 g, u32 u) {
    return store_pair_from(silu_times(from_store((u16)g), from_store((u16)u)),
                           silu_times(from_store((u16)(g >> 16)), from_store((u16)(u >> 16))));
}
#endif

struct Problem {
    const u8* packed; const void* absmax; const float* absmax2; const float* code2;
    float offset; int column; int row0;
};

__device__ __forceinline__ Problem problem_of(
        int tile, int tiles1, int tiles2,
        const u8* p0, const void* a0, const float* s0, const float* c0, float f0, int n0,
        const u8* p1, const void* a1, const float* s1, const float* c1, float f1, int n1,
        const u8* p2, const void* a2, const float* s2, const float* c2, float f2) {
    Problem q;
#if ACT_OUT  // gate and up interleaved tile by tile: tile 2i is gate's tile i, 2i + 1 up's
    tile = (tile & 1) * tiles1 + (tile >> 1);
#endif
    if (tile < tiles1) {
        q.packed = p0; q.absmax = a0; q.absmax2 = s0; q.code2 = c0; q.offset = f0;
        q.column = 0; q.row0 = tile * 16;
    } else if (tile < tiles2) {
        q.packed = p1; q.absmax = a1; q.absmax2 = s1; q.code2 = c1; q.offset = f1;
        q.column = n0; q.row0 = (tile - tiles1) * 16;
    } else {
        q.packed = p2; q.absmax = a2; q.absmax2 = s2; q.code2 = c2; q.offset = f2;
        q.column = n0 + n1; q.row0 = (tile - tiles2) * 16;
    }
    return q;
}

__device__ __forceinline__ float scale_of(const Problem& q, u32 absmax, int index, int qb2_log2) {
#if NESTED
    return __ldg(q.code2 + absmax) * __ldg(q.absmax2 + (index >> qb2_log2)) + q.offset;
#else
    return __uint_as_float(absmax);
#endif
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) nf4_mma(
        const u16* __restrict__ x, u16* __restrict__ out, float* __restrict__ ws,
        int* __restrict__ locks,
        const u8* p0, const void* a0, const float* s0, const float* c0, float f0, int n0,
        const u8* p1, const void* a1, const float* s1, const float* c1, float f1, int n1,
        const u8* p2, const void* a2, const float* s2, const float* c2, float f2, int n2,
        int M, int K, int stride_x, int stride_out, int tiles1, int tiles2, int tiles,
        int splits, int blocks_per_split, int qb2_log2,
        const u16* __restrict__ norm_w, const float* __restrict__ squares_in, float eps,
        int act_offset, float* __restrict__ squares_out, u16* __restrict__ x_out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int blocks = K >> 6, row_bytes = K >> 1;
    const int split = blockIdx.y;
    Table tb;
    {
        u32 zero;  // 0, which ptxas does not know: the table words stay in registers
        asm volatile("mul.hi.u32 %0, %1, 1;" : "=r"(zero) : "r"((u32)lane));
        tb.hi0 = HI0 + zero; tb.hi2 = HI2 + zero; tb.lo0 = LO0 + zero; tb.lo2 = LO2 + zero;
        tb.pick = 0x32103210u + zero;
    }
    const int first = split * blocks_per_split;
    const int last = min(first + blocks_per_split, blocks);

    Problem q[RT];
    const u8* wp[RT];  // row g's first block of this warp, 8t bytes in; row g + 8 is 8 rows on
    const u8* ap[RT];  // its absmax (bytes when NESTED, else floats)
    int index[RT];     // row g's absmax index of the warp's first block (second-level scales)
    const int start = first + warp;
#pragma unroll
    for (int r = 0; r < RT; ++r) {
        const int tile = min(blockIdx.x * RT + r, tiles - 1);
        q[r] = problem_of(tile, tiles1, tiles2, p0, a0, s0, c0, f0, n0, p1, a1, s1, c1, f1, n1,
                          p2, a2, s2, c2, f2);
        index[r] = (q[r].row0 + g) * blocks + start;
#if TILED  // per tile of 16 rows, block after block: 16 rows x 32 bytes, absmax 16 rows
        wp[r] = q[r].packed + (size_t)q[r].row0 * row_bytes + 32 * g + 8 * t + 512 * start;
        ap[r] = (const u8*)q[r].absmax
                + ((size_t)q[r].row0 * blocks + 16 * start + g) * (NESTED ? 1 : 4);
#else
        wp[r] = q[r].packed + (size_t)(q[r].row0 + g) * row_bytes + 8 * t + 32 * start;
        ap[r] = (const u8*)q[r].absmax + (size_t)index[r] * (NESTED ? 1 : 4);
#endif
    }
    const u16* xp[NT];  // rows past M read row M - 1: they only reach output columns past M
#pragma unroll
    for (int n = 0; n < NT; ++n)
        xp[n] = x + (size_t)min(g + 8 * n, M - 1) * stride_x + 16 * t + 64 * start;

    float acc[RT][NT][4];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[r][n][c] = 0.f;

    int steps = last - start;
    steps = steps > 0 ? (steps + WARPS - 1) / WARPS : 0;

    uint2 wq[PIPE][RT][2];
    u32 aq[PIPE][RT][2];
#if TILED
    constexpr int W_STEP = 512 * WARPS, A_STEP = 16 * WARPS * (NESTED ? 1 : 4);
    const int w_second = 256, a_second = 8 * (NESTED ? 1 : 4);  // row g + 8
#else
    constexpr int W_STEP = 32 * WARPS, A_STEP = WARPS * (NESTED ? 1 : 4);
    const int w_second = 8 * row_bytes, a_second = 8 * blocks * (NESTED ? 1 : 4);
#endif

#define LOAD_STAGE(p, on) do { \
        _Pragma("unroll") for (int r = 0; r < RT; ++r) { \
            load_weight(wq[p][r][0], wp[r] + (p) * W_STEP, on); \
            load_weight(wq[p][r][1], wp[r] + w_second + (p) * W_STEP, on); \
            load_absmax(aq[p][r][0], ap[r] + (p) * A_STEP, on); \
            load_absmax(aq[p][r][1], ap[r] + a_second + (p) * A_STEP, on); \
        } \
    } while (0)

#pragma unroll
    for (int p = 0; p < PIPE; ++p) {
#pragma unroll
        for (int r = 0; r < RT; ++r) {
            wq[p][r][0] = wq[p][r][1] = make_uint2(0, 0);
            aq[p][r][0] = aq[p][r][1] = 0;
        }
        LOAD_STAGE(p, p < steps);
    }
#if TABLE  // built while the first loads are on their way
    for (int i = threadIdx.x; i < 256 * TABLE; i += WARPS * 32) {
        u32 o0, o1, o2, o3;
        decode8(tb, (u32)(i / TABLE), o0, o1, o2, o3);
        pairs[i] = o0;
    }
    __syncthreads();
    const u32 copy4 = (u32)(lane % TABLE) * 4u;
#endif
    wait_for_previous_kernel(wq[0][0][0].x, K);  // x and the outputs: the kernels' before us
    let_next_kernel_launch();  // it waits for this kernel's end before it reads our output
    constexpr int THREADS = WARPS * 32;
    // The CTA's warps add up in warp order; element e of a warp: (r, n, c) = e / 32, lane e % 32.
    constexpr int ELEMENTS = RT * NT * 4 * 32;
#if XFORM == 1 || XFORM == 3
    // The rows' sums of squares per 16 columns ((K / 16) x 16 fp32, the kernel before's), on
    // their way to shared memory while the loop runs (read after it). float4 f holds rows
    // 4 (f % 4) .. 4 (f % 4) + 3 of 16 columns; thread i takes f = i, i + THREADS, ...: always
    // the same four rows. STAT_PRE covers K = 2560 (the 4B model's hidden size); more columns
    // are loaded after the loop.
    constexpr int STAT_PRE = WARPS >= 8 ? 3 : 5;
    __shared__ float4 stat_buf[STAT_PRE][THREADS];
    const int quads = K >> 2;
#pragma unroll
    for (int j = 0; j < STAT_PRE; ++j) {
        const int f = threadIdx.x + j * THREADS;
        copy16_async(&stat_buf[j][threadIdx.x], squares_in + 4 * (f < quads ? f : 0), f < quads);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    // Each row's sum of squares: this thread's four rows, over the lanes of the same rows, then
    // (after a barrier, in ``scaled`` or before the loop) over the warps, in one fixed order:
    // every CTA gets the same bits.
    __shared__ float row_sums[WARPS][16];
    auto add_row_sums = [&]() {
        float s[4] = {0.f, 0.f, 0.f, 0.f};
        asm volatile("cp.async.wait_all;" ::: "memory");
#pragma unroll
        for (int j = 0; j < STAT_PRE; ++j)
            if (threadIdx.x + j * THREADS < quads) {
                const float4 v = stat_buf[j][threadIdx.x];
                s[0] += v.x; s[1] += v.y; s[2] += v.z; s[3] += v.w;
            }
        for (int f = threadIdx.x + STAT_PRE * THREADS; f < quads; f += THREADS) {
            const float4 v = __ldcg(reinterpret_cast<const float4*>(squares_in) + f);
            s[0] += v.x; s[1] += v.y; s[2] += v.z; s[3] += v.w;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            s[i] += __shfl_xor_sync(0xffffffffu, s[i], 4);
            s[i] += __shfl_xor_sync(0xffffffffu, s[i], 8);
            s[i] += __shfl_xor_sync(0xffffffffu, s[i], 16);
            if (lane < 4) row_sums[warp][4 * lane + i] = s[i];
        }
    };
#endif
    // Where this thread's j-th output element goes (false: none): with one split, from the
    // warps' partial sums (element threadIdx.x + j THREADS); with more, from the workspace
    // (256 per tile) in the last CTA of the row group.
    auto slot_of = [&](int j, int& r, int& m, int& feature) {
        const int e = threadIdx.x + j * THREADS;
        if (splits == 1) {
            const int slot = e >> 5, owner = e & 31;
            r = slot / (NT * 4);
            const int n = (slot >> 2) % NT, c = slot & 3;
            m = 8 * n + 2 * (owner & 3) + (c & 1);
            feature = (owner >> 2) + 8 * (c >> 1);
            return e < ELEMENTS && blockIdx.x * RT + r < tiles && m < M;
        }
        r = e >> 8;
        m = (e >> 4) & 15;
        feature = e & 15;
        return e < RT * 256 && blockIdx.x * RT + r < tiles && m < M;
    };
    constexpr int SLOTS = (RT * 256 + THREADS - 1) / THREADS;  // >= ELEMENTS / THREADS
#if RESIDUAL
    // The stream's values this thread will add to (and the next norm's weights there), loaded
    // now: the loop hides their latency. One weight: tile t's rows are columns 16 t ...
    u32 held[SLOTS], held_w[SLOTS];
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
        int r = 0, m = 0, feature = 0;
        held[j] = held_w[j] = 0;
        if (slot_of(j, r, m, feature)) {
            const int column = (blockIdx.x * RT + r) * 16 + feature;
            held[j] = out[(size_t)m * stride_out + column];
#if NORM_OUT
            held_w[j] = norm_w[column];
#endif
        }
    }
#endif
#if PRESCALE
    // x is the norm's weight times the stream in bf16, which fp16 may not hold: each x row is
    // scaled by its 1 / rms before it is rounded to fp16 (the sums are then left as they are)
    float rs[NT];
    add_row_sums();
    __syncthreads();
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const int m = min(g + 8 * n, M - 1);
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) total += row_sums[w][m];
        rs[n] = rsqrtf(total / (float)K + eps);
    }
#endif
#if XFORM == 1
    const u16* np = norm_w + 16 * t + 64 * start;  // the norm's weights of this thread's columns
#endif

#if X_AHEAD  // x one block ahead: loaded while the block before it is decoded and multiplied
    uint4 x_next[NT][2];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        x_next[n][0] = x_next[n][1] = make_uint4(0, 0, 0, 0);
        load_x(x_next[n][0], xp[n], steps > 0);
        load_x(x_next[n][1], xp[n] + 8, steps > 0);
    }
#endif

    auto compute = [&](const int p, const int block_index) {
        uint4 xq[NT][2];
#if X_AHEAD
        const bool more = block_index + WARPS < steps * WARPS;  // this warp has a next block
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            xq[n][0] = x_next[n][0];
            xq[n][1] = x_next[n][1];
            load_x(x_next[n][0], xp[n] + (block_index + WARPS) * 64, more);
            load_x(x_next[n][1], xp[n] + (block_index + WARPS) * 64 + 8, more);
        }
#else
        // x from L1 (or L2 the first time), loaded here: the decode below covers the latency
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            xq[n][0] = xq[n][1] = make_uint4(0, 0, 0, 0);
            load_x(xq[n][0], xp[n] + block_index * 64, true);
            load_x(xq[n][1], xp[n] + block_index * 64 + 8, true);
        }
#endif
#if XFORM == 1  // x = the norm's weight times h (these 16 columns); 1 / rms scales the sums
        {
            uint4 wn[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
            load_x(wn[0], np + block_index * 64, true);
            load_x(wn[1], np + block_index * 64 + 8, true);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                xq[n][0] = make_uint4(times_pair(xq[n][0].x, wn[0].x),
                                      times_pair(xq[n][0].y, wn[0].y),
                                      times_pair(xq[n][0].z, wn[0].z),
                                      times_pair(xq[n][0].w, wn[0].w));
                xq[n][1] = make_uint4(times_pair(xq[n][1].x, wn[1].x),
                                      times_pair(xq[n][1].y, wn[1].y),
                                      times_pair(xq[n][1].z, wn[1].z),
                                      times_pair(xq[n][1].w, wn[1].w));
            }
        }
#elif XFORM == 2  // x = SiLU(gate) * up: x holds gate, up lies act_offset columns on
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            uint4 up[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
            load_x(up[0], xp[n] + act_offset + block_index * 64, true);
            load_x(up[1], xp[n] + act_offset + block_index * 64 + 8, true);
            xq[n][0] = make_uint4(act_pair(xq[n][0].x, up[0].x), act_pair(xq[n][0].y, up[0].y),
                                  act_pair(xq[n][0].z, up[0].z), act_pair(xq[n][0].w, up[0].w));
            xq[n][1] = make_uint4(act_pair(xq[n][1].x, up[1].x), act_pair(xq[n][1].y, up[1].y),
                                  act_pair(xq[n][1].z, up[1].z), act_pair(xq[n][1].w, up[1].w));
        }
#endif
#if IO_BF16  // the pairs (after any transform, in bf16) rounded to fp16 for the product
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#if PRESCALE
            const float sc = rs[n];
#else
            const float sc = 1.f;
#endif
            xq[n][0] = make_uint4(f16_pair(xq[n][0].x, sc), f16_pair(xq[n][0].y, sc),
                                  f16_pair(xq[n][0].z, sc), f16_pair(xq[n][0].w, sc));
            xq[n][1] = make_uint4(f16_pair(xq[n][1].x, sc), f16_pair(xq[n][1].y, sc),
                                  f16_pair(xq[n][1].z, sc), f16_pair(xq[n][1].w, sc));
        }
#endif
#pragma unroll
        for (int r = 0; r < RT; ++r) {
            u32 lo[8], hi[8];  // rows g and g + 8, columns 16t .. 16t + 15 of the block
#if TABLE
            decode8_table(wq[p][r][0].x, copy4, lo[0], lo[1], lo[2], lo[3]);
            decode8_table(wq[p][r][0].y, copy4, lo[4], lo[5], lo[6], lo[7]);
            decode8_table(wq[p][r][1].x, copy4, hi[0], hi[1], hi[2], hi[3]);
            decode8_table(wq[p][r][1].y, copy4, hi[4], hi[5], hi[6], hi[7]);
#else
            decode8(tb, wq[p][r][0].x, lo[0], lo[1], lo[2], lo[3]);
            decode8(tb, wq[p][r][0].y, lo[4], lo[5], lo[6], lo[7]);
            decode8(tb, wq[p][r][1].x, hi[0], hi[1], hi[2], hi[3]);
            decode8(tb, wq[p][r][1].y, hi[4], hi[5], hi[6], hi[7]);
#endif
            const float sg = scale_of(q[r], aq[p][r][0], index[r] + block_index, qb2_log2);
            const float sh = scale_of(q[r], aq[p][r][1], index[r] + 8 * blocks + block_index,
                                      qb2_log2);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const u32 xb[8] = {xq[n][0].x, xq[n][0].y, xq[n][0].z, xq[n][0].w,
                                   xq[n][1].x, xq[n][1].y, xq[n][1].z, xq[n][1].w};
                float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    mma(c, lo[2 * k], hi[2 * k], lo[2 * k + 1], hi[2 * k + 1], xb[2 * k],
                        xb[2 * k + 1]);
                acc[r][n][0] += c[0] * sg;
                acc[r][n][1] += c[1] * sg;
                acc[r][n][2] += c[2] * sh;
                acc[r][n][3] += c[3] * sh;
            }
        }
    };

    int j0 = 0;
    for (; j0 + PIPE <= steps; j0 += PIPE) {  // whole rounds of PIPE blocks: no branches
#pragma unroll
        for (int r = 0; r < RT; ++r) {  // the loads below are PIPE blocks further on
            wp[r] += PIPE * W_STEP;
            ap[r] += PIPE * A_STEP;
        }
#pragma unroll
        for (int p = 0; p < PIPE; ++p) {
            compute(p, WARPS * (j0 + p));
            LOAD_STAGE(p, j0 + p + PIPE < steps);
        }
    }
#pragma unroll
    for (int p = 0; p < PIPE - 1; ++p)  // the last blocks, loaded already
        if (j0 + p < steps) compute(p, WARPS * (j0 + p));
#undef LOAD_STAGE

#if (XFORM == 1 || XFORM == 3) && !PRESCALE
    add_row_sums();
#endif
    __shared__ float partial[WARPS][ELEMENTS];
    __shared__ int is_last;
#if CLUSTER  // this CTA's sums (splits > 1), laid out as its part of the workspace
    __shared__ float cluster_sums[RT * 256];
#endif
#if NORM_OUT && !RESIDUAL
#error "the next norm's x is written beside the residual stream: a residual launch"
#endif
#if RESIDUAL  // out += the product (one weight); the rows' sums of squares per tile of 16
    __shared__ float finals[RT][16][16];
#endif
#if (XFORM == 1 || XFORM == 3) && !PRESCALE
    auto scaled = [&](float sum, int m) {
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) total += row_sums[w][m];
        return sum * rsqrtf(total / (float)K + eps);
    };
#else
    auto scaled = [&](float sum, int) { return sum; };
#endif
#if RESIDUAL  // hidden + delta rounded as torch adds two tensors of the compute dtype
    auto store_out = [&](u16* o, float sum, int r, int m, int feature, int j) {
        const u16 v = to_store(from_store(to_io(scaled(sum, m))) + from_store((u16)held[j]));
        *o = v;
        finals[r][m][feature] = from_store(v);
#if NORM_OUT  // beside h: the next norm's weight times it (as the norm-folded x loads make it)
        x_out[o - out] = (u16)times_pair(v, held_w[j]);
#endif
    };
    auto after_stores = [&](float* squares, int tiles_, int rows) {  // per (tile, row), in order
        __syncthreads();
        for (int e = threadIdx.x; e < RT * 16; e += WARPS * 32) {
            const int r = e >> 4, m = e & 15, tile = blockIdx.x * RT + r;
            if (tile < tiles_ && m < rows) {
                float sum = 0.f;
#pragma unroll
                for (int f = 0; f < 16; ++f) sum += finals[r][m][f] * finals[r][m][f];
                squares[(size_t)tile * 16 + m] = sum;
            }
        }
    };
#elif ACT_OUT  // SiLU(gate) * up: the CTA's gate and up tiles in turn, rounded as stored
    __shared__ u16 act_in[RT][16][16];
    auto store_out = [&](u16*, float sum, int r, int m, int feature, int) {
        act_in[r][m][feature] = to_io(scaled(sum, m));
    };
    auto after_stores = [&](float*, int tiles_, int rows) {  // out: gate's columns only
        __syncthreads();
        for (int e = threadIdx.x; e < RT * 128; e += THREADS) {
            const int pair = e >> 8, m = (e >> 4) & 15, feature = e & 15;
            const int tile = blockIdx.x * RT + 2 * pair;  // gate's tile (tile >> 1)
            if (tile < tiles_ && m < rows)
                out[(size_t)m * stride_out + (tile >> 1) * 16 + feature] = to_store(
                    silu_times(from_store(act_in[2 * pair][m][feature]),
                               from_store(act_in[2 * pair + 1][m][feature])));
        }
    };
#else
    auto store_out = [&](u16* o, float sum, int, int m, int, int) {
        *o = to_io(scaled(sum, m));
    };
    auto after_stores = [&](float*, int, int) {};
#endif
#if IO_BF16 && (IS_BF16 || XFORM == 1)
#error "bf16 x and out: fp16 compute, no norm folded into the x loads (scale instead)"
#endif
#if ACT_OUT && (RESIDUAL || RT % 2)
#error "SiLU(gate) * up out: no residual, gate and up tiles in pairs (even RT)"
#endif
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c)
                partial[warp][((r * NT + n) * 4 + c) * 32 + lane] = acc[r][n][c];
    __syncthreads();
#pragma unroll
    for (int j = 0; j < (ELEMENTS + THREADS - 1) / THREADS; ++j) {  // as slot_of counts them
        const int e = threadIdx.x + j * THREADS;
        if (e >= ELEMENTS) break;
        float sum = 0.f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) sum += partial[v][e];
        const int slot = e >> 5, owner = e & 31;
        const int r = slot / (NT * 4), n = (slot >> 2) % NT, c = slot & 3;
        const int tile = blockIdx.x * RT + r;
        const int m = 8 * n + 2 * (owner & 3) + (c & 1);
        const int feature = (owner >> 2) + 8 * (c >> 1);
        if (tile < tiles && m < M) {
            if (splits == 1) {
                const Problem pq = problem_of(tile, tiles1, tiles2, p0, a0, s0, c0, f0, n0,
                                              p1, a1, s1, c1, f1, n1, p2, a2, s2, c2, f2);
                store_out(out + (size_t)m * stride_out + pq.column + pq.row0 + feature, sum,
                          r, m, feature, j);
            } else {
#if CLUSTER
                cluster_sums[r * 256 + m * 16 + feature] = sum;
#else
                ws[((size_t)tile * splits + split) * 256 + m * 16 + feature] = sum;
#endif
            }
        }
    }
    if (splits == 1) {
        after_stores(squares_out, tiles, M);
        return;
    }
#if CLUSTER
    // The row group's splits are one cluster (1 x splits CTAs, rank = split): the first CTA
    // adds the others' sums up from their shared memory, in split order as the workspace path
    // does (the same bits), and the others keep theirs until it has read them.
    cluster_sync();
    if (split == 0) {
#pragma unroll
        for (int j = 0; j < SLOTS; ++j) {
            int r, m, feature;
            if (slot_of(j, r, m, feature)) {
                const int tile = blockIdx.x * RT + r;
                float sum = 0.f;
                for (int s = 0; s < splits; ++s)
                    sum += cluster_load(&cluster_sums[r * 256 + m * 16 + feature], (u32)s);
                const Problem pq = problem_of(tile, tiles1, tiles2, p0, a0, s0, c0, f0, n0,
                                              p1, a1, s1, c1, f1, n1, p2, a2, s2, c2, f2);
                store_out(out + (size_t)m * stride_out + pq.column + pq.row0 + feature, sum,
                          r, m, feature, j);
            }
        }
        after_stores(squares_out, tiles, M);
    }
    cluster_sync();
    return;
#endif
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(locks + blockIdx.x, 1) == splits - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
        int r, m, feature;
        if (slot_of(j, r, m, feature)) {
            const int tile = blockIdx.x * RT + r;
            float sum = 0.f;
            for (int s = 0; s < splits; ++s)
                sum += __ldcg(ws + ((size_t)tile * splits + s) * 256 + m * 16 + feature);
            const Problem pq = problem_of(tile, tiles1, tiles2, p0, a0, s0, c0, f0, n0,
                                          p1, a1, s1, c1, f1, n1, p2, a2, s2, c2, f2);
            store_out(out + (size_t)m * stride_out + pq.column + pq.row0 + feature, sum, r, m,
                      feature, j);
        }
    }
    after_stores(squares_out, tiles, M);
    if (threadIdx.x == 0) atomicExch(locks + blockIdx.x, 0);
}
'''


def tiled(packed, absmax, out_features: int, in_features: int):
    """Copies of bitsandbytes' packed weight and absmax in the tiled layout (``tiled=True``
    launches): per tile of 16 rows, its 64-blocks one after the other, each the 16 rows' 32
    bytes (512 contiguous bytes, which a warp's two loads take whole), and its absmax the 16
    rows' values of one block in a row. The same bytes, moved within each tile."""
    tiles, blocks = out_features // 16, in_features // 64
    packed = packed.reshape(tiles, 16, blocks, 32).transpose(1, 2).contiguous().view(-1)
    absmax = absmax.reshape(tiles, 16, blocks).transpose(1, 2).contiguous().view(-1)
    return packed, absmax


def source_for(table, bf16: bool, nested: bool, shape: CudaShape, n_tiles: int,
               programmatic: bool = False, tiled: bool = False, x_fold: int = FOLD_NONE,
               residual: bool = False, norm_out: bool = False, act_out: bool = False,
               io_bf16: bool = False) -> str:
    """The kernel's source for one variant: the code table's bytes, the operand type, the
    absmax storage, the shape, whether it is launched with programmatic dependent launch,
    what it folds into its ``x`` loads (:data:`FOLDS`), whether it adds its product to
    ``out`` (a residual stream) and writes the sums of squares the next norm needs, and
    whether it also writes the next norm's weight times the new stream (``norm_out``), and
    whether it writes SiLU(gate) * up of its two weights instead of them (``act_out``), and
    whether ``x`` and ``out`` are bf16 around an fp16 product (``io_bf16``), as macros."""
    if x_fold not in FOLDS:
        raise ValueError(f'x_fold must be one of {FOLDS}, not {x_fold!r}')
    if norm_out and not residual:
        raise ValueError("norm_out writes the next norm's x beside a residual stream")
    if act_out and (residual or shape.row_tiles % 2):
        raise ValueError('act_out takes gate and up tiles in pairs (even row_tiles), no '
                         'residual')
    if io_bf16 and (bf16 or x_fold == FOLD_NORM):
        raise ValueError('bf16 x and out go with fp16 compute and no norm folded into x (the '
                         "norm's scale instead)")
    torch = require_torch()
    high, low = table_words(table, torch.bfloat16 if bf16 else torch.float16)
    if not fits(shape, n_tiles):
        raise ValueError(f'{shape} does not compile: table copies one of {TABLE_COPIES}, '
                         f'static shared memory {shared_bytes(shape, n_tiles)} bytes of at '
                         f'most {STATIC_SHARED_LIMIT}')
    defines = {'WARPS': shape.warps, 'RT': shape.row_tiles, 'PIPE': shape.pipe, 'NT': n_tiles,
               'NESTED': int(nested), 'DTYPE': '"bf16"' if bf16 else '"f16"',
               'PDL': int(programmatic), 'TABLE': shape.table, 'TILED': int(tiled),
               'TABLE_SHIFT': 2 + max(shape.table, 1).bit_length() - 1, 'IS_BF16': int(bf16),
               'XFORM': int(x_fold), 'RESIDUAL': int(residual), 'X_AHEAD': int(shape.x_ahead),
               'NORM_OUT': int(norm_out), 'ACT_OUT': int(act_out),
               'CLUSTER': int(shape.cluster), 'IO_BF16': int(io_bf16)}
    defines.update({f'HI{i}': f'{word:#x}u' for i, word in enumerate(high)})
    defines.update({f'LO{i}': f'{word:#x}u' for i, word in enumerate(low)})
    return ''.join(f'#define {key} {value}\n' for key, value in defines.items()) + SOURCE


_KERNELS: Dict[Tuple, object] = {}


def kernel_for(device, table, bf16: bool, nested: bool, shape: CudaShape, n_tiles: int,
               programmatic: bool = False, tiled: bool = False, x_fold: int = FOLD_NONE,
               residual: bool = False, norm_out: bool = False, act_out: bool = False,
               io_bf16: bool = False):
    """The compiled kernel for one variant on ``device`` (compiled once per process)."""
    torch = require_torch()
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, tuple(table), bf16, nested, shape, n_tiles, programmatic, tiled, x_fold,
           residual, norm_out, act_out, io_bf16)
    kernel = _KERNELS.get(key)
    if kernel is None:
        major, minor = torch.cuda.get_device_capability(index)
        if major < 8:
            raise RuntimeError('the CUDA NF4 kernel needs compute capability 8.0 or newer')
        cubin = nvrtc.compile_cubin(source_for(table, bf16, nested, shape, n_tiles,
                                               programmatic, tiled, x_fold, residual,
                                               norm_out, act_out, io_bf16),
                                    KERNEL_NAME, f'sm_{major}{minor}')
        kernel = nvrtc.Kernel(cubin, KERNEL_NAME, torch.device('cuda', index))
        _KERNELS[key] = kernel
    return kernel


def launch(x, out, workspace, locks, table, problems, in_features: int, splits: int,
           blocks_per_split: int, *, nested: bool, qblock2: int, bf16: bool,
           shape: CudaShape, programmatic: bool = False, tiled: bool = False,
           norm=None, act_offset: int = 0, squares_out=None, scale=None,
           norm_out=None, act_out: bool = False, io_bf16: bool = False) -> None:
    """``out[:, columns of weight g] = x @ W_g.T`` for the 1 to 3 ``problems`` (packed,
    absmax, absmax2, code2, offset, out features; out features multiples of 16). ``workspace``:
    ``tiles * splits * 256`` fp32 when ``splits > 1``; ``locks``: one zeroed int32 per CTA row
    group (a ``shape.cluster`` launch adds its splits up in shared memory and leaves both
    alone). ``programmatic``: with programmatic dependent launch (compute capability 9.0+).
    ``tiled``: the weights are in :func:`tiled`'s layout.

    Folded work (each at most one of the first two): ``norm = (weight, squares, eps)``: the
    product of RMSNorm(x) (``squares``: fp32 ``(in_features / 16, 16)``, each row's sum of
    squares per 16 columns, as a ``squares_out`` launch writes them). ``act_offset > 0``: of
    SiLU(x[:, :in]) * x[:, act_offset:act_offset + in]. ``scale = (squares, eps)``: ``x`` is
    the norm's weight times the residual stream (a ``norm_out`` launch wrote it), the sums are
    scaled by each row's 1 / rms from ``squares``. ``squares_out`` (one weight): ``out``
    becomes ``out + x @ W.T`` (rounded as two tensors' sum) and its sums of squares per 16
    columns go to ``squares_out``; with ``norm_out = (weight, x_out)`` also ``x_out`` (the
    stride of ``out``) = the next norm's ``weight`` times the new ``out``. ``act_out`` (two
    weights of one width, gate and up; ``shape.row_tiles`` even): ``out`` ``(rows, width)``
    = SiLU(x @ gate.T) * (x @ up.T), each product rounded to the compute dtype first (as
    the two outputs would be), the SiLU in fp32 with fast exponentials; each CTA takes gate's
    and up's tiles in turn.

    ``io_bf16`` (``bf16`` False, no ``norm``): ``x`` and ``out`` are bf16, the product
    fp16: ``x`` is rounded to fp16 as it is loaded and the product to fp16 and then bf16 as
    it is stored, the bits of ``x.to(float16)``, the fp16 launch and ``.to(bfloat16)``
    without the two copies (a model of bf16 layers with fp16 compute, as the article's). The
    folds' tensors are then bf16 too and their elementwise work is done in bf16; with
    ``scale`` each ``x`` row is multiplied by its 1 / rms before it is rounded to fp16."""
    if shape.cluster and splits > MAX_CLUSTER_SPLITS:
        raise ValueError(f'a clustered launch splits in at most {MAX_CLUSTER_SPLITS}, not '
                         f'{splits}')
    if sum((norm is not None, bool(act_offset), scale is not None)) > 1:
        raise ValueError('one launch folds a norm, an activation or a scale into x, not more')
    if norm_out is not None and squares_out is None:
        raise ValueError("norm_out writes the next norm's x beside a residual stream")
    if squares_out is not None and len(problems) != 1:
        raise ValueError('a residual launch takes one weight')
    if act_out and (len(problems) != 2 or problems[0][5] != problems[1][5] or act_offset
                    or squares_out is not None or shape.row_tiles % 2):
        raise ValueError('act_out takes two weights of one width (gate, up), an even '
                         'row_tiles, no activation into x and no residual')
    rows = x.shape[0]
    n_tiles = 1 if rows <= 8 else 2
    tiles = [problem[5] // 16 for problem in problems]
    total = sum(tiles)
    tiles1 = tiles[0] if len(tiles) > 1 else total
    tiles2 = tiles[0] + tiles[1] if len(tiles) > 2 else total
    padded = list(problems) + [problems[0]] * (3 - len(problems))
    arguments = [x, out, workspace, locks]
    for packed, absmax, absmax2, code2, offset, width in padded:
        arguments += [packed, absmax, absmax2, code2, float(offset), int(width)]
    arguments += [rows, in_features, x.stride(0), out.stride(0), tiles1, tiles2, total, splits,
                  blocks_per_split, max(qblock2, 1).bit_length() - 1]
    norm_weight, squares_in, eps = norm if norm is not None else (None, None, 0.0)
    if scale is not None:
        squares_in, eps = scale
    x_out = None
    if norm_out is not None:
        norm_weight, x_out = norm_out
    arguments += [norm_weight, squares_in, float(eps), int(act_offset), squares_out, x_out]
    x_fold = (FOLD_NORM if norm is not None else FOLD_ACT if act_offset
              else FOLD_SCALE if scale is not None else FOLD_NONE)
    kernel = kernel_for(x.device, table, bf16, nested, shape, n_tiles, programmatic, tiled,
                        x_fold, squares_out is not None, norm_out is not None, act_out,
                        io_bf16)
    clustered = shape.cluster and splits > 1
    kernel((-(-total // shape.row_tiles), splits), (32 * shape.warps,), arguments,
           programmatic=programmatic, cluster=(1, splits, 1) if clustered else None)


def row_groups(out_features, shape: CudaShape) -> int:
    """CTAs per split of one launch: row groups of ``row_tiles`` tiles of 16 rows."""
    widths = [out_features] if isinstance(out_features, int) else list(out_features)
    return -(-sum(width // 16 for width in widths) // shape.row_tiles)
