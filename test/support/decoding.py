"""Inputs and a model for decoder tests: a tiny random Qwen3-VL with varied answers, left-padded
batches with images, and the comparison of two decoders' tokens and probabilities."""
import numpy as np
import torch
import transformers

from qwen_vl_perception.model.configs import (ENDOFTEXT_TOKEN_ID, IM_END_TOKEN_ID,
                                              IMAGE_TOKEN_ID, VISION_END_TOKEN_ID,
                                              VISION_START_TOKEN_ID, tiny_config)

STOPS = [IM_END_TOKEN_ID, ENDOFTEXT_TOKEN_ID]


def tiny_model(seed=0, dtype=torch.float32, device='cpu'):
    """A tiny Qwen3-VL whose random weights are large enough for varied answers (the default
    0.02 init makes it repeat one token, which would hide position and cache bugs)."""
    config = tiny_config()
    config['text_config']['initializer_range'] = 0.1
    torch.manual_seed(seed)
    model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**config))
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(prompts, seed=1):
    """Left-padded batch: per row (text before, text after, (t, h, w) image grid or None)."""
    generator = torch.Generator().manual_seed(seed)
    sequences, pixels, grids = [], [], []
    for before, after, grid in prompts:
        ids = torch.randint(0, 150000, (before,), generator=generator).tolist()
        if grid is not None:
            t, h, w = grid
            ids += [VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * (t * h * w // 4)
            ids += [VISION_END_TOKEN_ID]
            pixels.append(torch.randn(t * h * w, 3 * 2 * 16 * 16, generator=generator))
            grids.append(list(grid))
        ids += torch.randint(0, 150000, (after,), generator=generator).tolist()
        sequences.append(ids)
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), ENDOFTEXT_TOKEN_ID)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, length - len(ids):] = torch.tensor(ids)
        attention_mask[row, length - len(ids):] = 1
    tensors = {'input_ids': input_ids, 'attention_mask': attention_mask,
               'mm_token_type_ids': (input_ids == IMAGE_TOKEN_ID).long()}
    if pixels:
        tensors['pixel_values'] = torch.cat(pixels)
        tensors['image_grid_thw'] = torch.tensor(grids)
    return tensors


def assert_same(reference, fast, prob_tolerance=1e-5):
    ref_ids, ref_probs = reference
    ids, probs = fast
    assert ids == ref_ids
    for ref_row, row in zip(ref_probs, probs):
        assert len(row) == len(ref_row)
        np.testing.assert_allclose(row, ref_row, rtol=prob_tolerance, atol=1e-7)
