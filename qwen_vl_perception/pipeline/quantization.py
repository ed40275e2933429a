"""Quantize a merged Qwen3-VL checkpoint to bitsandbytes 4-bit and save it pre-quantized.

Defaults are the article's (the blog post the project grew from, "Qwen3-VL + LoRA SFT + 4-bit
quantization", see README.md): ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float16)``.
``lm_head`` always stays in full precision (it is tied to the embeddings; transformers keeps it
too); other modules can be kept with ``keep_full_precision`` (e.g. ``visual``: the vision
tower, ~0.4 B parameters of the 4B). The saved folder is checked by reloading it through the
node's own engine (:class:`~qwen_vl_perception.model.engine.VisionLanguageEngine`), counting
its ``Linear4bit`` layers and generating one answer. Works on CUDA and on the CPU (bitsandbytes
>= 0.48).
"""
import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

from ..library_logs import quiet_library_logs
from ..trained_prompt import copy_prompt_file
from ..model.loading import (checkpoint_quantization, read_checkpoint_config, resolve_device,
                             weight_files)
from .probe import probe_image, probe_instruction
from ..model.checkpoint_files import copy_processor_files
from ..model.torch_support import require, require_torch

PathLike = Union[str, Path]

QUANT_TYPES = ('nf4', 'fp4')
COMPUTE_DTYPES = ('float16', 'bfloat16', 'float32')
STORAGE_DTYPES = ('auto', 'bfloat16', 'float16', 'float32')
ALWAYS_FULL_PRECISION = ('lm_head',)
QUANTIZE_LOG = 'quantize_log.json'


class QuantizeError(RuntimeError):
    """Quantization was refused (quantized source, unknown module name)."""


class QuantizeCheckError(QuantizeError):
    """The quantized checkpoint was written but failed its reload check."""


@dataclass
class QuantizeResult:
    out_dir: str
    device: str
    quant_type: str
    double_quant: bool
    compute_dtype: str
    storage_dtype: str
    full_precision_modules: List[str]
    linear4bit_layers: int
    full_precision_linear_layers: int
    source_weight_bytes: int
    quantized_weight_bytes: int
    memory_footprint_bytes: int
    check_answer: str = ''
    check_new_tokens: int = 0
    seconds: float = 0.0
    processor_files: List[str] = field(default_factory=list)


def module_names_of(model_dir: PathLike) -> List[str]:
    """Module names of the checkpoint's architecture, from an empty (meta) model."""
    torch = require_torch()
    transformers = require('transformers', 'to read the model architecture')
    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    with torch.device('meta'):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    return [name for name, _ in model.named_modules() if name]


def resolve_modules(names: Sequence[str], module_names: Sequence[str]) -> List[str]:
    """Full module paths for short names: ``visual`` -> ``model.visual``.

    A name matches a module whose dotted path contains it as whole parts (``visual``,
    ``visual.merger``, ``lm_head``, ``model.visual``); only the outermost matches are kept.
    Raises :class:`QuantizeError` for a name that matches nothing.
    """
    resolved: List[str] = []
    for name in names:
        name = name.strip().strip('.')
        if not name:
            continue
        needle = '.' + name + '.'
        matches = sorted((module for module in module_names
                          if needle in '.' + module + '.'), key=lambda m: (m.count('.'), m))
        if not matches:
            top = sorted(module for module in module_names if module.count('.') <= 1)
            raise QuantizeError(f'no module named {name!r} in the model (modules near the top: '
                                f'{", ".join(top[:8])})')
        for match in matches:
            if not any(match == kept or match.startswith(kept + '.') for kept in resolved):
                resolved.append(match)
    return resolved


def count_layers(model) -> tuple:
    """(Linear4bit layers, other linear layers) of a loaded model."""
    torch = require_torch()
    bnb = require('bitsandbytes', 'to count 4-bit layers')
    four_bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    other = sum(isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit)
                for m in model.modules())
    return four_bit, other


def quantize_checkpoint(model_dir: PathLike, out_dir: PathLike, quant_type: str = 'nf4',
                        compute_dtype: str = 'float16', double_quant: bool = True,
                        keep_full_precision: Sequence[str] = (), device: str = 'auto',
                        storage_dtype: str = 'auto', check_image: Optional[PathLike] = None,
                        check_instruction: Optional[str] = None, max_new_tokens: int = 64,
                        log: Callable[[str], None] = print) -> QuantizeResult:
    """Quantize ``model_dir`` into ``out_dir`` (must exist), reload it and generate once.

    ``storage_dtype``: dtype of the modules left unquantized ('auto': the checkpoint's).
    Raises :class:`QuantizeError` for a pre-quantized source or an unknown module name,
    :class:`QuantizeCheckError` for a failed check, and ModelLoadError for a folder that is
    not a Qwen3-VL checkpoint.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f'quant_type must be one of {", ".join(QUANT_TYPES)}')
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f'compute_dtype must be one of {", ".join(COMPUTE_DTYPES)}')
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f'storage dtype must be one of {", ".join(STORAGE_DTYPES)}')
    quiet_library_logs()
    started = time.perf_counter()
    config = read_checkpoint_config(model_dir)
    stored = checkpoint_quantization(config)
    if stored != 'none':
        raise QuantizeError(f'{model_dir} is already quantized ({stored}); quantize the '
                            'merged full-precision checkpoint instead')
    torch = require_torch()
    transformers = require('transformers', 'to quantize Qwen3-VL')
    require('bitsandbytes', 'to quantize to 4 bits')
    device = resolve_device(device)
    if storage_dtype == 'auto':
        text = config.get('text_config') or {}
        storage_dtype = str(config.get('dtype') or config.get('torch_dtype')
                            or text.get('dtype') or 'bfloat16')
        if storage_dtype not in COMPUTE_DTYPES:
            storage_dtype = 'bfloat16'
    kept = resolve_modules(list(ALWAYS_FULL_PRECISION) + list(keep_full_precision),
                           module_names_of(model_dir))
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype), llm_int8_skip_modules=kept)
    log(f'quantizing {model_dir} to {quant_type} on {device} (double quantization '
        f'{"on" if double_quant else "off"}, {compute_dtype} compute; kept in {storage_dtype}: '
        f'{", ".join(kept)})')
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        str(model_dir), use_safetensors=True, quantization_config=bnb_config,
        dtype=getattr(torch, storage_dtype),
        device_map='cpu' if device == 'cpu' else {'': device})
    four_bit, other = count_layers(model)
    _check_kept(model, kept)
    if four_bit == 0:
        raise QuantizeError('no layer was quantized (every linear layer is in a kept module)')
    footprint = int(model.get_memory_footprint())
    model.save_pretrained(str(out_dir))
    del model
    _free(torch)
    copied = copy_processor_files(model_dir, out_dir)
    copy_prompt_file(model_dir, out_dir)

    log(f'reloading {out_dir} with the node engine and generating once')
    from ..model.engine import VisionLanguageEngine
    engine = VisionLanguageEngine(out_dir, device=device)
    reloaded_four_bit, _ = count_layers(engine.model)
    if reloaded_four_bit != four_bit:
        raise QuantizeCheckError(f'the saved checkpoint reloads with {reloaded_four_bit} '
                                 f'Linear4bit layers instead of {four_bit}')
    instruction = check_instruction or probe_instruction(model_dir)
    generation = engine.generate([probe_image(check_image)], instruction, max_new_tokens)[0]
    engine.close()
    result = QuantizeResult(
        out_dir=str(out_dir), device=device, quant_type=quant_type, double_quant=double_quant,
        compute_dtype=compute_dtype, storage_dtype=storage_dtype, full_precision_modules=kept,
        linear4bit_layers=four_bit, full_precision_linear_layers=other,
        source_weight_bytes=sum(p.stat().st_size for p in weight_files(model_dir)),
        quantized_weight_bytes=sum(p.stat().st_size for p in weight_files(out_dir)),
        memory_footprint_bytes=footprint, check_answer=generation.text,
        check_new_tokens=len(generation.token_ids), seconds=time.perf_counter() - started,
        processor_files=copied)
    Path(out_dir, QUANTIZE_LOG).write_text(json.dumps(
        {'source': str(model_dir), **asdict(result)}, indent=2) + '\n')
    return result


def _check_kept(model, kept: Sequence[str]) -> None:
    bnb = require('bitsandbytes', 'to check 4-bit layers')
    quantized = [name for name, module in model.named_modules()
                 if isinstance(module, bnb.nn.Linear4bit)
                 and any(name == k or name.startswith(k + '.') for k in kept)]
    if quantized:
        raise QuantizeCheckError('layers meant to stay in full precision were quantized: '
                                 f'{", ".join(quantized[:3])}')


def _free(torch) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
