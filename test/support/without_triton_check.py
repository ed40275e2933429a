"""The decoders and the engine with Triton absent, as on a JetPack torch that lacks it.

Started by ``test_jetson_paths.py`` in its own process: ``sys.modules['triton'] = None`` before
anything is imported makes ``import triton`` raise ModuleNotFoundError and
``importlib.util.find_spec('triton')`` return None, as when it is not installed. Runs on the
CPU: the fast decoder (float32, and NF4 layers without the fused kernel) against
``model.generate``, and the engine with the trained default model (unpacked into the cache
folder given as the argument), NF4 on load, on a synthetic scene. Prints one line per check
and exits non-zero on the first failure.
"""
import sys

sys.modules['triton'] = None

import torch  # noqa: E402
import transformers  # noqa: E402

from qwen_vl_perception.model.configs import (  # noqa: E402
    ENDOFTEXT_TOKEN_ID, IM_END_TOKEN_ID, IMAGE_TOKEN_ID, VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID, tiny_config)
from qwen_vl_perception.model.default_model import ensure_default_model  # noqa: E402
from qwen_vl_perception.model.engine import VisionLanguageEngine  # noqa: E402
from qwen_vl_perception.model.fast_decode import FastGreedyDecoder  # noqa: E402
from qwen_vl_perception.model.generation import hf_decode  # noqa: E402
from qwen_vl_perception.model.nf4_matmul import kernel_unavailable_reason  # noqa: E402
from qwen_vl_perception.model.torch_support import triton_missing_reason  # noqa: E402
from qwen_vl_perception.data.scenes import render_scene  # noqa: E402
from qwen_vl_perception.trained_prompt import prompt_from_record, read_prompt_file  # noqa: E402
from trained_models import linears_to_nf4  # noqa: E402 (this folder is sys.path[0])

STOPS = [IM_END_TOKEN_ID, ENDOFTEXT_TOKEN_ID]


def check(condition, message):
    if not condition:
        print(f'FAILED: {message}')
        sys.exit(1)
    print(f'ok: {message}')


def tiny_model(seed):
    config = tiny_config()
    config['text_config']['initializer_range'] = 0.1  # varied answers, not one repeated token
    torch.manual_seed(seed)
    model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**config))
    return model.eval()


def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 150000, (5,), generator=generator).tolist()
    ids += [VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * 6 + [VISION_END_TOKEN_ID]
    ids += torch.randint(0, 150000, (7,), generator=generator).tolist()
    input_ids = torch.tensor([ids])
    return {'input_ids': input_ids, 'attention_mask': torch.ones_like(input_ids),
            'mm_token_type_ids': (input_ids == IMAGE_TOKEN_ID).long(),
            'pixel_values': torch.randn(24, 3 * 2 * 16 * 16, generator=generator),
            'image_grid_thw': torch.tensor([[1, 4, 6]])}


def main(cache):
    reason = triton_missing_reason()
    check(reason is not None and 'Triton' in reason, f'Triton absent: {reason}')
    decoder = FastGreedyDecoder()
    check(not decoder.fuses_elementwise(graphs=True),
          'without Triton the CUDA-graph step would not go through torch.compile')
    # On a GPU machine the missing Triton is the reason; on a CPU one, the missing CUDA.
    kernel_off = kernel_unavailable_reason()
    check(kernel_off is not None and ('Triton' in kernel_off or 'CUDA' in kernel_off),
          f'the fused NF4 kernel is off here: {kernel_off}')

    model = tiny_model(seed=0)
    reference, fast = hf_decode(model, inputs(), 16, STOPS), decoder(model, inputs(), 16, STOPS)
    check(len(set(reference[0][0])) > 4 and fast[0] == reference[0],
          f'fast decoder = generate, float32: {fast[0][0]}')

    model = tiny_model(seed=2)
    check(linears_to_nf4(model) > 0, 'language-model linears are bitsandbytes NF4')
    reference, fast = hf_decode(model, inputs(), 8, STOPS), decoder(model, inputs(), 8, STOPS)
    check(fast[0] == reference[0], f'fast decoder = generate, NF4 layers: {fast[0][0]}')

    checkpoint = ensure_default_model('none', cache=cache, log=lambda message: None)
    engine = VisionLanguageEngine(checkpoint, device='cpu', quantization='nf4', decoder='fast')
    check(engine.quantization == 'nf4' and isinstance(engine.decoder, FastGreedyDecoder),
          'engine: the default model, NF4 on load, fast decoder')
    images = [render_scene(seed, 320, 240).image for seed in (30_001, 30_002)]
    instruction = prompt_from_record(read_prompt_file(checkpoint)).instruction
    answers = engine.generate(images, instruction, max_new_tokens=160)
    engine.decoder = hf_decode
    reference = engine.generate(images, instruction, max_new_tokens=160)
    check([a.token_ids for a in answers] == [r.token_ids for r in reference],
          'engine answers = generate')
    check(all('"bbox_2d"' in a.text for a in answers), f'real answers: {answers[0].text!r}')
    check(sys.modules.get('triton', 'missing') is None, 'nothing imported Triton')


if __name__ == '__main__':
    main(sys.argv[1])
