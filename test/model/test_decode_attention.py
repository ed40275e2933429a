"""The decode step's attention kernel against ``scaled_dot_product_attention`` with the step's
mask: in Triton's CPU interpreter here, on the GPU where one is (the decoder's own tests run it
inside fused bf16 steps there; its fallback is in test_kernel_choices.py)."""
import pytest

from triton_support import (TRITON_MISSING as triton_missing, interpreter_cannot_loop,
                            run_interpreter_check)

torch = pytest.importorskip('torch')
cuda = pytest.mark.skipif(not torch.cuda.is_available() or triton_missing,
                          reason='needs a CUDA GPU and Triton')


@pytest.mark.skipif(triton_missing, reason='needs Triton (its CPU interpreter)')
@pytest.mark.skipif(interpreter_cannot_loop(),
                    reason="this Triton's interpreter cannot loop with numpy >= 2.3")
def test_kernel_matches_masked_sdpa_in_the_interpreter():
    output = run_interpreter_check('attention_interpreter_check.py')
    assert int(output.strip().splitlines()[-1].split()[0]) >= 10, output


@cuda
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_kernel_matches_masked_sdpa_on_the_gpu_and_replays_in_a_graph(dtype):
    from qwen_vl_perception.model import decode_attention
    torch.manual_seed(0)
    batch, heads, groups, head_dim, cache_len = 8, 8, 4, 128, 768
    q = torch.randn(batch, heads, groups, head_dim, device='cuda', dtype=dtype)
    keys, values = (torch.randn(batch, heads, cache_len, head_dim, device='cuda', dtype=dtype)
                    for _ in range(2))
    key_valid = torch.ones(batch, cache_len, dtype=torch.bool, device='cuda')
    key_valid[3, :200] = False
    position = torch.tensor([0], device='cuda')
    workspace = torch.zeros(decode_attention.workspace_floats(batch, heads, cache_len,
                                                              head_dim), device='cuda')
    locks = torch.zeros(batch * heads, dtype=torch.int32, device='cuda')
    out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    position.fill_(300)
    decode_attention.launch(q, keys, values, key_valid, position, out, workspace, locks, 0.088)
    with torch.cuda.graph(graph):
        decode_attention.launch(q, keys, values, key_valid, position, out, workspace, locks,
                                0.088)
    index = torch.arange(cache_len, device='cuda')
    for where in (250, 300, 511, 767):  # the graph reads the position from the device
        position.fill_(where)
        graph.replay()
        allowed = key_valid & (index <= where)
        mask = torch.where(allowed, 0.0, float('-inf')).to(dtype)[:, None, None, :]
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.float(), keys.float(), values.float(), attn_mask=mask.float(), scale=0.088)
        assert (out.float() - expected).abs().max().item() < 2e-2, where
        assert not locks.any()  # the last part of each head reset its counter
        first = out.clone()
        graph.replay()
        assert torch.equal(out, first)  # deterministic
