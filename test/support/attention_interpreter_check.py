"""Runs the decode-attention kernel in Triton's CPU interpreter against
``scaled_dot_product_attention`` with the decode step's mask (run in a subprocess: the
interpreter is chosen when triton is imported). Prints one line per case, then the count.

The interpreter runs a program's statements in order, so it cannot show whether the kernel
takes the step's key and value from registers at their position (on a GPU another thread's
store may not be seen yet): the GPU test does."""
import os

os.environ['TRITON_INTERPRET'] = '1'

import torch  # noqa: E402

from qwen_vl_perception.model import decode_attention  # noqa: E402
from qwen_vl_perception.model.decode_session import StepKernels  # noqa: E402


def reference(q, keys, values, key_valid, position, scale):
    index = torch.arange(keys.shape[2])
    allowed = key_valid & (index <= position)
    mask = torch.where(allowed, 0.0, float('-inf'))[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                            scale=scale)


def normed_and_rotated(q, new_keys, norm_rope):
    """The decode step's own q/k RMSNorm and rotary embedding (``StepKernels``, eager)."""
    batch, heads, groups, head_dim = q.shape
    q_weight, k_weight, eps, cos, sin = norm_rope
    q, k = StepKernels(torch, False).qk_norm_rope(
        q.reshape(batch, 1, heads * groups, head_dim), new_keys[:, None], q_weight, k_weight,
        eps, cos[:, None], sin[:, None])
    return q.reshape(batch, heads, groups, head_dim), k[:, :, 0]


def check(q, keys, values, key_valid, position, workspace, locks, scale, write, split,
          rotate=False):
    """One launch; with ``write`` this step's key and value are the kernel's to store (the
    cache holds NaN there before); with ``rotate`` the kernel norms and rotates q and k."""
    batch, heads, _, head_dim = q.shape
    new = {}
    if write:
        keys, values = keys.clone(), values.clone()
        new = dict(new_keys=torch.randn(batch, heads, head_dim),
                   new_values=torch.randn(batch, heads, head_dim))
        query, key = q, new['new_keys']
        if rotate:
            angles = torch.randn(batch, head_dim // 2).repeat(1, 2)
            new['norm_rope'] = (torch.rand(head_dim) + 0.5, torch.rand(head_dim) + 0.5, 1e-6,
                                angles.cos(), angles.sin())
            query, key = normed_and_rotated(q, key, new['norm_rope'])
        written_keys, written_values = keys.clone(), values.clone()
        written_keys[:, :, position] = key
        written_values[:, :, position] = new['new_values']
        keys[:, :, position] = values[:, :, position] = float('nan')
        expected = reference(query, written_keys, written_values, key_valid, position, scale)
    else:
        expected = reference(q, keys, values, key_valid, position, scale)
    out = torch.full_like(q, float('nan'))
    workspace.fill_(float('nan'))  # as torch.empty may leave it: only what a launch wrote counts
    decode_attention.launch(q, keys, values, key_valid, torch.tensor([position]), out,
                            workspace, locks, scale, split=split, **new)
    error = (out - expected).abs().max().item()
    assert error < 1e-4, (tuple(q.shape), position, write, rotate, error)
    assert not locks.any(), 'a counter was left set'
    if write:
        assert torch.equal(values, written_values), 'the value was not written alone'
        assert (keys - written_keys).abs().max() < 1e-5, 'the key was not written alone'
    print(f'shape {tuple(q.shape)} cache {keys.shape[2]} split {split} position {position} '
          f'write {write} rotate {rotate}: max error {error:.2e}')
    return 1


def check_fp16_rotated(position=200):
    """float16 with the kernel's norm and rotation: one rounding to float16 of the fp32 norm and
    rotation (as the compiled step), then the attention (probabilities rounded as in flash
    attention), against the same in fp32."""
    batch, heads, groups, head_dim, cache_len = 2, 2, 4, 32, 300
    q = torch.randn(batch, heads, groups, head_dim).half()
    keys, values = (torch.randn(batch, heads, cache_len, head_dim).half() for _ in range(2))
    new_keys, new_values = (torch.randn(batch, heads, head_dim).half() for _ in range(2))
    angles = torch.randn(batch, head_dim // 2).repeat(1, 2)
    weights = [(torch.rand(head_dim) + 0.5).half() for _ in range(2)]
    key_valid = torch.ones(batch, cache_len, dtype=torch.bool)
    workspace = torch.zeros(decode_attention.workspace_floats(batch, heads, cache_len, head_dim))
    locks = torch.zeros(batch * heads, dtype=torch.int32)
    norm_rope = (*weights, 1e-6, angles.cos().half(), angles.sin().half())
    query, key = normed_and_rotated(q.float(), new_keys.float(), tuple(
        part.float() if torch.is_tensor(part) else part for part in norm_rope))
    query, key = query.half(), key.half()
    written_keys, written_values = keys.clone(), values.clone()
    written_keys[:, :, position], written_values[:, :, position] = key, new_values
    expected = reference(query.float(), written_keys.float(), written_values.float(), key_valid,
                         position, head_dim ** -0.5)
    out = torch.empty_like(q)
    decode_attention.launch(q, keys, values, key_valid, torch.tensor([position]), out,
                            workspace, locks, head_dim ** -0.5, new_keys=new_keys,
                            new_values=new_values, norm_rope=norm_rope)
    key_error = (keys[:, :, position].float() - key.float()).abs().max().item()
    assert key_error <= 2 ** -10 * key.float().abs().max().item(), key_error  # an ulp at most
    error = (out.float() - expected).abs().max().item()
    assert error < 1e-2, error
    print(f'float16 rotated, position {position}: key within {key_error:.2e}, '
          f'max error {error:.2e}')
    return 1


def main():
    torch.manual_seed(0)
    checked = check_fp16_rotated()
    split = decode_attention.SPLIT
    cases = [(3, 2, 4, 32, 300, split), (1, 1, 16, 16, 64, split), (2, 1, 1, 64, 130, split),
             (3, 2, 4, 32, 300, 32), (2, 2, 3, 16, 600, 16)]
    for batch, heads, groups, head_dim, cache_len, split in cases:
        q = torch.randn(batch, heads, groups, head_dim)
        keys = torch.randn(batch, heads, cache_len, head_dim)
        values = torch.randn(batch, heads, cache_len, head_dim)
        key_valid = torch.ones(batch, cache_len, dtype=torch.bool)
        for row in range(1, batch):  # left padding; a long one leaves whole parts masked
            key_valid[row, :[0, 10, 150][row] if cache_len > 150 else 3] = False
        workspace = torch.zeros(decode_attention.workspace_floats(batch, heads, cache_len,
                                                                  head_dim, split))
        locks = torch.zeros(batch * heads, dtype=torch.int32)
        scale = head_dim ** -0.5
        # positions going down as well as up: parts a launch does not use hold what an
        # earlier one wrote there (NaN here), which must not count
        positions = sorted({5, 63, 64, 127, 128, 200, cache_len - 1} & set(range(cache_len)))
        up = ((False, False), (True, False), (True, True))
        for position, kinds in [(p, up) for p in positions] + [
                (p, up[:1]) for p in positions[::-1][1:]]:
            if not key_valid[:, :position + 1].any(dim=1).all():
                continue
            for write, rotate in kinds:
                checked += check(q, keys, values, key_valid, position, workspace, locks, scale,
                                 write, split, rotate)
        # a position past the cache (not met in decoding): every key, nothing written
        checked += check(q, keys, values, key_valid, cache_len + 5, workspace, locks, scale,
                         False, split)
    print(f'{checked} cases')


if __name__ == '__main__':
    main()
