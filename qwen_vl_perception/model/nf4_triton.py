"""The Triton kernels behind :mod:`qwen_vl_perception.model.nf4_matmul` (imports triton).

``nf4_decode_matmul_kernel``: ``out = x @ W.T`` for 1 to 16 rows of ``x`` and up to three
NF4 weights that share ``x`` (e.g. a layer's q, k and v projections), written side by side
into ``out``. bitsandbytes' packed weights are read as they are stored (row-major, two 4-bit
codes per byte, high nibble first). Each program takes ``BLOCK_N`` rows of one weight and a
``1 / SPLITS`` share of the reduction, one 64-wide quantization block per step: 32 bytes per
row, decoded into the 64 code values in the compute dtype, multiplied with the 64 matching
columns of ``x`` (``DOT``: on tensor cores, rows padded to 16; else by fp32 FMAs, for one to a
few rows), the fp32 result scaled by the block's absmax (itself 8-bit quantized when
``NESTED``). With ``SPLITS > 1`` each program writes its fp32 partial to a workspace and counts
itself in its tile's lock; the last one of a tile adds the partials up in a fixed order, writes
the output and resets the lock, so the product is one launch and deterministic.

The code-to-value step runs for every weight element and decides the speed. ``LOOKUP`` 0 is
``ASM``: PTX made by :func:`nf4_codes.lookup_asm`, which decodes the 8 codes of 4 bytes with
16 byte permutes (``prmt``) over the 16-entry table held as immediates (two 8-byte halves per
byte of the 16-bit values, the code's top bit picking the half). ``LOOKUP`` 1 gathers from the
table in memory (Triton's CPU interpreter cannot run inline PTX; tests use it there).

``nf4_dequantize_kernel`` writes a whole weight in the compute dtype, for products with many
rows (prefill), where a matmul on the dequantized weight is the right tool.
"""
import triton
import triton.language as tl


@triton.jit
def _decode(packed, table_ptr, LOOKUP: tl.constexpr, ASM: tl.constexpr,
            CONSTRAINTS: tl.constexpr, PACK: tl.constexpr, BF16: tl.constexpr):
    """``(even, odd)``: the table values of ``packed`` bytes' high and low nibbles (the
    weight's even and odd columns) in the compute dtype."""
    if BF16:
        dtype = tl.bfloat16
    else:
        dtype = tl.float16
    if LOOKUP == 0:  # one operand only: Triton then decodes in the tensor cores' layout
        even, odd = tl.inline_asm_elementwise(ASM, CONSTRAINTS, [packed], dtype=(dtype, dtype),
                                              is_pure=True, pack=PACK)
    else:
        codes = packed.to(tl.int32)
        even = tl.load(table_ptr + (codes >> 4)).to(dtype)
        odd = tl.load(table_ptr + (codes & 15)).to(dtype)
    return even, odd


@triton.jit
def _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, block, NESTED: tl.constexpr,
            QBLOCK2_LOG2: tl.constexpr):
    """fp32 scales of quantization blocks ``block`` (non-negative int32): bitsandbytes' 8-bit
    absmax with its second-level scales when ``NESTED``, else one float per block."""
    if NESTED:
        quantized = tl.load(absmax_ptr + block).to(tl.int32)
        scale = tl.load(code2_ptr + quantized) * tl.load(absmax2_ptr + (block >> QBLOCK2_LOG2))
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + block).to(tl.float32)
    return scale


@triton.jit
def nf4_decode_matmul_kernel(
        x_ptr, out_ptr, ws_ptr, lock_ptr, table_ptr,
        packed0, absmax0, absmax20, code20, offset0, n0,
        packed1, absmax1, absmax21, code21, offset1, n1,
        packed2, absmax2, absmax22, code22, offset2, n2,
        M, row_bytes, blocks, stride_xm, stride_om, tiles1, tiles2, splits, blocks_per_split,
        NESTED: tl.constexpr, QBLOCK2_LOG2: tl.constexpr, LOOKUP: tl.constexpr,
        ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, PACK: tl.constexpr, BF16: tl.constexpr,
        BLOCK_N: tl.constexpr):
    BLOCK_M: tl.constexpr = 16  # the tensor cores' smallest row tile; rows past M are 0
    tile = tl.program_id(0)
    split = tl.program_id(1)
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr = packed0, absmax0, absmax20, code20
    offset, n, column, local = offset0, n0, 0, tile
    if tile >= tiles1:  # the second weight of a group
        packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr = packed1, absmax1, absmax21, code21
        offset, n, column, local = offset1, n1, n0, tile - tiles1
        if tile >= tiles2:  # the third
            packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr = packed2, absmax2, absmax22, code22
            offset, n, column, local = offset2, n2, n0 + n1, tile - tiles2
    rows = local * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in = tl.minimum(rows, n - 1)  # padding rows re-read the last one
    m = tl.arange(0, BLOCK_M)
    real = m[:, None] < M  # padding rows are neither read nor written
    byte_ptrs = (packed_ptr + rows_in.to(tl.int64)[:, None] * row_bytes
                 + tl.arange(0, 32)[None, :])
    x_ptrs = x_ptr + m[:, None] * stride_xm + tl.arange(0, 64)[None, :]
    row_blocks = rows_in * blocks
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, blocks)
    for block in range(first, last):
        even, odd = _decode(tl.load(byte_ptrs + block * 32), table_ptr, LOOKUP, ASM,
                            CONSTRAINTS, PACK, BF16)
        x = tl.load(x_ptrs + block * 64, mask=real, other=0.0).to(even.dtype)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, 32, 2)))
        part = tl.dot(x_even, tl.trans(even))
        part = tl.dot(x_odd, tl.trans(odd), part)
        scale = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, row_blocks + block,
                        NESTED, QBLOCK2_LOG2)
        acc += part * scale[None, :]
    out_ptrs = out_ptr + m[:, None] * stride_om + column + rows[None, :]
    out_mask = real & (rows[None, :] < n)
    if splits == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile_ws = ws_ptr + tile * splits * (BLOCK_M * BLOCK_N)
        within = m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(tile_ws + split * (BLOCK_M * BLOCK_N) + within, acc, mask=real)
        tl.debug_barrier()  # every thread's partial is written before the count
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem='acq_rel', scope='gpu')
        if arrived == splits - 1:  # the last of the tile: add up in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for first_part in range(0, splits, 4):  # four loads in flight at a time
                for more in tl.static_range(4):
                    part_index = m[:, None] * 0 + first_part + more
                    total += tl.load(tile_ws + part_index * (BLOCK_M * BLOCK_N) + within,
                                     mask=real & (part_index < splits), other=0.0,
                                     cache_modifier='.cg')
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


def launch(x, out, workspace, locks, table, problems, tiles, in_features, blocks, splits,
           blocks_per_split, *, nested, qblock2, lookup, asm, constraints, pack, bf16,
           block_n, num_warps, num_stages):
    """``out[:, columns of weight g] = x @ W_g.T`` for the 1 to 3 ``problems`` (packed,
    absmax, absmax2, code2, offset, out features), ``tiles[g]`` programs of ``block_n`` rows
    each, times ``splits`` parts of the reduction of ``blocks_per_split`` 64-blocks."""
    total = sum(tiles)
    tiles1 = tiles[0] if len(tiles) > 1 else total  # where the second weight's programs start
    tiles2 = tiles[0] + tiles[1] if len(tiles) > 2 else total
    padded = list(problems) + [problems[0]] * (3 - len(problems))
    arguments = [value for problem in padded for value in problem]
    nf4_decode_matmul_kernel[(total, splits)](
        x, out, workspace, locks, table, *arguments, x.shape[0], in_features // 2, blocks,
        x.stride(0), out.stride(0), tiles1, tiles2, splits, blocks_per_split,
        NESTED=nested, QBLOCK2_LOG2=max(qblock2, 1).bit_length() - 1, LOOKUP=lookup, ASM=asm,
        CONSTRAINTS=constraints, PACK=pack, BF16=bf16, BLOCK_N=block_n, num_warps=num_warps,
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
