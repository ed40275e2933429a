"""model/pixel_budget.py's resize rule against the Qwen-VL processors' own (transformers'
``smart_resize``)."""
import random

import pytest

from qwen_vl_perception.model.pixel_budget import resized_size


def _smart_resize():
    pytest.importorskip('transformers')
    # the PIL backend's module: importable without torchvision
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
    return image_processing_pil_qwen2_vl.smart_resize


def test_resized_size_is_the_qwen_vl_processors_rule():
    smart_resize = _smart_resize()
    rng = random.Random(1)
    sizes = [(640, 480), (1920, 1080), (31, 17), (8, 1000), (5, 5), (33, 47), (4096, 3072)]
    sizes += [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(400)]
    for width, height in sizes:
        if max(width, height) / min(width, height) > 200:
            continue
        for factor, low, high in ((32, 1024, 36864), (32, 65536, 409600), (28, 3136, 1003520)):
            expected_h, expected_w = smart_resize(height, width, factor, low, high)
            assert resized_size(width, height, low, high, factor) == (expected_w, expected_h)
    with pytest.raises(ValueError, match='200 times'):
        resized_size(2010, 10, 1024, 36864)
