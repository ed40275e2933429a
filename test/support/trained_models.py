"""Small real Qwen3-VL models trained by the project's code, for tests.

``memorize_answer`` fine-tunes the tiny random checkpoint (all parameters, a few seconds of CPU
per 10 steps) until, for one instruction, it answers one fixed text whatever the image. The
model is real: the node runs it like any checkpoint, and its answer comes from its weights.
That makes node tests about coordinates, headers and scores exact, without claiming that the
model detects anything (the synthetic-scenes model does that).
"""
from pathlib import Path

import numpy as np

from qwen_vl_perception.model.processor import InputBuilder
from qwen_vl_perception.model.checkpoint_files import copy_processor_files
from qwen_vl_perception.pipeline.training import training_batch

TRAIN_PIXELS = (1024, 9216)


def memorize_answer(source: Path, out_dir: Path, instruction: str, answer: str,
                    max_steps: int = 300, seed: int = 0) -> Path:
    """Train until greedy decoding of a fresh image gives ``answer`` (checked every 20 steps);
    fails if it has not after ``max_steps``."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    builder = InputBuilder.from_pretrained(source, *TRAIN_PIXELS)
    model = Qwen3VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1, max_steps + 1):
        batch = training_batch(builder, [_random_image(rng)], [instruction], [answer])
        labels = batch.pop('labels')
        answer_length = int((labels[0] != -100).sum())
        # Logits only where the answer is predicted: the 151,936-way projection dominates.
        logits = model(**batch, logits_to_keep=answer_length + 1).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                 labels[:, -answer_length:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 and _answers(model, builder, rng, instruction) == answer:
            break
    else:
        raise AssertionError(f'the model did not learn the answer in {max_steps} steps')
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    copy_processor_files(source, out_dir)
    return out_dir


def _random_image(rng):
    height, width = (int(v) for v in rng.integers(32, 128, size=2))
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _answers(model, builder, rng, instruction):
    import torch
    model.eval()
    inputs = builder.build([_random_image(rng)], instruction).tensors
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=120, do_sample=False)
    model.train()
    return builder.tokenizer.decode(output[0, inputs['input_ids'].shape[1]:],
                                    skip_special_tokens=True)


def linears_to_nf4(model, device='cpu', compute_dtype=None) -> int:
    """Replace the language model's attention and MLP ``nn.Linear`` layers by bitsandbytes NF4
    ``Linear4bit`` ones on ``device`` (quantized there; ``compute_dtype`` default float32), as
    loading with NF4 would; returns how many were replaced."""
    import bitsandbytes as bnb
    import torch
    count = 0
    for layer in model.model.language_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=child.bias is not None,
                        compute_dtype=compute_dtype or torch.float32, compress_statistics=True,
                        quant_type='nf4')
                    quantized.weight = bnb.nn.Params4bit(
                        child.weight.data.clone(), requires_grad=False, compress_statistics=True,
                        quant_type='nf4', module=quantized).to(device)
                    setattr(parent, name, quantized)
                    count += 1
    return count
