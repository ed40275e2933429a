"""The image pixel budget stored in a checkpoint's ``preprocessor_config.json``.

Qwen3-VL's image processor resizes every image into ``[min_pixels, max_pixels]`` (stored as
``size = {"shortest_edge": min, "longest_edge": max}``). A model should see images at the
resolution it was fine-tuned at, so the fine-tune tool writes the budget it trained with into
the adapter folder and the merge and quantize tools carry it on; loading the checkpoint
(``InputBuilder.from_pretrained`` without overrides) then uses it.

:func:`model_pixel_budget` is the one rule for an unset budget, used by the node and the
fine-tune tool alike: a model fine-tuned by the project's tools keeps the budget it was
trained at; any other model gets the node's default.
"""
import json
import math
from pathlib import Path
from typing import Optional, Tuple, Union

from ..trained_prompt import PROMPT_FILE

PathLike = Union[str, Path]

PREPROCESSOR_CONFIG = 'preprocessor_config.json'
NODE_MIN_PIXELS = 65536
NODE_MAX_PIXELS = 409600
"""The node's default ``min_pixels``/``max_pixels`` parameters (640x480 = 300 visual tokens):
the default training resolution, so that a fine-tuned model is run as it was trained."""


def read_pixel_budget(checkpoint_dir: PathLike) -> Optional[Tuple[int, int]]:
    """``(min_pixels, max_pixels)`` of a checkpoint folder, or None without a readable one."""
    path = Path(checkpoint_dir) / PREPROCESSOR_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    size = config.get('size') or {}
    low = size.get('shortest_edge', config.get('min_pixels'))
    high = size.get('longest_edge', config.get('max_pixels'))
    if isinstance(low, int) and isinstance(high, int):
        return low, high
    return None


def write_pixel_budget(checkpoint_dir: PathLike, min_pixels: int, max_pixels: int) -> None:
    """Set the budget in ``checkpoint_dir/preprocessor_config.json`` (which must exist)."""
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f'need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}')
    path = Path(checkpoint_dir) / PREPROCESSOR_CONFIG
    config = json.loads(path.read_text())
    config['size'] = {'shortest_edge': int(min_pixels), 'longest_edge': int(max_pixels)}
    for key, value in (('min_pixels', min_pixels), ('max_pixels', max_pixels)):
        if key in config:
            config[key] = int(value)
    path.write_text(json.dumps(config, indent=2) + '\n')


def trained_pixel_budget(checkpoint_dir: PathLike) -> Optional[Tuple[int, int]]:
    """The budget a model fine-tuned by the project's tools was trained at (it has a
    ``detection_prompt.json``; the budget is its processor's), else None: a stock checkpoint's
    processor budget (up to 16 M pixels for Qwen3-VL) is nobody's default."""
    if not checkpoint_dir or not (Path(checkpoint_dir) / PROMPT_FILE).is_file():
        return None
    return read_pixel_budget(checkpoint_dir)


def model_pixel_budget(checkpoint_dir: PathLike, min_pixels: Optional[int] = None,
                       max_pixels: Optional[int] = None) -> Tuple[int, int]:
    """``(min_pixels, max_pixels)`` to run or train ``checkpoint_dir`` at: the values given,
    the unset ones completed from :func:`trained_pixel_budget`, else from the node's defaults
    (:data:`NODE_MIN_PIXELS`, :data:`NODE_MAX_PIXELS`). ValueError unless 0 < min <= max."""
    low, high = trained_pixel_budget(checkpoint_dir) or (NODE_MIN_PIXELS, NODE_MAX_PIXELS)
    low = low if min_pixels is None else int(min_pixels)
    high = high if max_pixels is None else int(max_pixels)
    if not 0 < low <= high:
        raise ValueError(f'need 0 < min_pixels <= max_pixels, got {low} and {high}'
                         + ('' if min_pixels is not None and max_pixels is not None else
                            ' (the unset one is the model\'s own; give both)'))
    return low, high


DEFAULT_IMAGE_FACTOR = 32
"""Qwen3-VL's: 16-pixel patches merged 2x2, so every side of a resized image is a multiple
of 32 (one visual token per 32x32 pixels)."""


def image_factor(checkpoint_dir: Optional[PathLike]) -> int:
    """What every side of an image resized for ``checkpoint_dir`` is a multiple of:
    ``patch_size * merge_size`` of its processor, else :data:`DEFAULT_IMAGE_FACTOR`."""
    if checkpoint_dir:
        try:
            config = json.loads((Path(checkpoint_dir) / PREPROCESSOR_CONFIG).read_text())
        except (OSError, ValueError):
            config = {}
        patch, merge = config.get('patch_size'), config.get('merge_size')
        if isinstance(patch, int) and isinstance(merge, int) and patch > 0 and merge > 0:
            return patch * merge
    return DEFAULT_IMAGE_FACTOR


MAX_ASPECT_RATIO = 200
"""Longest side over shortest side of an image the model takes: Qwen-VL's image processor
(transformers' ``smart_resize``) refuses more."""


def resized_size(width: int, height: int, min_pixels: int, max_pixels: int,
                 factor: int = DEFAULT_IMAGE_FACTOR) -> Tuple[int, int]:
    """``(width, height)`` the Qwen2-VL/Qwen3-VL image processor resizes an image to.

    Each side is rounded to a multiple of ``factor``; an area above ``max_pixels`` is scaled
    down (sides rounded down), one below ``min_pixels`` up (sides rounded up), keeping the
    aspect ratio as closely as the rounding allows. The same rule as transformers'
    ``smart_resize`` (``test/model/test_pixel_budget.py`` compares them), so that an
    image resized here is left as it is by the model's processor.
    """
    if width < 1 or height < 1:
        raise ValueError(f'an image needs a positive size, not {width}x{height}')
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f'a {width}x{height} image is more than {MAX_ASPECT_RATIO} times as '
                         'wide as high (or high as wide): Qwen-VL processors refuse it')
    new_w, new_h = round(width / factor) * factor, round(height / factor) * factor
    if new_w * new_h > max_pixels:
        scale = math.sqrt(width * height / max_pixels)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
    elif new_w * new_h < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
        new_w = math.ceil(width * scale / factor) * factor
        new_h = math.ceil(height * scale / factor) * factor
    return new_w, new_h
