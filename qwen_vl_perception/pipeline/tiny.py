"""A tiny, randomly initialised Qwen3-VL checkpoint laid out like a real one.

The checkpoint holds everything ``from_pretrained`` expects of Qwen3-VL-4B-Instruct: weights,
``config.json``, ``generation_config.json`` and the inputs side written by
:func:`qwen_vl_perception.model.checkpoint_files.write_input_files`.
"""
from pathlib import Path
from typing import Union

from ..model.checkpoint_files import GENERATION_CONFIG, write_input_files
from ..model.configs import tiny_config
from ..model.torch_support import require, require_torch

PathLike = Union[str, Path]

_DTYPES = ('float32', 'bfloat16', 'float16')


def make_tiny_checkpoint(out_dir: PathLike, seed: int = 0, dtype: str = 'float32') -> Path:
    """Write a complete tiny Qwen3-VL checkpoint (random weights seeded by ``seed``).

    ``out_dir`` is created if needed and must not already hold a checkpoint. Returns its path.
    """
    if dtype not in _DTYPES:
        raise ValueError(f'dtype must be one of {", ".join(_DTYPES)}, not {dtype!r}')
    out_dir = Path(out_dir)
    if (out_dir / 'config.json').exists():
        raise FileExistsError(f'{out_dir} already holds a checkpoint (config.json)')
    out_dir.mkdir(parents=True, exist_ok=True)
    torch = require_torch()
    transformers = require('transformers', 'to build the tiny Qwen3-VL checkpoint')

    config = transformers.Qwen3VLConfig(**tiny_config())
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = transformers.Qwen3VLForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model = model.to(getattr(torch, dtype)).eval()
    model.generation_config = transformers.GenerationConfig(**GENERATION_CONFIG)
    model.save_pretrained(out_dir)
    write_input_files(out_dir)
    return out_dir
