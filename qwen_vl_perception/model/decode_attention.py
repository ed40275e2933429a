"""Decode-step attention in one Triton launch: each row's query heads over the static cache's
keys up to the current position only (imports triton; :func:`attention` checks what it can
run).

``scaled_dot_product_attention`` on the static cache reads every key of the cache (the prompt
plus the answer's room, rounded up) with an additive mask, and costs ~14 us per layer on an
H200, mostly fixed. Here, for one key/value head of one row, the query heads that share it
(grouped-query attention, padded to 16 rows for the tensor cores) attend to keys ``0 ..
cache_position`` that ``key_valid`` allows (left padding), split into parts of 32 to 128 keys
that run side by side; only the parts holding keys up to the position do anything. Each keeps
a running max, sum and weighted sum in fp32 (online softmax); a lone part writes its answer,
otherwise the last part of a head to finish adds the parts up in a fixed order (deterministic;
its counter is reset for the next launch), loading every part's max and sum at once and the
weighted sums of several parts at a time (``ADDED_ROWS`` query rows x parts), so that it waits
for memory a few times, not twice per part. Probabilities are rounded to the value dtype
before they weight the values, as flash attention does.

Given this step's key and value (``new_keys``, ``new_values``), the kernel also writes them into
the cache at ``cache_position`` (the part holding that position stores them, and uses them from
registers), which saves the step two copy kernels per layer. Given ``norm_rope`` too, the query
and key come straight from the projection: the kernel applies Qwen3's per-head RMSNorm and the
rotary embedding itself (as the compiled step computes them: in fp32, rounded once at the
end), which saves the step the two kernels of its compiled q/k norm per layer.

With ``overlap=True`` (compute capability 9.0+, :func:`overlap_supported`) the kernel is launched
with programmatic dependent launch: its programs may start while the projection before it
finishes; they load the position, ``key_valid`` and their first block of cached keys and
values, which that projection does not write, then wait (``griddepcontrol.wait``) before they
read its q, k and v, and let the next kernel (the output projection, :mod:`nf4_cuda`) launch
at once, so that its weight loads run beside the attention. (Without ``new_keys`` the caller
wrote this step's key, perhaps in the kernel just before: then the wait comes first.)
"""
import triton
import triton.language as tl

try:  # Triton 3.4+
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

SPLIT = 128
"""Keys per part, at most (:func:`split_for`)."""
MIN_SPLIT = 32
"""Keys per part, at least (:func:`split_for`)."""
BLOCK_KEYS = 64
ADDED_ROWS = 32
"""Query rows x parts whose weighted sums the last part loads at once (8 parts of 4 query rows
at a head size of 128: 32 fp32 registers per thread at 4 warps)."""


@triton.jit
def _norm_rope(x, swapped, weight, weight_swapped, cos, sin, sign, eps,
               HEAD_DIM: tl.constexpr, AXIS: tl.constexpr):
    """RMSNorm over the last axis, then ``x * cos + rotate_half(x) * sin``; ``swapped``: ``x``
    with its halves swapped (``weight_swapped`` likewise), ``sign``: -1 on the first half. In
    fp32 throughout and rounded to ``x``'s dtype once, as the compiled step computes it
    (inductor drops ``_rms_norm``'s intermediate cast to bf16/fp16 unless
    ``emulate_precision_casts`` is set)."""
    dtype = x.dtype
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=AXIS, keep_dims=True) / HEAD_DIM + eps)
    normed = x * rstd * weight.to(tl.float32)
    normed_swapped = swapped.to(tl.float32) * rstd * weight_swapped.to(tl.float32)
    return (normed * cos + sign * normed_swapped * sin).to(dtype)


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, new_k_ptr, new_v_ptr, valid_ptr, position_ptr,
                            out_ptr, ws_ptr, lock_ptr, heads, splits, scale, stride_qb,
                            stride_qh, stride_qg, stride_kb, stride_kh, stride_kl, stride_vb,
                            stride_vh, stride_vl, stride_nkb, stride_nkh, stride_nvb,
                            stride_nvh, stride_valid, stride_ob, stride_oh, stride_og,
                            q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, stride_cb,
                            stride_sb, eps, cache_len, GROUPS: tl.constexpr,
                            HEAD_DIM: tl.constexpr,
                            SPLIT_KEYS: tl.constexpr, BLOCK: tl.constexpr,
                            WRITE: tl.constexpr, NORM_ROPE: tl.constexpr,
                            OVERLAP: tl.constexpr, PARTS: tl.constexpr,
                            GROUP_ROWS: tl.constexpr, CHUNK: tl.constexpr):
    ROWS: tl.constexpr = 16  # query heads padded to the tensor cores' smallest tile
    row_head = tl.program_id(0)
    part = tl.program_id(1)
    b = row_head // heads
    h = row_head % heads
    g = tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    real = g < GROUPS
    if OVERLAP and not WRITE:  # the caller wrote this step's key: maybe the kernel just before
        gdc_wait()
    # The position, key_valid and the part's first block of cached keys and values, which the
    # kernel just before does not write (with WRITE): loaded before the wait below, beside it
    last = tl.load(position_ptr)  # keys past the current position are not written yet
    live = tl.minimum(last // SPLIT_KEYS + 1, splits)  # the parts holding keys 0 .. last
    start = part * SPLIT_KEYS
    end = tl.minimum(tl.minimum(start + SPLIT_KEYS, last + 1), cache_len)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    first_keys = start + tl.arange(0, BLOCK)
    inside = first_keys < tl.where(part < live, end, start)  # none for a part past the position
    k_next = tl.load(k_base + first_keys[:, None] * stride_kl + d[None, :],
                     mask=inside[:, None], other=0.0)
    v_next = tl.load(v_base + first_keys[:, None] * stride_vl + d[None, :],
                     mask=inside[:, None], other=0.0)
    valid_next = tl.load(valid_ptr + b * stride_valid + first_keys, mask=inside, other=0)
    if OVERLAP:  # programmatic dependent launch: wait for the projection, let the next start
        if WRITE:
            gdc_wait()
        gdc_launch_dependents()
    q_rows = q_ptr + b * stride_qb + h * stride_qh + g[:, None] * stride_qg
    q = tl.load(q_rows + d[None, :], mask=real[:, None], other=0.0)
    if NORM_ROPE:
        half: tl.constexpr = HEAD_DIM // 2
        swap = (d + half) % HEAD_DIM
        sign = tl.where(d < half, -1.0, 1.0)
        cos = tl.load(cos_ptr + b * stride_cb + d).to(tl.float32)
        sin = tl.load(sin_ptr + b * stride_sb + d).to(tl.float32)
        q = _norm_rope(q, tl.load(q_rows + swap[None, :], mask=real[:, None], other=0.0),
                       tl.load(q_weight_ptr + d)[None, :], tl.load(q_weight_ptr + swap)[None, :],
                       cos[None, :], sin[None, :], sign[None, :], eps, HEAD_DIM, 1)
    if part < live:  # a part past the position has nothing to add, nor to write
        best = tl.full((ROWS,), float('-inf'), tl.float32)
        total = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, HEAD_DIM), tl.float32)
        if WRITE:  # this step's key and value: into the cache by the part that holds them
            new_k = tl.load(new_k_ptr + b * stride_nkb + h * stride_nkh + d)
            if NORM_ROPE:
                new_k = _norm_rope(new_k,
                                   tl.load(new_k_ptr + b * stride_nkb + h * stride_nkh + swap),
                                   tl.load(k_weight_ptr + d), tl.load(k_weight_ptr + swap), cos,
                                   sin, sign, eps, HEAD_DIM, 0)
            new_v = tl.load(new_v_ptr + b * stride_nvb + h * stride_nvh + d)
            here = d < tl.where((start <= last) & (last < start + SPLIT_KEYS)
                                & (last < cache_len), HEAD_DIM, 0)
            tl.store(k_base + last * stride_kl + d, new_k, mask=here)
            tl.store(v_base + last * stride_vl + d, new_v, mask=here)
        for first in range(start, end, BLOCK):  # each block's loads one block ahead
            keys = first + tl.arange(0, BLOCK)
            allowed = (keys < end) & (valid_next != 0)
            k = k_next
            v = v_next
            ahead = keys + BLOCK
            on = ahead < end
            k_next = tl.load(k_base + ahead[:, None] * stride_kl + d[None, :], mask=on[:, None],
                             other=0.0)
            v_next = tl.load(v_base + ahead[:, None] * stride_vl + d[None, :], mask=on[:, None],
                             other=0.0)
            valid_next = tl.load(valid_ptr + b * stride_valid + ahead, mask=on, other=0)
            if WRITE:  # the current position from registers (its store may not be seen)
                k = tl.where((keys == last)[:, None], new_k[None, :], k)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(allowed[None, :], scores, float('-inf'))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            safe = tl.where(new_best == float('-inf'), 0.0, new_best)  # no key allowed yet
            weights = tl.exp(scores - safe[:, None])
            keep = tl.exp(best - safe)
            total = total * keep + tl.sum(weights, axis=1)
            if WRITE:
                v = tl.where((keys == last)[:, None], new_v[None, :], v)
            acc = acc * keep[:, None] + tl.dot(weights.to(v.dtype), v)
            best = new_best
        if live == 1:  # the only part: its answer, without the workspace
            result = acc / tl.where(total == 0.0, 1.0, total)[:, None]
            tl.store(out_ptr + b * stride_ob + h * stride_oh + g[:, None] * stride_og
                     + d[None, :], result.to(out_ptr.dtype.element_ty), mask=real[:, None])
        else:
            # this part's (max, sum, weighted sum) to the workspace, then the last adds up
            part_ws = ws_ptr + (row_head * splits + part) * (ROWS * (HEAD_DIM + 2))
            tl.store(part_ws + g * (HEAD_DIM + 2), best, mask=real)
            tl.store(part_ws + g * (HEAD_DIM + 2) + 1, total, mask=real)
            tl.store(part_ws + g[:, None] * (HEAD_DIM + 2) + 2 + d[None, :], acc,
                     mask=real[:, None])
            tl.debug_barrier()
            arrived = tl.atomic_add(lock_ptr + row_head, 1, sem='acq_rel', scope='gpu')
            if arrived == live - 1:
                result = _added_parts(ws_ptr + row_head * splits * (ROWS * (HEAD_DIM + 2)),
                                      live, GROUPS, GROUP_ROWS, ROWS, HEAD_DIM, PARTS, CHUNK)
                r = tl.arange(0, GROUP_ROWS)
                tl.store(out_ptr + b * stride_ob + h * stride_oh + r[:, None] * stride_og
                         + d[None, :], result.to(out_ptr.dtype.element_ty),
                         mask=(r < GROUPS)[:, None])
                tl.atomic_xchg(lock_ptr + row_head, 0)


@triton.jit
def _added_parts(head_ws, live, GROUPS: tl.constexpr, GROUP_ROWS: tl.constexpr,
                 ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, PARTS: tl.constexpr,
                 CHUNK: tl.constexpr):
    """The attention of a head's ``GROUPS`` query rows (``GROUP_ROWS``: padded to a power of
    two) from ``live`` parts' (max, sum, weighted sum) in ``head_ws``. Every part's max and sum
    come in one load, the weighted sums in loads of ``CHUNK`` parts, each independent of the
    others: a few memory round trips, not two per part. Deterministic."""
    STRIDE: tl.constexpr = ROWS * (HEAD_DIM + 2)
    ROW: tl.constexpr = HEAD_DIM + 2
    r = tl.arange(0, GROUP_ROWS)
    d = tl.arange(0, HEAD_DIM)
    s = tl.arange(0, PARTS)
    c = tl.arange(0, CHUNK)
    real = r < GROUPS
    on = (s < live)[:, None] & real[None, :]
    stats = head_ws + s[:, None] * STRIDE + r[None, :] * ROW
    maxima = tl.load(stats, mask=on, other=float('-inf'), cache_modifier='.cg')
    totals = tl.load(stats + 1, mask=on, other=0.0, cache_modifier='.cg')
    overall = tl.max(maxima, axis=0)
    safe = tl.where(overall == float('-inf'), 0.0, overall)
    denominator = tl.sum(tl.exp(maxima - safe[None, :]) * totals, axis=0)
    numerator = tl.zeros((GROUP_ROWS, HEAD_DIM), tl.float32)
    for first in range(0, live, CHUNK):
        parts = first + c
        here = (parts < live)[:, None] & real[None, :]
        rows = head_ws + parts[:, None] * STRIDE + r[None, :] * ROW
        weighted = tl.load(rows[:, :, None] + 2 + d[None, None, :], mask=here[:, :, None],
                           other=0.0, cache_modifier='.cg')
        factors = tl.exp(tl.load(rows, mask=here, other=float('-inf'), cache_modifier='.cg')
                         - safe[None, :])  # 0 past ``live`` and in padded rows
        numerator += tl.sum(factors[:, :, None] * weighted, axis=0)
    return numerator / tl.where(denominator == 0.0, 1.0, denominator)[:, None]


def launch(q, keys, values, key_valid, cache_position, out, workspace, locks, scale: float,
           num_warps: int = 4, new_keys=None, new_values=None, norm_rope=None,
           split: int = SPLIT, overlap: bool = False):
    """``out[b, h, g] = softmax(q[b, h, g] . keys[b, h, :p + 1] * scale) @ values[b, h]``
    over the keys ``key_valid`` allows, ``p = cache_position``. ``workspace``: at least
    :func:`workspace_floats` fp32 (for the same ``split``); ``locks``: ``batch x heads`` zeroed
    int32. With ``new_keys`` and ``new_values`` (``batch x heads x head_dim``, last dimension
    contiguous) the kernel first writes them at ``p`` of ``keys`` and ``values``. With
    ``norm_rope = (q_weight, k_weight, eps, cos, sin)`` (weights ``head_dim``, ``cos`` and
    ``sin`` ``batch x head_dim``), ``q`` and ``new_keys`` are taken before Qwen3's q/k RMSNorm
    and rotary embedding, which the kernel applies. ``overlap``: launched with programmatic
    dependent launch (only where :func:`overlap_supported`); with ``new_keys``, the kernel just
before must not write ``cache_position``, ``key_valid`` or the cache (they are read before
its wait)."""
    batch, heads, groups, head_dim = q.shape
    write = new_keys is not None
    if write != (new_values is not None):
        raise ValueError('new_keys and new_values go together')
    if norm_rope is not None and not write:
        raise ValueError('norm_rope needs new_keys and new_values')
    if write:
        expected = (batch, heads, head_dim)
        for name, tensor in (('new_keys', new_keys), ('new_values', new_values)):
            if tuple(tensor.shape) != expected or tensor.stride(-1) != 1:
                raise ValueError(f'{name} must be {expected} with a contiguous last dimension')
    else:
        new_keys = new_values = q  # not read
    if norm_rope is not None:
        q_weight, k_weight, eps, cos, sin = norm_rope
        for name, tensor, shape in (('q_weight', q_weight, (head_dim,)),
                                    ('k_weight', k_weight, (head_dim,)),
                                    ('cos', cos, (batch, head_dim)),
                                    ('sin', sin, (batch, head_dim))):
            if tuple(tensor.shape) != shape or tensor.stride(-1) != 1:
                raise ValueError(f'{name} must be {shape} with a contiguous last dimension')
    else:
        q_weight = k_weight = cos = sin = q  # not read
        eps = 0.0
    if q.stride(-1) != 1:
        raise ValueError('q must have a contiguous last dimension')
    if not 1 <= groups <= 16:
        raise ValueError(f'1 to 16 query heads per key head, not {groups}')
    if split < 16 or split & (split - 1):
        raise ValueError(f'split must be a power of two of at least 16, got {split}')
    splits = -(-keys.shape[2] // split)
    options = {'launch_pdl': True} if overlap else {}
    group_rows = triton.next_power_of_2(groups)
    decode_attention_kernel[(batch * heads, splits)](
        q, keys, values, new_keys, new_values, key_valid, cache_position, out, workspace, locks,
        heads, splits, scale, q.stride(0), q.stride(1), q.stride(2), keys.stride(0),
        keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        new_keys.stride(0), new_keys.stride(1), new_values.stride(0), new_values.stride(1),
        key_valid.stride(0), out.stride(0), out.stride(1), out.stride(2), q_weight, k_weight,
        cos, sin, cos.stride(0), sin.stride(0), float(eps), keys.shape[2], GROUPS=groups,
        HEAD_DIM=head_dim, SPLIT_KEYS=split, BLOCK=min(BLOCK_KEYS, split), WRITE=write,
        NORM_ROPE=norm_rope is not None, OVERLAP=bool(overlap),
        PARTS=triton.next_power_of_2(splits), GROUP_ROWS=group_rows,
        CHUNK=min(triton.next_power_of_2(splits), max(1, ADDED_ROWS // group_rows)),
        num_warps=num_warps, **options)


def overlap_supported(device) -> bool:
    """Whether :func:`launch` can overlap on ``device``: a CUDA GPU of compute capability 9.0+
    and a Triton with programmatic dependent launch."""
    from .torch_support import require_torch
    torch = require_torch()
    device = torch.device(device)
    return (gdc_wait is not None and device.type == 'cuda'
            and torch.cuda.get_device_capability(device)[0] >= 9)


def split_for(batch: int, heads: int, cache_len: int, multiprocessors: int) -> int:
    """Keys per part for a launch: :data:`SPLIT`, halved down to :data:`MIN_SPLIT` while the
    launch would have fewer programs (rows x key heads x parts) than the GPU has
    multiprocessors. One frame on an H200 (8 key heads, 132 multiprocessors) runs 48 programs
    over a 768-key cache in parts of 128 keys, which leaves most of the GPU idle."""
    split = SPLIT
    while split > MIN_SPLIT and batch * heads * -(-cache_len // split) < multiprocessors:
        split //= 2
    return split


def workspace_floats(batch: int, heads: int, cache_len: int, head_dim: int,
                     split: int = SPLIT) -> int:
    """The fp32 workspace :func:`launch` needs for one shape."""
    return batch * heads * -(-cache_len // split) * 16 * (head_dim + 2)
