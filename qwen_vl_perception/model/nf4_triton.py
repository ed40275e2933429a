"""The Triton kernel behind :mod:`qwen_vl_perception.model.nf4_matmul` (imports triton).

``partial[s] = x @ W[:, tiles of split s].T`` for a few rows of ``x`` (padded to ``BLOCK_M``).
Each step of a program takes one 64-wide quantization block of ``BLOCK_N`` weight rows: 32
packed bytes per row (two 4-bit codes each, high nibble first, row-major as bitsandbytes stores
them), turns the codes into NF4 values, multiplies them with ``x`` on tensor cores and scales
the fp32 result by the block's absmax (one per row and block, itself 8-bit quantized when
``NESTED``). The weight is read once for all rows of ``x`` and never written back dequantized.

``nf4_dequantize_kernel`` writes a whole weight in the compute dtype, for products with many
rows (prefill), where a matmul on the dequantized weight is the right tool.

The code-to-value step decides the speed (it runs for every weight element): ``LOOKUP`` 0 is
a tree of selects over the standard NF4 table, 1 a register gather from the table passed in.
The caller times both and keeps the faster.
"""
import triton
import triton.language as tl


@triton.jit
def _nf4_select(code):
    """NF4 value of 4-bit ``code`` by a binary tree of selects on its bits (the values of
    ``nf4_matmul.NF4_TABLE``)."""
    bit0 = (code & 1) != 0
    bit1 = (code & 2) != 0
    bit2 = (code & 4) != 0
    pair0 = tl.where(bit0, -0.6961928009986877, -1.0)
    pair1 = tl.where(bit0, -0.39491748809814453, -0.5250730514526367)
    pair2 = tl.where(bit0, -0.18477343022823334, -0.28444138169288635)
    pair3 = tl.where(bit0, 0.0, -0.09105003625154495)
    pair4 = tl.where(bit0, 0.16093020141124725, 0.07958029955625534)
    pair5 = tl.where(bit0, 0.33791524171829224, 0.24611230194568634)
    pair6 = tl.where(bit0, 0.5626170039176636, 0.44070982933044434)
    pair7 = tl.where(bit0, 1.0, 0.7229568362236023)
    quad0 = tl.where(bit1, pair1, pair0)
    quad1 = tl.where(bit1, pair3, pair2)
    quad2 = tl.where(bit1, pair5, pair4)
    quad3 = tl.where(bit1, pair7, pair6)
    half0 = tl.where(bit2, quad1, quad0)
    half1 = tl.where(bit2, quad3, quad2)
    return tl.where((code & 8) != 0, half1, half0)


@triton.jit
def nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr,
                      partial_ptr, offset, M, N, K, stride_xm, tiles_per_split,
                      NESTED: tl.constexpr, QBLOCK2: tl.constexpr, LOOKUP: tl.constexpr,
                      UNROLL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    QBLOCK: tl.constexpr = 64
    HALF: tl.constexpr = 32
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    pair = tl.arange(0, HALF)
    columns = tl.arange(0, QBLOCK)
    if LOOKUP == 1:
        table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[:, None], (16, BLOCK_N))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * tiles_per_split
    for step in range(tiles_per_split // UNROLL):
        for unrolled in tl.static_range(UNROLL):
            tile = first + step * UNROLL + unrolled
            k0 = tile * QBLOCK
            # (32 byte pairs, BLOCK_N rows): byte j of a row holds columns k0 + 2j and 2j + 1.
            packed = tl.load(packed_ptr + rows64[None, :] * (K // 2) + k0 // 2 + pair[:, None],
                             mask=row_ok[None, :], other=0).to(tl.int32)
            if LOOKUP == 0:
                high = _nf4_select((packed >> 4) & 15)
                low = _nf4_select(packed & 15)
            else:
                high = tl.gather(table, (packed >> 4) & 15, 0)
                low = tl.gather(table, packed & 15, 0)
            weights = tl.reshape(tl.permute(tl.join(high, low), (0, 2, 1)), (QBLOCK, BLOCK_N))
            block = rows64 * (K // QBLOCK) + tile
            if NESTED:
                quantized = tl.load(absmax_ptr + block, mask=row_ok, other=0).to(tl.int32)
                scale = (tl.load(code2_ptr + quantized)
                         * tl.load(absmax2_ptr + block // QBLOCK2, mask=row_ok, other=0.0)
                         + offset)
            else:
                scale = tl.load(absmax_ptr + block, mask=row_ok, other=0.0)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k0 + columns[None, :],
                        mask=m_ok[:, None], other=0.0)
            acc += tl.dot(x, weights.to(x_ptr.dtype.element_ty)) * scale[None, :]
    out = partial_ptr + split * M * N + m[:, None] * N + rows[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & row_ok[None, :])


def launch(x, packed, absmax, absmax2, code2, code, partial, offset, n, k, splits, nested,
           qblock2, lookup, unroll, block_m, block_n, num_warps, num_stages):
    """Run the kernel over a ``(cdiv(n, block_n), splits)`` grid into ``partial``; ``splits``
    must divide the ``k / 64`` blocks, in groups of ``unroll``."""
    grid = (triton.cdiv(n, block_n), splits)
    nf4_matmul_kernel[grid](
        x, packed, absmax, absmax2, code2, code, partial, offset, x.shape[0], n, k,
        x.stride(0), k // 64 // splits, NESTED=nested, QBLOCK2=qblock2, LOOKUP=lookup,
        UNROLL=unroll, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        num_stages=num_stages)


@triton.jit
def nf4_dequantize_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr,
                          offset, n_bytes, NESTED: tl.constexpr, QBLOCK2: tl.constexpr,
                          BLOCK: tl.constexpr):
    """``out`` (row-major, the compute dtype) = the weight, as bitsandbytes dequantizes it:
    ``code * absmax`` in fp32, rounded once. Each program takes ``BLOCK`` packed bytes."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = index < n_bytes
    packed = tl.load(packed_ptr + index, mask=ok, other=0).to(tl.int32)
    block = index // 32  # 64 values = 32 bytes per absmax
    if NESTED:
        quantized = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + quantized) * tl.load(absmax2_ptr + block // QBLOCK2,
                                                         mask=ok, other=0.0)
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=ok, other=0.0)
    high = tl.load(code_ptr + (packed >> 4)) * scale
    low = tl.load(code_ptr + (packed & 15)) * scale
    values = tl.reshape(tl.join(high, low), (2 * BLOCK,)).to(out_ptr.dtype.element_ty)
    position = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + position, values, mask=position < 2 * n_bytes)


def dequantize(packed, absmax, absmax2, code2, code, out, offset, nested, qblock2,
               block=1024):
    """Fill ``out`` (``2 * packed.numel()`` values) with the dequantized weight."""
    n_bytes = packed.numel()
    nf4_dequantize_kernel[(triton.cdiv(n_bytes, block),)](
        packed, absmax, absmax2, code2, code, out, offset, n_bytes, NESTED=nested,
        QBLOCK2=qblock2, BLOCK=block)
