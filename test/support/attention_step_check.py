"""Runs the decode step with the decode-attention kernel (Triton's CPU interpreter) against the
same step with ``scaled_dot_product_attention``: a tiny Qwen3-VL in float32, a left-padded
batch with images, statically prefilled. The kernel takes q and k straight from the
projections (it norms and rotates them) and writes the cache itself, so this checks the step's
wiring (views, strides, cos/sin) as well as the kernel. q, k and v come from one projection
output, as the fused NF4 launch gives them (views with a row stride larger than their widths),
and the kernel's parts are 16 keys: the answer (positions 20-33) fills a part and writes the
first key of the next. Run
in a subprocess: the interpreter is chosen when triton is imported. Prints the steps
compared."""
import os

os.environ['TRITON_INTERPRET'] = '1'

import torch  # noqa: E402

from qwen_vl_perception.model.decode_session import (DecodeSession, StepKernels,  # noqa: E402
                                                     decode_attention_step)
from qwen_vl_perception.model.qwen3_vl_prefill import text_model_parts  # noqa: E402
from qwen_vl_perception.model.static_prefill import StaticPrefill, frame_inputs  # noqa: E402

from decoding import make_inputs, tiny_model  # noqa: E402

STEPS = 14
CACHE_LEN = 160
SPLIT = 16


class EagerKernelsOnTheFusedBranch(StepKernels):
    """Eager elementwise functions flagged fused: the step takes the branch that uses the decode
    attention kernel (on CUDA only fused steps do) without compiling anything."""

    def __init__(self):
        super().__init__(torch, False)
        self.fused = True

    def act_mul(self, mlp, gate, up):
        return mlp.act_fn(gate) * up


def one_projection(modules):
    """The modules' outputs as views of one product (the fused NF4 launch's layout)."""
    weight = torch.cat([module.weight for module in modules])
    widths = [module.weight.shape[0] for module in modules]

    def project(x):
        return list(torch.nn.functional.linear(x, weight).split(widths, dim=-1))
    return project


def decode(model, tensors, kernels, attention):
    parts = text_model_parts(model)
    frame = frame_inputs(model, parts, tensors, 16, CACHE_LEN)
    batch = frame.input_ids.shape[0]
    groups = {}
    for layer in parts.layers:
        modules = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        assert not any(module.bias is not None for module in modules)
        groups[modules] = one_projection(modules)
    session = DecodeSession(torch, model, parts, batch, CACHE_LEN, torch.float32, 'cpu', kernels,
                            groups=groups)
    if attention:
        session.attention = decode_attention_step(torch, batch, parts, CACHE_LEN, 'cpu', SPLIT)
    prefill = StaticPrefill(torch, model, parts, session, frame)
    prefill.load(frame)
    prefill.run()
    session.load_prefilled(frame.attention_mask, frame.last_positions, prefill.logits, [])
    for _ in range(STEPS):
        session.step()
    return session


def main():
    model = tiny_model()
    generator = torch.Generator().manual_seed(2)
    for layer in text_model_parts(model).layers:  # not ones, so that a swap shows
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.data = torch.rand(norm.weight.shape, generator=generator) + 0.5
    tensors = make_inputs([(5, 7, (1, 4, 6)), (2, 3, (1, 6, 8)), (9, 1, (1, 4, 4))])
    with torch.inference_mode():
        reference = decode(model, tensors, StepKernels(torch, False), attention=False)
        ours = decode(model, tensors, EagerKernelsOnTheFusedBranch(), attention=True)
    written = int(ours.cache_position)  # the prompt's 20 tokens, then the steps' keys
    assert ours.attention is not None and written - STEPS < 2 * SPLIT < written
    assert torch.equal(ours.out_tokens[:, :STEPS + 1], reference.out_tokens[:, :STEPS + 1]), (
        ours.out_tokens[:, :STEPS + 1], reference.out_tokens[:, :STEPS + 1])
    torch.testing.assert_close(ours.out_probs, reference.out_probs, rtol=1e-4, atol=1e-6)
    for layer, (keys, values) in enumerate(zip(ours.keys, ours.values)):
        torch.testing.assert_close(keys[:, :, :written], reference.keys[layer][:, :, :written],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values[:, :, :written],
                                   reference.values[layer][:, :, :written], rtol=1e-4, atol=1e-5)
        assert not keys[:, :, written:].any() and not values[:, :, written:].any()
    print(f'{STEPS} steps of {tuple(ours.out_tokens.shape)[0]} rows, '
          f'{len(ours.keys)} layers: same tokens, probabilities and cache')


if __name__ == '__main__':
    main()
