"""The image pixel budget stored in a checkpoint's ``preprocessor_config.json``.

Qwen3-VL's image processor resizes every image into ``[min_pixels, max_pixels]`` (stored as
``size = {"shortest_edge": min, "longest_edge": max}``). A model should see images at the
resolution it was fine-tuned at, so the fine-tune tool writes the budget it trained with into
the adapter folder and the merge and quantize tools carry it on; loading the checkpoint
(``InputBuilder.from_pretrained`` without overrides) then uses it.
"""
import json
from pathlib import Path
from typing import Optional, Tuple, Union

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
