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
from qwen_vl_perception.model.tiny import copy_processor_files
from qwen_vl_perception.model.training import training_batch

TRAIN_PIXELS = (1024, 9216)


def memorize_answer(source: Path, out_dir: Path, instruction: str, answer: str,
                    steps: int = 110, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    builder = InputBuilder.from_pretrained(source, *TRAIN_PIXELS)
    model = Qwen3VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        height, width = (int(v) for v in rng.integers(32, 128, size=2))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        batch = training_batch(builder, [image], [instruction], [answer])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    copy_processor_files(source, out_dir)
    return out_dir
