"""The inputs: the node's prompt on structured test pictures, built by its InputBuilder."""
from pathlib import Path

import numpy as np

from qwen_vl_perception.categories import ARTICLE_CATEGORIES
from qwen_vl_perception.prompt import PromptBuilder


def article_instruction() -> str:
    """The node's instruction for the article's categories, with descriptions."""
    return PromptBuilder(ARTICLE_CATEGORIES, describe=True).instruction


def make_input_builder(args, workdir: Path):
    """The ``--model``'s InputBuilder, else the tiny checkpoint's (written into ``workdir``)."""
    from qwen_vl_perception.model.processor import InputBuilder
    if args.model is not None:
        return InputBuilder.from_pretrained(args.model)
    from qwen_vl_perception.pipeline.tiny import make_tiny_checkpoint
    # The tiny checkpoint carries the real tokenizer, image processor and chat template.
    return InputBuilder.from_pretrained(make_tiny_checkpoint(workdir / 'processor'))


def test_image(width, height, seed):
    """A structured RGB picture (gradients and blocks), not flat noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                      (x + y) * 255 // max(width + height - 2, 1)], axis=-1).astype(np.uint8)
    for _ in range(8):
        x0, y0 = rng.integers(0, width - 32), rng.integers(0, height - 32)
        image[y0:y0 + rng.integers(16, 96), x0:x0 + rng.integers(16, 96)] = rng.integers(
            0, 256, 3)
    return image
