"""Images as a server gets them: resized at the model's pixel budget, sent as a PNG data URL.

The image is resized here exactly as the model's processor would (:func:`resized_size`, PIL
bicubic as its PIL backend does), so the server's processor, finding every side a multiple of
the patch factor and the area within the budget, leaves it as it is: the model sees the pixels
the local engine would feed it, and the node knows the size it saw (boxes in resized pixels,
``coordinate_convention: resized_pixels``, need it). PNG, not JPEG: lossless, so the remote
and the local engine see the same pixels (JPEG's artefacts would change answers, and scores,
for nothing a detector needs to save); at the budget (a few hundred thousand pixels at most)
a frame is a few hundred kB, compressed at PNG's fastest level.
"""
import base64
import io
from typing import Tuple

import numpy as np
from PIL import Image

from ..model.pixel_budget import DEFAULT_IMAGE_FACTOR, resized_size

PNG_COMPRESS_LEVEL = 1
"""zlib level: 1 is several times faster than PIL's default 6 and barely larger here."""


def fit_to_budget(rgb: np.ndarray, min_pixels: int, max_pixels: int,
                  factor: int = DEFAULT_IMAGE_FACTOR) -> np.ndarray:
    """``rgb`` (HxWx3 uint8) resized to the size the model's processor would give it."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 \
            or rgb.dtype != np.uint8:
        raise ValueError('expected an HxWx3 uint8 RGB array, not '
                         f'{getattr(rgb, "shape", type(rgb).__name__)}')
    height, width = rgb.shape[:2]
    new_width, new_height = resized_size(width, height, min_pixels, max_pixels, factor)
    if (new_width, new_height) == (width, height):
        return np.ascontiguousarray(rgb)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    return np.asarray(image.resize((new_width, new_height), Image.Resampling.BICUBIC))


def png_data_url(rgb: np.ndarray) -> str:
    """``data:image/png;base64,...`` of an RGB array."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(
        buffer, format='PNG', compress_level=PNG_COMPRESS_LEVEL)
    return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


def image_for_server(rgb: np.ndarray, min_pixels: int, max_pixels: int,
                     factor: int = DEFAULT_IMAGE_FACTOR) -> Tuple[str, Tuple[int, int]]:
    """The data URL of ``rgb`` at the budget and the (width, height) the model sees."""
    fitted = fit_to_budget(rgb, min_pixels, max_pixels, factor)
    return png_data_url(fitted), (int(fitted.shape[1]), int(fitted.shape[0]))
