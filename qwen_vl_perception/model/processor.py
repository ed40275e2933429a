"""Model inputs for Qwen3-VL, built as ``Qwen3VLProcessor`` builds them, without torchvision.

transformers' ``Qwen3VLProcessor`` cannot be constructed without torchvision (its video
processor needs it), so :class:`InputBuilder` does its work for images directly: render the
checkpoint's chat template, repeat ``<|image_pad|>`` once per visual token
(``grid_t * grid_h * grid_w / merge_size**2``), tokenize, and left-pad the batch. Pixels come
from the checkpoint's Qwen2-VL image processor: the torchvision backend where torchvision
imports (what ``AutoProcessor`` picks there), the PIL backend otherwise.
"""
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..prompt import build_messages
from .torch_support import require, require_torch

PathLike = Union[str, Path]

IMAGE_PAD = '<|image_pad|>'
IMAGE_BACKENDS = ('auto', 'pil', 'torchvision')
MM_TOKEN_TYPE_TEXT = 0
MM_TOKEN_TYPE_IMAGE = 1
_PROMPT_CACHE_SIZE = 32


@dataclass
class ModelInputs:
    """One batch for ``model.generate``: tensors plus the size of each image the model saw.

    ``tensors``: ``input_ids``, ``attention_mask`` (left padded), ``mm_token_type_ids``
    (1 on image tokens; transformers 5 needs it for Qwen3-VL's M-RoPE), ``pixel_values`` and
    ``image_grid_thw``. ``model_input_sizes``: (width, height) of each resized image, which
    absolute-pixel (Qwen2.5-VL style) boxes refer to.
    """

    tensors: Dict[str, object]
    model_input_sizes: List[Tuple[int, int]]

    @property
    def batch_size(self) -> int:
        return int(self.tensors['input_ids'].shape[0])

    @property
    def prompt_length(self) -> int:
        return int(self.tensors['input_ids'].shape[1])

    def to(self, device) -> 'ModelInputs':
        """A copy with every tensor on ``device`` (dtypes unchanged)."""
        moved = {name: tensor.to(device) for name, tensor in self.tensors.items()}
        return ModelInputs(tensors=moved, model_input_sizes=list(self.model_input_sizes))


class InputBuilder:
    """Turns RGB images and one instruction into :class:`ModelInputs` (thread-safe)."""

    def __init__(self, tokenizer, image_processor, chat_template: str):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f'the tokenizer has no {IMAGE_PAD} token: not a Qwen-VL tokenizer')
        if tokenizer.pad_token_id is None:
            raise ValueError('the tokenizer has no pad token')
        self.pad_token_id = tokenizer.pad_token_id
        self.merge_size = int(image_processor.merge_size)
        self.patch_size = int(image_processor.patch_size)
        self._prompt_cache = OrderedDict()
        self._cache_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, checkpoint_dir: PathLike, min_pixels: Optional[int] = None,
                        max_pixels: Optional[int] = None,
                        image_backend: str = 'auto') -> 'InputBuilder':
        """Load tokenizer, image processor and chat template from a checkpoint folder.

        ``min_pixels``/``max_pixels`` override the checkpoint's pixel budget of the resized
        image (each side is a multiple of 32). ``image_backend``: 'auto' (torchvision if it
        imports, else PIL, as ``AutoProcessor`` chooses), 'pil' or 'torchvision'.
        """
        checkpoint_dir = Path(checkpoint_dir)
        if image_backend not in IMAGE_BACKENDS:
            raise ValueError(f'image_backend must be one of {", ".join(IMAGE_BACKENDS)}, '
                             f'not {image_backend!r}')
        if not (checkpoint_dir / 'preprocessor_config.json').is_file():
            raise FileNotFoundError(f'{checkpoint_dir} has no preprocessor_config.json')
        transformers = require('transformers', 'to build Qwen3-VL inputs')
        chat_template = read_chat_template(checkpoint_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint_dir)
        size = _pixel_budget(checkpoint_dir, min_pixels, max_pixels)
        backend = None if image_backend == 'auto' else image_backend
        if backend is None and not _torchvision_imports():
            backend = 'pil'
        image_processor = transformers.AutoImageProcessor.from_pretrained(
            checkpoint_dir, backend=backend, size=size)
        builder = cls(tokenizer, image_processor, chat_template)
        builder.prompt_ids('')  # fails now, not on the first frame, if the template is wrong
        return builder

    @property
    def min_pixels(self) -> int:
        return int(self.image_processor.size['shortest_edge'])

    @property
    def max_pixels(self) -> int:
        return int(self.image_processor.size['longest_edge'])

    def prompt_text(self, instruction: str) -> str:
        """The chat template rendered for one image and ``instruction`` (one image pad)."""
        return self.tokenizer.apply_chat_template(
            build_messages(instruction), chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=True)

    def prompt_ids(self, instruction: str) -> Tuple[List[int], int]:
        """Token ids of the rendered prompt and the index of its one image pad (cached)."""
        with self._cache_lock:
            cached = self._prompt_cache.get(instruction)
            if cached is not None:
                self._prompt_cache.move_to_end(instruction)
                return cached
        text = self.prompt_text(instruction)
        ids = list(self.tokenizer(text)['input_ids'])
        positions = [index for index, token in enumerate(ids) if token == self.image_token_id]
        if len(positions) != 1:
            raise ValueError(
                f'the chat template rendered {len(positions)} {IMAGE_PAD} tokens for one image '
                '(a text-only template, or an instruction holding special tokens?)')
        result = (ids, positions[0])
        with self._cache_lock:
            self._prompt_cache[instruction] = result
            while len(self._prompt_cache) > _PROMPT_CACHE_SIZE:
                self._prompt_cache.popitem(last=False)
        return result

    def image_token_count(self, grid_thw) -> int:
        t, h, w = (int(value) for value in grid_thw)
        return t * h * w // self.merge_size ** 2

    def build(self, images: Sequence[np.ndarray], instruction: str) -> ModelInputs:
        """Inputs for a batch: one conversation per image, all with ``instruction``.

        ``images``: HxWx3 uint8 RGB arrays (sizes may differ).
        """
        torch = require_torch()
        images = _checked_images(images)
        ids, pad_index = self.prompt_ids(instruction)
        vision = self.image_processor(images=images, return_tensors='pt',
                                      input_data_format='channels_last')
        grids = vision['image_grid_thw']
        sequences, sizes = [], []
        for grid in grids.tolist():
            count = self.image_token_count(grid)
            sequences.append(ids[:pad_index] + [self.image_token_id] * count
                             + ids[pad_index + 1:])
            sizes.append((grid[2] * self.patch_size, grid[1] * self.patch_size))
        length = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, length - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, length - len(sequence):] = 1
        mm_token_type_ids = (input_ids == self.image_token_id).long() * MM_TOKEN_TYPE_IMAGE
        tensors = {
            'input_ids': input_ids,
            'attention_mask': attention_mask,
            'mm_token_type_ids': mm_token_type_ids,
            'pixel_values': vision['pixel_values'],
            'image_grid_thw': grids,
        }
        return ModelInputs(tensors=tensors, model_input_sizes=sizes)


def read_chat_template(checkpoint_dir: PathLike) -> str:
    """The checkpoint's chat template: chat_template.jinja, chat_template.json, or
    tokenizer_config.json's (the order transformers' processors use)."""
    checkpoint_dir = Path(checkpoint_dir)
    jinja = checkpoint_dir / 'chat_template.jinja'
    if jinja.is_file():
        return jinja.read_text()
    for name in ('chat_template.json', 'tokenizer_config.json'):
        path = checkpoint_dir / name
        if path.is_file():
            template = json.loads(path.read_text()).get('chat_template')
            if isinstance(template, str) and template:
                return template
    raise FileNotFoundError(
        f'{checkpoint_dir} has no chat template (chat_template.jinja, chat_template.json or '
        'tokenizer_config.json)')


def _pixel_budget(checkpoint_dir: Path, min_pixels, max_pixels) -> dict:
    config = json.loads((checkpoint_dir / 'preprocessor_config.json').read_text())
    size = dict(config.get('size') or {})
    size.setdefault('shortest_edge', config.get('min_pixels'))
    size.setdefault('longest_edge', config.get('max_pixels'))
    if min_pixels is not None:
        size['shortest_edge'] = min_pixels
    if max_pixels is not None:
        size['longest_edge'] = max_pixels
    low, high = size.get('shortest_edge'), size.get('longest_edge')
    for name, value in (('min_pixels', low), ('max_pixels', high)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    if low > high:
        raise ValueError(f'min_pixels ({low}) must not exceed max_pixels ({high})')
    return {'shortest_edge': low, 'longest_edge': high}


def _checked_images(images) -> List[np.ndarray]:
    if isinstance(images, np.ndarray) or not isinstance(images, (list, tuple)):
        raise TypeError('images must be a list of HxWx3 uint8 RGB arrays')
    if not images:
        raise ValueError('images is empty')
    checked = []
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray):
            raise TypeError(f'image {index} is a {type(image).__name__}, not a numpy array')
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f'image {index} has shape {image.shape}, expected HxWx3')
        if image.dtype != np.uint8:
            raise ValueError(f'image {index} has dtype {image.dtype}, expected uint8')
        checked.append(np.ascontiguousarray(image))
    return checked


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # a broken install raises more than ImportError
        return False
    return True
