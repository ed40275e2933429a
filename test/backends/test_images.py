"""backends/images.py: an image fitted to the model's pixel budget here gives the model the
processor's own pixels (so a server's processor leaves it alone), sent as a PNG data URL."""
import numpy as np
import pytest

from qwen_vl_perception.backends.images import fit_to_budget, image_for_server
from qwen_vl_perception.model.pixel_budget import image_factor

from http_servers import IMAGE


def test_an_image_fitted_here_gives_the_model_the_same_pixels(tiny_checkpoint):
    torch = pytest.importorskip('torch')
    from qwen_vl_perception.model.processor import InputBuilder
    builder = InputBuilder.from_pretrained(tiny_checkpoint, min_pixels=4096, max_pixels=65536,
                                           image_backend='pil')
    factor = image_factor(tiny_checkpoint)
    assert factor == 32
    rng = np.random.default_rng(2)
    for height, width in ((480, 640), (300, 400), (37, 101), (64, 64)):
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        fitted = fit_to_budget(rgb, builder.min_pixels, builder.max_pixels, factor)
        original, sent = builder.build([rgb], 'x'), builder.build([fitted], 'x')
        assert torch.equal(original.tensors['pixel_values'], sent.tensors['pixel_values'])
        assert original.model_input_sizes == [(fitted.shape[1], fitted.shape[0])]
    url, size = image_for_server(IMAGE, 4096, 65536)
    assert url.startswith('data:image/png;base64,') and size == (64, 64)
