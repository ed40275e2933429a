"""Load a Qwen3-VL checkpoint for inference: plain, quantized on load, or pre-quantized.

Quantization choices (``quantization=``):

- ``'none'``: weights as stored, in ``compute_dtype``.
- ``'nf4'`` / ``'fp4'``: bitsandbytes 4-bit on load, double quantization, ``compute_dtype``
  compute; the vision tower and ``lm_head`` stay unquantized (``skip_modules``).
- ``'auto'``: a pre-quantized checkpoint (``quantization_config`` in config.json) is loaded
  as it is; otherwise NF4 on CUDA and no quantization on CPU. bitsandbytes' CPU NF4 works but
  is slower than plain weights on a CPU, and memory is rarely what limits a CPU run; ask for
  ``'nf4'`` explicitly to get it there.

``compute_dtype='auto'``: bfloat16 on CUDA (float16 where the GPU has no bfloat16), float32
on CPU; for a pre-quantized checkpoint, the dtype it was saved with.
"""
import json
from pathlib import Path
from typing import Optional, Sequence, Union

from .torch_support import require, require_torch
from ..library_logs import quiet_library_logs

PathLike = Union[str, Path]

QUANTIZATIONS = ('auto', 'nf4', 'fp4', 'none')
COMPUTE_DTYPES = ('auto', 'float32', 'bfloat16', 'float16')
SUPPORTED_MODEL_TYPES = ('qwen3_vl', 'qwen3_vl_moe')
# Modules kept unquantized. transformers 5 matches these names from the start of the module
# path ('model.visual'); older releases matched substrings ('visual').
DEFAULT_SKIP_MODULES = ('model.visual', 'visual', 'lm_head')
WEIGHT_PATTERNS = ('*.safetensors',)
"""Only safetensors weights are loaded: a pickle checkpoint (``pytorch_model*.bin``) can run
code while it is read, and is refused. (``tool_support.WEIGHT_PATTERNS`` names the pickles too:
the files a tool clears before it writes a checkpoint.)"""
PICKLE_WEIGHT_PATTERNS = ('pytorch_model*.bin', '*.pt', '*.pth', '*.ckpt')
JETSON_HELP = 'README, "Jetson Orin"'


class ModelLoadError(RuntimeError):
    """A checkpoint cannot be loaded; the message says which and why."""


def read_json_object(path: Path, error: type) -> dict:
    """The JSON object in the file ``path`` (a checkpoint's or an adapter's config); raises
    ``error`` with one line when the file cannot be read, is not JSON or holds no object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as problem:
        raise error(f'{path} cannot be read as JSON: {problem}') from None
    if not isinstance(data, dict):
        raise error(f'{path} does not hold a JSON object')
    return data


def read_checkpoint_config(path: PathLike) -> dict:
    """Check that ``path`` is a Qwen3-VL checkpoint folder with weights; return config.json.

    Raises :class:`ModelLoadError` with one clear message otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f'model checkpoint {path} does not exist')
    if not path.is_dir():
        raise ModelLoadError(f'model checkpoint {path} is not a directory (give the folder '
                             'holding config.json and the weights)')
    config_file = path / 'config.json'
    if not config_file.is_file():
        raise ModelLoadError(f'model checkpoint {path} has no config.json: not a Hugging Face '
                             'checkpoint folder')
    config = read_json_object(config_file, ModelLoadError)
    model_type = config.get('model_type')
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f'model checkpoint {path} is a {model_type!r} model, not Qwen3-VL '
                             f'(model_type must be one of {", ".join(SUPPORTED_MODEL_TYPES)})')
    if not weight_files(path):
        pickles = sorted(file.name for pattern in PICKLE_WEIGHT_PATTERNS
                         for file in path.glob(pattern))
        if pickles:
            raise ModelLoadError(
                f'model checkpoint {path} has pickle weights ({", ".join(pickles)}): only '
                'safetensors checkpoints are supported (re-save it with '
                'save_pretrained(..., safe_serialization=True) where it came from)')
        raise ModelLoadError(f'model checkpoint {path} has no weights (*.safetensors)')
    return config


def weight_files(path: PathLike) -> list:
    """The weight files of a checkpoint folder, sorted."""
    path = Path(path)
    return sorted({file for pattern in WEIGHT_PATTERNS for file in path.glob(pattern)
                   if file.is_file()})


def checkpoint_quantization(config: dict) -> str:
    """'none', 'nf4', 'fp4', 'int8', or the quant_method of another pre-quantized format."""
    quantization = config.get('quantization_config')
    if not quantization:
        return 'none'
    if quantization.get('load_in_4bit'):
        return str(quantization.get('bnb_4bit_quant_type', 'fp4'))
    if quantization.get('load_in_8bit'):
        return 'int8'
    return str(quantization.get('quant_method', 'unknown'))


def model_quantization(model) -> str:
    """Like :func:`checkpoint_quantization`, for a loaded model."""
    quantization = getattr(model.config, 'quantization_config', None)
    if quantization is None:
        return 'none'
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    return checkpoint_quantization({'quantization_config': quantization})


def describe_checkpoint(path: PathLike) -> dict:
    """What a checkpoint holds, for tools: architecture, sizes, quantization, files."""
    config = read_checkpoint_config(path)
    path = Path(path)
    text = config.get('text_config') or {}
    vision = config.get('vision_config') or {}
    files = weight_files(path)
    quantization = checkpoint_quantization(config)
    return {
        'path': str(path),
        'model_type': config.get('model_type'),
        'architectures': list(config.get('architectures') or []),
        'dtype': config.get('dtype') or config.get('torch_dtype') or text.get('dtype'),
        'quantization': quantization,
        'quantized': quantization != 'none',
        'text': {key: text.get(key) for key in (
            'hidden_size', 'num_hidden_layers', 'intermediate_size', 'num_attention_heads',
            'num_key_value_heads', 'head_dim', 'vocab_size')},
        'vision': {key: vision.get(key) for key in (
            'depth', 'hidden_size', 'out_hidden_size', 'patch_size', 'spatial_merge_size')},
        'tie_word_embeddings': config.get('tie_word_embeddings',
                                          text.get('tie_word_embeddings')),
        'weight_files': [file.name for file in files],
        'weight_bytes': sum(file.stat().st_size for file in files),
        'has_processor_files': all((path / name).is_file() for name in (
            'preprocessor_config.json', 'tokenizer_config.json')),
    }


def resolve_device(device: str = 'auto') -> str:
    """'auto' -> 'cuda' if available else 'cpu'; checks that a CUDA device exists."""
    torch = require_torch()
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    kind, _, index = str(device).partition(':')
    if kind == 'cpu' and not index:
        return 'cpu'
    if kind != 'cuda' or (index and not index.isdigit()):
        raise ModelLoadError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    if not torch.cuda.is_available():
        if not torch.version.cuda:
            why = (f'torch {torch.__version__} is a CPU-only build: install a CUDA build of '
                   f'torch first (Jetson: {JETSON_HELP})')
        else:
            why = (f'torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees '
                   'no GPU (driver, CUDA_VISIBLE_DEVICES, or a container without the GPU)')
        raise ModelLoadError(f'device {device!r} was asked for but CUDA is not available: {why}')
    if index and int(index) >= torch.cuda.device_count():
        raise ModelLoadError(f'device {device!r} does not exist: '
                             f'{torch.cuda.device_count()} CUDA device(s)')
    return str(device)


def load_model(path: PathLike, device: str = 'auto', quantization: str = 'auto',
               compute_dtype: str = 'auto',
               skip_modules: Sequence[str] = DEFAULT_SKIP_MODULES):
    """Load a Qwen3-VL checkpoint onto ``device`` in eval mode (see the module docstring).

    Raises :class:`ModelLoadError` for a path that is not a loadable Qwen3-VL checkpoint, or
    for options that contradict it (e.g. 'none' on a pre-quantized checkpoint).
    """
    quiet_library_logs()
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f'quantization must be one of {", ".join(QUANTIZATIONS)}, '
                             f'not {quantization!r}')
    if compute_dtype not in COMPUTE_DTYPES:
        raise ModelLoadError(f'compute_dtype must be one of {", ".join(COMPUTE_DTYPES)}, '
                             f'not {compute_dtype!r}')
    config = read_checkpoint_config(path)
    torch = require_torch()
    transformers = require('transformers', 'to load Qwen3-VL')
    device = resolve_device(device)
    stored = checkpoint_quantization(config)
    load_kwargs = {'device_map': 'cpu' if device == 'cpu' else {'': device}}

    if stored != 'none':
        if quantization not in ('auto', stored):
            raise ModelLoadError(
                f'model checkpoint {path} is already quantized ({stored}); it cannot be '
                f"loaded as {quantization!r}. Use quantization='auto'.")
        dtype = _pick_dtype(torch, device, compute_dtype, _stored_dtype(config))
        load_kwargs['dtype'] = dtype
        if stored in ('nf4', 'fp4', 'int8'):
            _require_bitsandbytes(device, f'to load a bitsandbytes {stored} checkpoint')
    else:
        if quantization == 'auto':
            quantization = 'nf4' if device != 'cpu' else 'none'
        dtype = _pick_dtype(torch, device, compute_dtype, None)
        load_kwargs['dtype'] = dtype
        if quantization != 'none':
            _require_bitsandbytes(device, f'to quantize the model to {quantization} on load')
            load_kwargs['quantization_config'] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quantization,
                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                llm_int8_skip_modules=list(skip_modules))
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            str(path), use_safetensors=True, **load_kwargs)
    except Exception as error:  # noqa: BLE001 - any failure to read a checkpoint is one line
        raise ModelLoadError(f'loading model checkpoint {path} failed: '
                             f'{type(error).__name__}: {error}') from error
    return model.eval()


def bitsandbytes_problem(device: str) -> Optional[str]:
    """Why bitsandbytes cannot run 4-bit layers on ``device`` ('cpu', 'cuda', 'cuda:N'), in
    one line, or None. Catches at start-up what would otherwise fail later: bitsandbytes
    missing; installed without a CUDA library that loads (it logs a long error at import and
    fails at the first call); or with one whose kernels were not built for this GPU (PyPI's
    aarch64 wheels have no sm_87, Jetson Orin's: they load, then fail at the first launch),
    which one small NF4 quantization on ``device`` finds out."""
    try:
        import bitsandbytes
    except Exception as error:  # ImportError, or a native library failing at import
        return (f'bitsandbytes is not importable ({type(error).__name__}: {error}); '
                'pip install -r tools/env/requirements.txt (Jetson: build it from source, '
                f'{JETSON_HELP})')
    if not str(device).startswith('cuda'):
        return None
    from bitsandbytes import cextension
    library = getattr(cextension, 'lib', None)
    version = getattr(bitsandbytes, '__version__', '?')
    torch = require_torch()
    if getattr(library, 'compiled_with_cuda', None) is False:  # None: another API, go on
        error = _first_line(getattr(library, 'error_msg', ''))
        return (f'bitsandbytes {version} has no CUDA library loaded'
                f'{f" ({error})" if error else ""}: 4-bit layers on {device} need one built '
                f'for CUDA {torch.version.cuda or "?"} (Jetson: build it from source, '
                f'{JETSON_HELP})')
    try:
        probe_4bit_kernels(device)
    except Exception as error:  # noqa: BLE001 - any failure here is the answer
        major, minor = torch.cuda.get_device_capability(device)
        return (f'bitsandbytes {version} cannot run its 4-bit kernels on {device} (compute '
                f'capability {major}.{minor}): {type(error).__name__}: '
                f'{_first_line(str(error))}; build it from source for this GPU (Jetson Orin: '
                f'-DCOMPUTE_CAPABILITY=87, {JETSON_HELP})')
    return None


def probe_4bit_kernels(device: str) -> None:
    """Quantize and dequantize one small NF4 block on ``device`` with bitsandbytes; raises
    what bitsandbytes raises."""
    torch = require_torch()
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    values = torch.linspace(-1.0, 1.0, 64 * 64, device=device, dtype=torch.float16)
    packed, state = quantize_4bit(values.view(64, 64), quant_type='nf4')
    restored = dequantize_4bit(packed, state)
    if str(device).startswith('cuda'):
        torch.cuda.synchronize(device)
    if not bool(torch.isfinite(restored).all()):
        raise RuntimeError('NF4 round trip gave non-finite values')


def _first_line(text) -> str:
    return next((line.strip() for line in str(text or '').splitlines() if line.strip()), '')


def _require_bitsandbytes(device: str, purpose: str) -> None:
    problem = bitsandbytes_problem(device)
    if problem:
        raise ModelLoadError(f'{purpose}: {problem}')


def _stored_dtype(config: dict) -> Optional[str]:
    text = config.get('text_config') or {}
    return config.get('dtype') or config.get('torch_dtype') or text.get('dtype')


def _pick_dtype(torch, device: str, compute_dtype: str, stored: Optional[str]):
    if compute_dtype != 'auto':
        return getattr(torch, compute_dtype)
    if stored in ('float32', 'bfloat16', 'float16'):
        return getattr(torch, stored)
    if device == 'cpu':
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
