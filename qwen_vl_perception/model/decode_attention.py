"""Decode-step attention in one Triton launch: each row's query heads over the static cache's
keys up to the current position only (imports triton; :func:`attention` checks what it can
run).

``scaled_dot_product_attention`` on the static cache reads every key of the cache (the prompt
plus the answer's room, rounded up) with an additive mask, and costs ~14 us per layer on an
H200, mostly fixed. Here, for one key/value head of one row, the query heads that share it
(grouped-query attention, padded to 16 rows for the tensor cores) attend to keys ``0 ..
cache_position`` that ``key_valid`` allows (left padding), split into ``SPLIT`` parts that run
side by side; each part keeps a running max, sum and weighted sum in fp32 (online softmax) and
the last part of a head to finish adds the parts up in part order (deterministic; its counter
is reset for the next launch). Probabilities are rounded to the value dtype before they weight
the values, as flash attention does.
"""
import triton
import triton.language as tl

SPLIT = 128
"""Keys per part."""
BLOCK_KEYS = 64


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, position_ptr, out_ptr, ws_ptr,
                            lock_ptr, heads, splits, scale, stride_qb, stride_qh, stride_qg,
                            stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                            stride_valid, stride_ob, stride_oh, stride_og,
                            GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr,
                            SPLIT_KEYS: tl.constexpr, BLOCK: tl.constexpr):
    ROWS: tl.constexpr = 16  # query heads padded to the tensor cores' smallest tile
    row_head = tl.program_id(0)
    part = tl.program_id(1)
    b = row_head // heads
    h = row_head % heads
    g = tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    real = g < GROUPS
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + g[:, None] * stride_qg + d[None, :],
                mask=real[:, None], other=0.0)
    last = tl.load(position_ptr)  # keys past the current position are not written yet
    start = part * SPLIT_KEYS
    end = tl.minimum(start + SPLIT_KEYS, last + 1)
    best = tl.full((ROWS,), float('-inf'), tl.float32)
    total = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, HEAD_DIM), tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    for first in range(start, end, BLOCK):
        keys = first + tl.arange(0, BLOCK)
        inside = keys < end
        allowed = inside & (tl.load(valid_ptr + b * stride_valid + keys, mask=inside,
                                    other=0) != 0)
        k = tl.load(k_base + keys[:, None] * stride_kl + d[None, :], mask=inside[:, None],
                    other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(allowed[None, :], scores, float('-inf'))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        safe = tl.where(new_best == float('-inf'), 0.0, new_best)  # no key allowed yet
        weights = tl.exp(scores - safe[:, None])
        keep = tl.exp(best - safe)
        total = total * keep + tl.sum(weights, axis=1)
        v = tl.load(v_base + keys[:, None] * stride_vl + d[None, :], mask=inside[:, None],
                    other=0.0)
        acc = acc * keep[:, None] + tl.dot(weights.to(v.dtype), v)
        best = new_best
    # this part's (max, sum, weighted sum) to the workspace, then the last part adds up
    part_ws = ws_ptr + (row_head * splits + part) * (ROWS * (HEAD_DIM + 2))
    tl.store(part_ws + g * (HEAD_DIM + 2), best)
    tl.store(part_ws + g * (HEAD_DIM + 2) + 1, total)
    tl.store(part_ws + g[:, None] * (HEAD_DIM + 2) + 2 + d[None, :], acc)
    tl.debug_barrier()
    arrived = tl.atomic_add(lock_ptr + row_head, 1, sem='acq_rel', scope='gpu')
    if arrived == splits - 1:
        head_ws = ws_ptr + row_head * splits * (ROWS * (HEAD_DIM + 2))
        overall = tl.full((ROWS,), float('-inf'), tl.float32)
        for s in range(0, splits):
            overall = tl.maximum(overall, tl.load(head_ws + s * (ROWS * (HEAD_DIM + 2))
                                                  + g * (HEAD_DIM + 2), cache_modifier='.cg'))
        safe = tl.where(overall == float('-inf'), 0.0, overall)
        denominator = tl.zeros((ROWS,), tl.float32)
        numerator = tl.zeros((ROWS, HEAD_DIM), tl.float32)
        for s in range(0, splits):
            one = head_ws + s * (ROWS * (HEAD_DIM + 2))
            factor = tl.exp(tl.load(one + g * (HEAD_DIM + 2), cache_modifier='.cg') - safe)
            denominator += factor * tl.load(one + g * (HEAD_DIM + 2) + 1, cache_modifier='.cg')
            numerator += factor[:, None] * tl.load(
                one + g[:, None] * (HEAD_DIM + 2) + 2 + d[None, :], cache_modifier='.cg')
        result = numerator / tl.where(denominator == 0.0, 1.0, denominator)[:, None]
        tl.store(out_ptr + b * stride_ob + h * stride_oh + g[:, None] * stride_og + d[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=real[:, None])
        tl.atomic_xchg(lock_ptr + row_head, 0)


def launch(q, keys, values, key_valid, cache_position, out, workspace, locks, scale: float,
           num_warps: int = 4):
    """``out[b, h, g] = softmax(q[b, h, g] . keys[b, h, :p + 1] * scale) @ values[b, h]``
    over the keys ``key_valid`` allows, ``p = cache_position``. ``workspace``: at least
    :func:`workspace_floats` fp32; ``locks``: ``batch x heads`` zeroed int32."""
    batch, heads, groups, head_dim = q.shape
    splits = -(-keys.shape[2] // SPLIT)
    decode_attention_kernel[(batch * heads, splits)](
        q, keys, values, key_valid, cache_position, out, workspace, locks, heads, splits,
        scale, q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1),
        keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        key_valid.stride(0), out.stride(0), out.stride(1), out.stride(2), GROUPS=groups,
        HEAD_DIM=head_dim, SPLIT_KEYS=SPLIT, BLOCK=BLOCK_KEYS, num_warps=num_warps)


def workspace_floats(batch: int, heads: int, cache_len: int, head_dim: int) -> int:
    """The fp32 workspace :func:`launch` needs for one shape."""
    return batch * heads * -(-cache_len // SPLIT) * 16 * (head_dim + 2)
