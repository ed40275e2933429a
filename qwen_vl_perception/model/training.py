"""Supervised examples for Qwen3-VL: the inference prompt followed by the answer to learn.

Training and inference share :class:`~qwen_vl_perception.model.processor.InputBuilder`, so
the model is trained on exactly the token sequence the node sends (same chat template, same
instruction-first order, same image resizing). Only the answer tokens (and the closing
``<|im_end|>``) carry a loss.
"""
from typing import Dict, Sequence

from .configs import IM_END_TOKEN_ID
from .torch_support import require_torch

IGNORE_INDEX = -100


def training_batch(builder, images: Sequence, instructions: Sequence[str],
                   answers: Sequence[str]) -> Dict[str, object]:
    """Tensors for one training step: ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw`` and ``labels``.

    One conversation per image; ``instructions`` and ``answers`` align with ``images``.
    Sequences are right padded (prompt, answer, ``<|im_end|>``, padding).
    """
    torch = require_torch()
    if not len(images) == len(instructions) == len(answers):
        raise ValueError('images, instructions and answers must have the same length')
    rows = []
    vision = []
    for image, instruction, answer in zip(images, instructions, answers):
        inputs = builder.build([image], instruction).tensors
        prompt = inputs['input_ids'][0].tolist()
        answer_ids = list(builder.tokenizer(answer, add_special_tokens=False)['input_ids'])
        answer_ids.append(IM_END_TOKEN_ID)
        image_types = inputs['mm_token_type_ids'][0].tolist()
        rows.append((prompt + answer_ids, image_types + [0] * len(answer_ids),
                     [IGNORE_INDEX] * len(prompt) + answer_ids))
        vision.append(inputs)
    length = max(len(ids) for ids, _, _ in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), builder.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    token_types = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, types, targets) in enumerate(rows):
        size = len(ids)
        input_ids[row, :size] = torch.tensor(ids)
        attention_mask[row, :size] = 1
        token_types[row, :size] = torch.tensor(types)
        labels[row, :size] = torch.tensor(targets)
    return {
        'input_ids': input_ids,
        'attention_mask': attention_mask,
        'mm_token_type_ids': token_types,
        'pixel_values': torch.cat([inputs['pixel_values'] for inputs in vision]),
        'image_grid_thw': torch.cat([inputs['image_grid_thw'] for inputs in vision]),
        'labels': labels,
    }
