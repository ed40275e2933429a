"""The prompt a model was fine-tuned with, kept beside its data and weights.

``tools/prepare_data.py`` writes ``detection_prompt.json`` into the dataset; the fine-tune,
merge and quantize tools carry it into every folder they write, so a checkpoint knows the
categories, attributes and instruction it was trained on, and ``tools/detect_folder.py`` asks
it exactly that by default::

    {"categories": ["ball", "box"], "describe": true, "attributes": ["color", "shape"],
     "prompt_template": null, "instruction": "locate every instance ..."}
"""
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional, Union

from .prompt import PromptBuilder

PROMPT_FILE = 'detection_prompt.json'

PathLike = Union[str, os.PathLike]


def prompt_record(prompt: PromptBuilder, template: Optional[str] = None) -> dict:
    """The JSON-ready description of ``prompt`` (``template``: the one it was built with)."""
    return {
        'categories': list(prompt.categories),
        'describe': prompt.describe,
        'attributes': list(prompt.attributes),
        'prompt_template': template,
        'instruction': prompt.instruction,
    }


def write_prompt_file(directory: PathLike, prompt: PromptBuilder,
                      template: Optional[str] = None) -> Path:
    """Write ``detection_prompt.json`` into ``directory``; return its path."""
    path = Path(directory) / PROMPT_FILE
    path.write_text(json.dumps(prompt_record(prompt, template), indent=2, ensure_ascii=False)
                    + '\n', encoding='utf-8')
    return path


def read_prompt_file(directory: PathLike) -> Optional[dict]:
    """The record in ``directory/detection_prompt.json``, or ``None`` when there is none.

    Raises ``ValueError`` for a malformed file. Warns when the instruction this version of the
    code builds from the record differs from the stored one (the prompt wording changed since
    training: the model will see a prompt it was not trained on).
    """
    path = Path(directory) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as error:
        raise ValueError(f'{path}: cannot be read as JSON ({error})') from None
    if not isinstance(record, dict) or not isinstance(record.get('categories'), list):
        raise ValueError(f'{path}: expected an object with a "categories" list')
    try:
        prompt = prompt_from_record(record)
    except ValueError as error:
        raise ValueError(f'{path}: {error}') from None
    stored = record.get('instruction')
    if isinstance(stored, str) and stored != prompt.instruction:
        warnings.warn(f'{path}: the instruction built today differs from the one stored at '
                      'training time; the model will be asked with the new wording')
    return record


def prompt_from_record(record: dict) -> PromptBuilder:
    """Rebuild the :class:`PromptBuilder` a record describes (ValueError if invalid)."""
    kwargs = {'describe': bool(record.get('describe', False)),
              'template': record.get('prompt_template') or None}
    if record.get('attributes') is not None:
        kwargs['attributes'] = tuple(record['attributes'])
    return PromptBuilder(record['categories'], **kwargs)


def copy_prompt_file(source_dir: PathLike, target_dir: PathLike) -> bool:
    """Copy ``detection_prompt.json`` between folders when the source has one."""
    source = Path(source_dir) / PROMPT_FILE
    if not source.is_file():
        return False
    shutil.copyfile(source, Path(target_dir) / PROMPT_FILE)
    return True
