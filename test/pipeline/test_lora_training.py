"""The LoRA trainer's loss: logits for the answer positions only, same value as transformers'."""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')
from qwen_vl_perception.pipeline.lora_training import answer_loss  # noqa: E402
from qwen_vl_perception.model.processor import InputBuilder  # noqa: E402
from qwen_vl_perception.pipeline.training import IGNORE_INDEX, training_batch  # noqa: E402


def test_answer_loss_equals_the_models_own_loss(tiny_checkpoint):
    from transformers import Qwen3VLForConditionalGeneration
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    builder = InputBuilder.from_pretrained(tiny_checkpoint, min_pixels=1024, max_pixels=16384)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
              rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)]
    batch = training_batch(builder, images, ['find cups', 'find the red ball'],
                           ['[]', '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "ball"}]\n```'])
    answer_tokens = int((batch['labels'][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        expected = model(**batch).loss
        mean = answer_loss(model, batch)
        summed = answer_loss(model, batch, num_items_in_batch=torch.tensor(answer_tokens))
        halved = answer_loss(model, batch, num_items_in_batch=2 * answer_tokens)
    assert float(mean) == pytest.approx(float(expected), rel=1e-5)
    assert float(summed) == pytest.approx(float(expected), rel=1e-5)
    assert float(halved) == pytest.approx(float(expected) / 2, rel=1e-5)
    assert 'labels' in batch  # the caller's batch is left as it was
