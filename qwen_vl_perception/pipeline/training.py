"""Supervised examples for Qwen3-VL: the inference prompt followed by the answer to learn.

Training and inference share :class:`~qwen_vl_perception.model.processor.InputBuilder`, so
the model is trained on exactly the token sequence the node sends (same chat template, same
instruction-first order, same image resizing). Only the answer tokens (and the closing
``<|im_end|>``) carry a loss.
"""
from typing import Dict, Sequence

from ..model.configs import IM_END_TOKEN_ID
from ..model.torch_support import require_torch

IGNORE_INDEX = -100


def training_batch(builder, images: Sequence, instructions: Sequence[str],
                   answers: Sequence[str]) -> Dict[str, object]:
    """Tensors for one training step: ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw`` and ``labels``.

    One conversation per image; ``instructions`` and ``answers`` align with ``images``.
    Sequences are right padded (prompt, answer, ``<|im_end|>``, padding).
    """
    if not len(images) == len(instructions) == len(answers):
        raise ValueError('images, instructions and answers must have the same length')
    examples = [training_example(builder, image, instruction, answer)
                for image, instruction, answer in zip(images, instructions, answers)]
    return collate_examples(examples, builder.pad_token_id)


def training_example(builder, image, instruction: str, answer: str) -> Dict[str, object]:
    """One encoded conversation: token lists ``input_ids``, ``mm_token_type_ids``, ``labels``
    and the image's ``pixel_values``/``image_grid_thw`` (for :func:`collate_examples`)."""
    inputs = builder.build([image], instruction).tensors
    prompt = inputs['input_ids'][0].tolist()
    answer_ids = list(builder.tokenizer(answer, add_special_tokens=False)['input_ids'])
    answer_ids.append(IM_END_TOKEN_ID)
    return {
        'input_ids': prompt + answer_ids,
        'mm_token_type_ids': inputs['mm_token_type_ids'][0].tolist() + [0] * len(answer_ids),
        'labels': [IGNORE_INDEX] * len(prompt) + answer_ids,
        'pixel_values': inputs['pixel_values'],
        'image_grid_thw': inputs['image_grid_thw'],
    }


def collate_examples(examples: Sequence[Dict[str, object]], pad_token_id: int
                     ) -> Dict[str, object]:
    """Right-pad :func:`training_example` results into one batch of tensors."""
    torch = require_torch()
    length = max(len(example['input_ids']) for example in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    token_types = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example['input_ids'])
        input_ids[row, :size] = torch.tensor(example['input_ids'])
        attention_mask[row, :size] = 1
        token_types[row, :size] = torch.tensor(example['mm_token_type_ids'])
        labels[row, :size] = torch.tensor(example['labels'])
    return {
        'input_ids': input_ids,
        'attention_mask': attention_mask,
        'mm_token_type_ids': token_types,
        'pixel_values': torch.cat([example['pixel_values'] for example in examples]),
        'image_grid_thw': torch.cat([example['image_grid_thw'] for example in examples]),
        'labels': labels,
    }
