"""The decode step's attention kernel against ``scaled_dot_product_attention`` with the step's
mask: in Triton's CPU interpreter here (the kernel alone, and inside the decode step), compiled
for the target GPUs here, run on the GPU where one is (the decoder's own tests run it inside
fused bf16 steps there; its fallback is in test_kernel_choices.py)."""
import inspect

import pytest

from triton_support import (TRITON_MISSING as triton_missing, compile_for_gpu,
                            interpreter_cannot_loop, run_interpreter_check)

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


@cuda
@pytest.mark.parametrize('split', [32, 64, 128])
@pytest.mark.parametrize('rotate', [False, True])
def test_kernel_writes_the_steps_key_and_value_in_a_graph_on_the_gpu(split, rotate):
    """The step's key and value go into the cache at the device-held position (the cache holds
    NaN there before each replay) and take part in that step's attention; with ``rotate`` the
    kernel applies the step's q/k RMSNorm and rotary embedding first. q, k and v are views of
    one projection output, as the step has them (a row stride larger than their widths)."""
    from qwen_vl_perception.model import decode_attention
    from qwen_vl_perception.model.decode_session import StepKernels
    torch.manual_seed(1)
    dtype, batch, heads, groups, head_dim, cache_len = torch.bfloat16, 2, 8, 4, 128, 640
    width = heads * groups * head_dim
    projected = torch.randn(batch, 1, width + 2 * heads * head_dim, device='cuda', dtype=dtype)
    q = projected[:, 0, :width].view(batch, heads, groups, head_dim)
    new_keys = projected[:, 0, width:width + heads * head_dim].view(batch, heads, head_dim)
    new_values = projected[:, 0, width + heads * head_dim:].view(batch, heads, head_dim)
    keys, values = (torch.randn(batch, heads, cache_len, head_dim, device='cuda', dtype=dtype)
                    for _ in range(2))
    key_valid = torch.ones(batch, cache_len, dtype=torch.bool, device='cuda')
    key_valid[1, :20] = False  # left padding (every tested position keeps allowed keys)
    position = torch.tensor([300], device='cuda')
    workspace = torch.zeros(decode_attention.workspace_floats(
        batch, heads, cache_len, head_dim, split), device='cuda')
    locks = torch.zeros(batch * heads, dtype=torch.int32, device='cuda')
    out = torch.empty(q.shape, device='cuda', dtype=dtype)
    angles = torch.randn(batch, head_dim // 2, device='cuda').repeat(1, 2)
    norm_rope = (torch.rand(head_dim, device='cuda', dtype=dtype) + 0.5,
                 torch.rand(head_dim, device='cuda', dtype=dtype) + 0.5, 1e-6,
                 angles.cos().to(dtype), angles.sin().to(dtype)) if rotate else None
    compiled = StepKernels(torch, True)

    def run():
        decode_attention.launch(q, keys, values, key_valid, position, out, workspace, locks,
                                0.088, new_keys=new_keys, new_values=new_values,
                                norm_rope=norm_rope, split=split)
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    index = torch.arange(cache_len, device='cuda')
    for where in (split - 1, split, 301, 639):
        position.fill_(where)
        projected.copy_(torch.randn_like(projected))
        keys[:, :, where] = values[:, :, where] = float('nan')
        graph.replay()
        query, key = q, new_keys
        if rotate:  # the compiled step's q/k norm and rotation, as the decoder runs it
            q_weight, k_weight, eps, cos, sin = norm_rope
            query, key = compiled.qk_norm_rope(
                q.reshape(batch, 1, heads * groups, head_dim), new_keys[:, None], q_weight,
                k_weight, eps, cos[:, None], sin[:, None])
            query, key = query.reshape(q.shape), key[:, :, 0]
            # one rounding of the same fp32 values: an ulp apart at most (summation order)
            torch.testing.assert_close(keys[:, :, where], key, rtol=2 ** -7, atol=1e-3)
        else:
            assert torch.equal(keys[:, :, where], new_keys)
        assert torch.equal(values[:, :, where], new_values)
        assert not keys.isnan().any() and not values.isnan().any()
        allowed = key_valid & (index <= where)
        mask = torch.where(allowed, 0.0, float('-inf'))[:, None, None, :]
        expected = torch.nn.functional.scaled_dot_product_attention(
            query.float(), keys.float(), values.float(), attn_mask=mask, scale=0.088)
        assert (out.float() - expected).abs().max().item() < 2e-2, where
        assert not locks.any()


def test_new_keys_and_values_are_checked_before_launch():
    pytest.importorskip('triton')
    from qwen_vl_perception.model import decode_attention
    q = torch.zeros(1, 2, 4, 16)
    cache = torch.zeros(1, 2, 8, 16)
    arguments = (q, cache, cache, torch.ones(1, 8).bool(), torch.zeros(1), torch.zeros_like(q),
                 torch.zeros(1), torch.zeros(2, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match='go together'):
        decode_attention.launch(*arguments, new_keys=torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match='power of two'):
        decode_attention.launch(*arguments, split=48)
    with pytest.raises(ValueError, match='contiguous last dimension'):
        decode_attention.launch(*arguments, new_keys=torch.zeros(1, 2, 16),
                                new_values=torch.zeros(1, 16, 2).transpose(1, 2))


@pytest.mark.skipif(triton_missing, reason='needs Triton (its CPU interpreter)')
@pytest.mark.skipif(interpreter_cannot_loop(),
                    reason="this Triton's interpreter cannot loop with numpy >= 2.3")
def test_the_decode_step_with_the_kernel_matches_the_sdpa_step_in_the_interpreter():
    """The step as fused CUDA steps run it (q and k straight from the projections, the cache
    written by the kernel) gives the SDPA step's tokens, probabilities and cache."""
    output = run_interpreter_check('attention_step_check.py')
    assert 'same tokens, probabilities and cache' in output, output


@pytest.mark.skipif(triton_missing, reason='needs Triton')
@pytest.mark.parametrize('capability', [87, 90])
def test_kernel_builds_for_a_jetson_orin_and_an_h200_without_a_gpu(capability):
    """Triton compiles every variant the step launches (bf16 and fp16, the cache written and the
    q/k norm applied by the kernel, or not; on sm_90 with programmatic dependent launch) down
    to a cubin for sm_87 and sm_90, here."""
    from qwen_vl_perception.model import decode_attention
    names = inspect.signature(decode_attention.decode_attention_kernel.fn).parameters
    pointers = {'valid_ptr': '*i1', 'position_ptr': '*i64', 'ws_ptr': '*fp32',
                'lock_ptr': '*i32'}
    for dtype in ('bf16', 'fp16'):
        for write, rotate in ((False, False), (True, True)):
            constexprs = dict(GROUPS=4, HEAD_DIM=128, SPLIT_KEYS=decode_attention.SPLIT,
                              BLOCK=decode_attention.BLOCK_KEYS, WRITE=write, NORM_ROPE=rotate,
                              PARTS=8, GROUP_ROWS=4, CHUNK=8,  # a 1024-key cache
                              OVERLAP=capability >= 90  # programmatic launch: sm_90+
                              and decode_attention.gdc_wait is not None)
            signature = {name: 'constexpr' if name in constexprs
                         else pointers.get(name, '*' + dtype) if name.endswith('_ptr')
                         else 'fp32' if name in ('scale', 'eps') else 'i32' for name in names}
            cubin = compile_for_gpu(decode_attention.decode_attention_kernel, signature,
                                    constexprs, capability)
            assert cubin[:4] == b'\x7fELF', (dtype, write, rotate)


def test_parts_shrink_until_the_launch_fills_the_gpu():
    pytest.importorskip('triton')
    from qwen_vl_perception.model.decode_attention import MIN_SPLIT, SPLIT, split_for
    # an H200 (132 multiprocessors), 8 key heads, a 768-key cache
    assert split_for(1, 8, 768, 132) == 32  # 48 programs at 128 keys, 96 at 64, 192 at 32
    assert split_for(2, 8, 768, 132) == 64
    assert split_for(8, 8, 768, 132) == SPLIT
    assert split_for(1, 8, 768, 16) == SPLIT  # a Jetson AGX Orin's 16
    assert split_for(1, 8, 64, 132) == MIN_SPLIT  # never below
