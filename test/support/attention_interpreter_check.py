"""Runs the decode-attention kernel in Triton's CPU interpreter against
``scaled_dot_product_attention`` with the decode step's mask (run in a subprocess: the
interpreter is chosen when triton is imported). Prints one line per case, then the count."""
import os

os.environ['TRITON_INTERPRET'] = '1'

import torch  # noqa: E402

from qwen_vl_perception.model import decode_attention  # noqa: E402


def reference(q, keys, values, key_valid, position, scale):
    index = torch.arange(keys.shape[2])
    allowed = key_valid & (index <= position)
    mask = torch.where(allowed, 0.0, float('-inf'))[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                            scale=scale)


def main():
    torch.manual_seed(0)
    checked = 0
    cases = [(3, 2, 4, 32, 300), (1, 1, 16, 16, 64), (2, 1, 1, 64, 130)]
    for batch, heads, groups, head_dim, cache_len in cases:
        q = torch.randn(batch, heads, groups, head_dim)
        keys = torch.randn(batch, heads, cache_len, head_dim)
        values = torch.randn(batch, heads, cache_len, head_dim)
        key_valid = torch.ones(batch, cache_len, dtype=torch.bool)
        for row in range(1, batch):  # left padding; a long one leaves whole parts masked
            key_valid[row, :[0, 10, 150][row] if cache_len > 150 else 3] = False
        workspace = torch.zeros(decode_attention.workspace_floats(batch, heads, cache_len,
                                                                  head_dim))
        locks = torch.zeros(batch * heads, dtype=torch.int32)
        scale = head_dim ** -0.5
        for position in sorted({5, 63, 64, 127, 128, 200, cache_len - 1} & set(range(cache_len))):
            if not key_valid[:, :position + 1].any(dim=1).all():
                continue
            expected = reference(q, keys, values, key_valid, position, scale)
            out = torch.full_like(q, float('nan'))
            decode_attention.launch(q, keys, values, key_valid, torch.tensor([position]), out,
                                    workspace, locks, scale)
            error = (out - expected).abs().max().item()
            assert error < 1e-4, (batch, heads, groups, head_dim, position, error)
            assert not locks.any(), 'a counter was left set'
            print(f'batch {batch} heads {heads} groups {groups} dim {head_dim} '
                  f'position {position}: max error {error:.2e}')
            checked += 1
    print(f'{checked} cases')


if __name__ == '__main__':
    main()
