"""The fixed probe input the merge and quantize tools check their results with."""
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..prompt import PromptBuilder
from ..data.scenes import CATEGORIES, render_scene
from ..trained_prompt import read_prompt_file

PathLike = Union[str, Path]


def probe_image(path: Optional[PathLike] = None) -> np.ndarray:
    """The probe's RGB image: ``path`` if given, else a fixed synthetic scene (320x240)."""
    if path is not None:
        from ..image_conversion import load_image_file
        return load_image_file(path)
    return render_scene(0, 320, 240).image


def probe_instruction(model_dir: PathLike) -> str:
    """The instruction the model or adapter was trained with (its detection_prompt.json),
    else the default grounding instruction for the synthetic scenes' categories."""
    try:
        record = read_prompt_file(model_dir)
    except ValueError:
        record = None
    if record and isinstance(record.get('instruction'), str):
        return record['instruction']
    return PromptBuilder(CATEGORIES).instruction
