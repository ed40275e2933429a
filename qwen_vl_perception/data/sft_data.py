"""Supervised fine-tuning data for Qwen3-VL detection, in LLaMA-Factory's sharegpt format.

One sample per labelled image::

    {"messages": [{"role": "user", "content": "<instruction><image>"},
                  {"role": "assistant",
                   "content": "```json\\n[\\n  {\\"bbox_2d\\": ...}\\n]\\n```"}],
     "images": ["images/scene_00000.png"]}

The user turn is :func:`~qwen_vl_perception.prompt.training_user_text` of the instruction the
node sends (:class:`~qwen_vl_perception.prompt.PromptBuilder`), the answer is
:func:`~qwen_vl_perception.prompt.format_answer` of the labelled boxes on Qwen3-VL's 0-1000
grid. ``dataset_info.json`` registers the files for LLaMA-Factory (``dataset_dir`` = the
folder, image paths relative to it). :func:`read_sft_dataset` reads such a file back (also
LLaMA-Factory's ``conversations``/``from``/``value`` spelling) for ``tools/finetune.py``.
"""
import json
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

from ..categories import LabelMatcher
from ..detection import ParsedObject
from ..geometry import to_grid
from .labels import LabeledImage, image_size
from ..prompt import IMAGE_PLACEHOLDER, PromptBuilder, format_answer, training_user_text

PathLike = Union[str, os.PathLike]

DATASET_FILE = 'dataset.json'
VAL_DATASET_FILE = 'dataset_val.json'
DATASET_INFO_FILE = 'dataset_info.json'
IMAGE_DIR = 'images'

_USER_ROLES = ('user', 'human')
_ASSISTANT_ROLES = ('assistant', 'gpt')


@dataclass
class SftSample:
    """One training example: an image file, the instruction and the answer to learn."""

    image_path: str
    instruction: str
    answer: str


@dataclass
class DatasetSummary:
    """What :func:`write_sft_dataset` wrote and what it left out, and why."""

    train: int = 0
    val: int = 0
    objects: Counter = field(default_factory=Counter)
    dropped_labels: Counter = field(default_factory=Counter)
    empty_images: int = 0
    skipped_images: List[Tuple[str, str]] = field(default_factory=list)
    attribute_counts: Counter = field(default_factory=Counter)
    files: List[str] = field(default_factory=list)


def dataset_info_entry(file_name: str) -> dict:
    """LLaMA-Factory's ``dataset_info.json`` entry for a sharegpt file written here."""
    return {
        'file_name': file_name,
        'formatting': 'sharegpt',
        'columns': {'messages': 'messages', 'images': 'images'},
        'tags': {'role_tag': 'role', 'content_tag': 'content', 'user_tag': 'user',
                 'assistant_tag': 'assistant'},
    }


def sharegpt_record(instruction: str, answer: str, image_ref: str) -> dict:
    """One sharegpt sample with exactly one image, placed after the instruction."""
    return {
        'messages': [{'role': 'user', 'content': training_user_text(instruction)},
                     {'role': 'assistant', 'content': answer}],
        'images': [image_ref],
    }


def grid_objects(image: LabeledImage, matcher: LabelMatcher
                 ) -> Tuple[List[ParsedObject], List[str]]:
    """The image's objects whose label is a prompt category, boxes on the 0-1000 grid.

    Labels are mapped onto the category spelling of the prompt (``"Cup"`` -> ``"cup"``);
    objects are sorted top to bottom, then left to right, so every answer lists objects in
    one reading order. Returns ``(objects, labels that are not prompt categories)``.
    """
    objects, dropped = [], []
    size = (image.width, image.height)
    for obj in image.objects:
        category = matcher.match(obj.label)
        if category is None:
            dropped.append(obj.label)
            continue
        attributes = {str(key).strip().lower(): value for key, value in obj.attributes.items()}
        objects.append(ParsedObject(category, to_grid(obj.box, size), attributes))
    objects.sort(key=lambda item: (item.box[1], item.box[0], item.box[3], item.box[2]))
    return objects, dropped


def answer_for_image(image: LabeledImage, prompt: PromptBuilder,
                     matcher: Optional[LabelMatcher] = None
                     ) -> Tuple[str, List[ParsedObject], List[str]]:
    """The answer text the model should give for ``image`` under ``prompt``.

    Returns ``(answer, objects in it, dropped labels)``; attributes appear only with
    ``prompt.describe``.
    """
    matcher = matcher or LabelMatcher(prompt.categories, match_head_noun=False)
    objects, dropped = grid_objects(image, matcher)
    return format_answer(objects, prompt.answer_attributes), objects, dropped


def split_indices(count: int, val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Shuffle ``range(count)`` with ``seed`` and split off ``val_fraction`` (both sorted).

    A positive fraction gives at least one validation sample and leaves at least one for
    training; ValueError when that is impossible or the fraction is outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f'the validation fraction must be in [0, 1), got {val_fraction}')
    if val_fraction == 0.0:
        return list(range(count)), []
    if count < 2:
        raise ValueError(f'cannot split {count} sample(s) into training and validation')
    order = list(range(count))
    random.Random(seed).shuffle(order)
    val_count = min(max(1, round(count * val_fraction)), count - 1)
    return sorted(order[val_count:]), sorted(order[:val_count])


def _image_names(images: Sequence[LabeledImage]) -> List[str]:
    """A unique file name under images/ for each image (index-prefixed on a clash)."""
    names = [image.name for image in images]
    counts = Counter(name.casefold() for name in names)
    return [name if counts[name.casefold()] == 1 else f'{index:05d}_{name}'
            for index, name in enumerate(names)]


def _place_image(source: Path, target: Path, link: bool) -> None:
    if target.exists() or target.is_symlink():
        target.unlink()
    if link:
        target.symlink_to(source.resolve())
    else:
        shutil.copyfile(source, target)


def category_coverage(images: Sequence[LabeledImage], prompt: PromptBuilder
                      ) -> Tuple[Counter, Counter]:
    """``(objects per prompt category, objects per label that is no category)`` of ``images``,
    matched as :func:`write_sft_dataset` matches them; lets a tool refuse a dataset whose
    answers would all be empty before it writes anything."""
    matcher = LabelMatcher(prompt.categories, match_head_noun=False)
    kept, dropped = Counter(), Counter()
    for image in images:
        for obj in image.objects:
            category = matcher.match(obj.label)
            if category is None:
                dropped[obj.label] += 1
            else:
                kept[category] += 1
    return kept, dropped


def write_sft_dataset(images: Sequence[LabeledImage], out_dir: PathLike, prompt: PromptBuilder,
                      name: str = 'detection', val_fraction: float = 0.0, seed: int = 0,
                      link: bool = False, skip_empty: bool = False,
                      progress: Callable[[Iterable], Iterable] = iter) -> DatasetSummary:
    """Write ``dataset.json`` (and ``dataset_val.json``), ``images/`` and
    ``dataset_info.json`` into ``out_dir`` (which must exist); see the module docstring.

    Images are copied (``link``: symlinked) under ``images/``. An image whose file is missing
    or whose size differs from its labels is skipped with a reason (boxes would not fit it);
    with ``skip_empty``, so is one without any object of the prompt's categories.
    ``progress`` wraps the loop over images (e.g. ``tqdm``).
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    matcher = LabelMatcher(prompt.categories, match_head_noun=False)
    summary = DatasetSummary()
    records = []
    for image, file_name in progress(list(zip(images, _image_names(images)))):
        source = Path(image.image_path)
        try:
            actual = image_size(source)
        except ValueError as error:
            summary.skipped_images.append((str(source), str(error)))
            continue
        if actual != (image.width, image.height):
            summary.skipped_images.append((str(source), (
                f'the image is {actual[0]}x{actual[1]} but its labels say '
                f'{image.width}x{image.height}')))
            continue
        answer, objects, dropped = answer_for_image(image, prompt, matcher)
        summary.dropped_labels.update(dropped)
        if not objects:
            summary.empty_images += 1
            if skip_empty:
                continue
        summary.objects.update(obj.label for obj in objects)
        for obj in objects:
            summary.attribute_counts.update(key for key in prompt.answer_attributes
                                            if str(obj.attributes.get(key) or '').strip())
        _place_image(source, image_dir / file_name, link)
        records.append(sharegpt_record(prompt.instruction, answer, f'{IMAGE_DIR}/{file_name}'))
    if not records:
        raise ValueError('no sample left to write (every image was skipped)')
    train, val = split_indices(len(records), val_fraction, seed)
    info = {name: dataset_info_entry(DATASET_FILE)}
    _write_json(out_dir / DATASET_FILE, [records[index] for index in train])
    summary.files.append(DATASET_FILE)
    if val:
        info[f'{name}_val'] = dataset_info_entry(VAL_DATASET_FILE)
        _write_json(out_dir / VAL_DATASET_FILE, [records[index] for index in val])
        summary.files.append(VAL_DATASET_FILE)
    _write_json(out_dir / DATASET_INFO_FILE, info)
    summary.files.append(DATASET_INFO_FILE)
    summary.train, summary.val = len(train), len(val)
    return summary


def _write_json(path: Path, data) -> None:
    with open(path, 'w', encoding='utf-8') as stream:
        json.dump(data, stream, indent=1, ensure_ascii=False)
        stream.write('\n')


# --------------------------------------------------------------------------------------------
# Reading


def resolve_dataset_file(path: PathLike) -> Path:
    """``path`` itself when it is a file, else ``path/dataset.json``; ValueError if absent."""
    path = Path(path)
    if path.is_dir():
        path = path / DATASET_FILE
    if not path.is_file():
        raise ValueError(f'{path}: dataset file not found (give a dataset.json or the folder '
                         'tools/prepare_data.py wrote)')
    return path


def read_sft_dataset(path: PathLike, media_dir: Optional[PathLike] = None) -> List[SftSample]:
    """Read a sharegpt multimodal SFT file into :class:`SftSample` records.

    ``path`` is the JSON file or a folder holding ``dataset.json``. Each sample must be one
    user turn with exactly one ``<image>`` and one assistant turn, with one image; relative
    image paths are resolved against ``media_dir`` (default: the file's folder, as
    LLaMA-Factory resolves them against ``dataset_dir``). The ``<image>`` tag is removed: the
    trainer always puts the image right after the instruction, as the node does.
    Raises ValueError naming the sample and the problem.
    """
    path = resolve_dataset_file(path)
    base = Path(media_dir) if media_dir is not None else path.parent
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as error:
        raise ValueError(f'{path}: cannot be read as JSON ({error})') from None
    if not isinstance(data, list):
        raise ValueError(f'{path}: expected a JSON list of samples')
    return [_read_sample(item, f'{path}: sample {index}', base)
            for index, item in enumerate(data)]


def _read_sample(item, where: str, base: Path) -> SftSample:
    if not isinstance(item, dict):
        raise ValueError(f'{where}: expected an object')
    turns = item.get('messages', item.get('conversations'))
    if not isinstance(turns, list):
        raise ValueError(f'{where}: needs a "messages" (or "conversations") list')
    roles, texts = [], []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError(f'{where}: every turn must be an object')
        role = turn.get('role', turn.get('from'))
        text = turn.get('content', turn.get('value'))
        if not isinstance(role, str) or not isinstance(text, str):
            raise ValueError(f'{where}: a turn needs a role and a text content')
        roles.append(role)
        texts.append(text)
    if len(turns) != 2 or roles[0] not in _USER_ROLES or roles[1] not in _ASSISTANT_ROLES:
        raise ValueError(f'{where}: expected exactly one user turn then one assistant turn, '
                         f'got roles {roles} (system prompts and multi-turn samples are not '
                         'supported: the node sends one user turn)')
    user, answer = texts
    tags = user.count(IMAGE_PLACEHOLDER)
    if tags != 1:
        raise ValueError(f'{where}: the user turn must hold exactly one {IMAGE_PLACEHOLDER} '
                         f'tag, found {tags}')
    if IMAGE_PLACEHOLDER in answer:
        raise ValueError(f'{where}: the answer must not hold an {IMAGE_PLACEHOLDER} tag')
    images = item.get('images')
    if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
        raise ValueError(f'{where}: "images" must list exactly one image path')
    image_path = Path(images[0])
    if not image_path.is_absolute():
        image_path = base / image_path
    instruction = user.replace(IMAGE_PLACEHOLDER, '').strip()
    if not instruction:
        raise ValueError(f'{where}: the user turn has no instruction besides the image')
    if not answer.strip():
        raise ValueError(f'{where}: the answer is empty')
    return SftSample(image_path=str(image_path), instruction=instruction, answer=answer)
