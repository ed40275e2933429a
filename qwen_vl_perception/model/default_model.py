"""The project's embedded default model: a compact file in the package, a checkpoint in a cache.

``tools/make_default_model.py`` trains a tiny Qwen3-VL on synthetic scenes and packs the
merged float32 checkpoint into ``qwen_vl_perception/default_model/``: every tensor in
float16, except the 151,936-row embedding, of which only the non-zero rows are stored (with
their token ids). That is a few MB instead of ~90. :func:`ensure_default_model` unpacks it
into a normal checkpoint (real Qwen3 tokenizer and Qwen3-VL processor files written by
:func:`~.checkpoint_files.write_input_files`), quantizes that to NF4 with the quantize
tool's function (``pipeline/quantization.py``, imported on first use), and caches both
under ``$QWEN_VL_PERCEPTION_CACHE`` (default ``~/.cache/qwen_vl_perception``), keyed by
the packed file's hash. The node's ``model_path: default`` and the demo use it.

A cached folder is used only if it can be trusted (:func:`verify_cached`): it and everything
in it belong to the current user or root, nothing there or in the folders above it is
writable by group or others (sticky folders such as /tmp excepted), nothing is a symbolic
link, and its files are exactly those listed, with their SHA-256, in ``content.sha256``,
which the build writes last. Anything else stops with :class:`DefaultModelError`. Files are
written 0644 in 0755 folders, so that a cache built by root is readable by every user.

The default model only knows the synthetic scenes' categories (ball, box, cone, ring) and
colours; it is a demonstration and test model, not a general detector.
"""
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Union

from ..trained_prompt import PROMPT_FILE
from .cache_trust import make_folders, untrusted_above, untrusted_entry
from .pixel_budget import write_pixel_budget
from .checkpoint_files import write_input_files
from .torch_support import require, require_torch

PathLike = Union[str, Path]

PACKED_DIR = Path(__file__).resolve().parent.parent / 'default_model'
"""Where the packed default model lives inside the package."""
WEIGHTS_FILE = 'weights.safetensors'
MANIFEST_FILE = 'manifest.json'
EMBEDDING_KEY = 'model.language_model.embed_tokens.weight'
_ROWS_KEY = 'embedding_rows'
_IDS_KEY = 'embedding_token_ids'
CACHE_ENV = 'QWEN_VL_PERCEPTION_CACHE'
_FORMAT_VERSION = '2'
"""Part of the cache key: bump it when unpacking or quantizing changes what is built."""
_STALE_BUILD_SECONDS = 3600
"""A temporary build folder older than this belongs to no running build."""
DEFAULT_MODEL_NAME = 'default'
"""The ``model_path`` value that selects the default model."""
FLOAT32_DEFAULT_HELP = (f"'{DEFAULT_MODEL_NAME}' for the project's synthetic-scenes model "
                        '(its float32 form)')
"""How the tools that start from an unquantized model (finetune, merge, quantize) say that
``default`` is accepted."""
CONTENT_FILE = 'content.sha256'
"""In a cached folder: ``<sha256>  <name>`` of every other file (``sha256sum -c`` reads it)."""


class DefaultModelError(RuntimeError):
    """The packed default model is missing or unusable."""


def pack_checkpoint(checkpoint: PathLike, out_dir: PathLike,
                    extra_manifest: Optional[dict] = None) -> Path:
    """Pack a float checkpoint with a mostly zero embedding into ``out_dir``.

    Writes ``weights.safetensors`` (float16 tensors; the embedding as its non-zero rows plus
    their ids) and ``manifest.json`` (config, generation config, pixel budget, prompt record,
    and ``extra_manifest``). Returns ``out_dir``.
    """
    torch = require_torch()
    require('safetensors', 'to pack the default model')
    from safetensors.torch import load_file, save_file
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    needed = ('model.safetensors', 'config.json', 'generation_config.json',
              'preprocessor_config.json')
    missing = [name for name in needed if not (checkpoint / name).is_file()]
    if missing:
        raise DefaultModelError(f'{checkpoint}: cannot pack, missing {", ".join(missing)}')
    state = load_file(str(checkpoint / 'model.safetensors'))
    embedding = state.pop(EMBEDDING_KEY)
    rows = torch.nonzero(embedding.abs().sum(1)).flatten()
    packed = {key: value.to(torch.float16).contiguous() for key, value in state.items()}
    packed[_ROWS_KEY] = embedding[rows].to(torch.float16).contiguous()
    packed[_IDS_KEY] = rows.to(torch.int64)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(packed, str(out_dir / WEIGHTS_FILE), metadata={'format': 'pt'})
    manifest = {
        'vocab_size': int(embedding.shape[0]),
        'config': _read_json(checkpoint / 'config.json'),
        'generation_config': _read_json(checkpoint / 'generation_config.json'),
        'pixel_budget': _read_json(checkpoint / 'preprocessor_config.json').get('size'),
        'prompt': _read_json(checkpoint / PROMPT_FILE),
    }
    manifest.update(extra_manifest or {})
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + '\n')
    return out_dir


def unpack_checkpoint(packed_dir: PathLike, out_dir: PathLike) -> Path:
    """Write the normal float32 Qwen3-VL checkpoint a packed folder describes."""
    torch = require_torch()
    require('safetensors', 'to unpack the default model')
    from safetensors.torch import load_file, save_file
    packed_dir, out_dir = Path(packed_dir), Path(out_dir)
    manifest = read_manifest(packed_dir)
    tensors = load_file(str(packed_dir / WEIGHTS_FILE))
    rows, ids = tensors.pop(_ROWS_KEY), tensors.pop(_IDS_KEY)
    embedding = torch.zeros(manifest['vocab_size'], rows.shape[1], dtype=torch.float32)
    embedding[ids] = rows.float()
    state: Dict[str, object] = {key: value.float().contiguous()
                                for key, value in tensors.items()}
    state[EMBEDDING_KEY] = embedding
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / 'model.safetensors'), metadata={'format': 'pt'})
    _write_json(out_dir / 'config.json', manifest['config'])
    _write_json(out_dir / 'generation_config.json', manifest['generation_config'])
    write_input_files(out_dir)
    budget = manifest.get('pixel_budget') or {}
    if budget:
        write_pixel_budget(out_dir, budget['shortest_edge'], budget['longest_edge'])
    if manifest.get('prompt'):
        _write_json(out_dir / PROMPT_FILE, manifest['prompt'])
    return out_dir


def update_manifest(packed_dir: PathLike, entries: dict) -> dict:
    """Merge ``entries`` into a packed model's manifest (top-level keys); return it."""
    manifest = read_manifest(packed_dir)
    manifest.update(entries)
    (Path(packed_dir) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + '\n')
    return manifest


def read_manifest(packed_dir: PathLike = PACKED_DIR) -> dict:
    """The packed model's manifest; :class:`DefaultModelError` if it is not there."""
    packed_dir = Path(packed_dir)
    if not (packed_dir / WEIGHTS_FILE).is_file() or not (packed_dir / MANIFEST_FILE).is_file():
        raise DefaultModelError(
            f'no packed default model in {packed_dir} ({WEIGHTS_FILE} + {MANIFEST_FILE}); '
            'make one with: python tools/make_default_model.py')
    return _read_json(packed_dir / MANIFEST_FILE)


def cache_root() -> Path:
    """``$QWEN_VL_PERCEPTION_CACHE``, else ``~/.cache/qwen_vl_perception``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / '.cache' / 'qwen_vl_perception'


def ensure_default_model(quantization: str = 'nf4', packed_dir: PathLike = PACKED_DIR,
                         cache: Optional[PathLike] = None,
                         log: Callable[[str], None] = print) -> Path:
    """The default model's checkpoint folder, made on first use and cached.

    ``quantization``: 'nf4' (the deployment form, bitsandbytes 4-bit) or 'none' (the merged
    float32 checkpoint). Folders are built in a temporary sibling and renamed into place, so
    concurrent callers never see half a checkpoint.
    """
    if quantization not in ('nf4', 'none'):
        raise ValueError("quantization must be 'nf4' or 'none'")
    packed_dir = Path(packed_dir)
    read_manifest(packed_dir)
    digest = hashlib.sha256((packed_dir / WEIGHTS_FILE).read_bytes()
                            + (packed_dir / MANIFEST_FILE).read_bytes()
                            + _FORMAT_VERSION.encode()).hexdigest()[:16]
    root = Path(cache) if cache is not None else cache_root()
    home = root / f'default-model-{digest}'
    if quantization == 'nf4' and (home / 'nf4').exists():
        return verify_cached(home / 'nf4')  # the float32 form is not needed then
    merged = _build_once(home / 'float32', lambda tmp: unpack_checkpoint(packed_dir, tmp), log)
    if quantization == 'none':
        return merged

    def quantize(tmp: Path) -> None:
        from ..pipeline.quantization import quantize_checkpoint
        quantize_checkpoint(merged, tmp, quant_type='nf4', compute_dtype='float32',
                            device='cpu', max_new_tokens=8, log=lambda message: None)
    return _build_once(home / 'nf4', quantize, log)


def verify_cached(folder: PathLike) -> Path:
    """``folder`` if it is a cached default model that can be trusted (module docstring);
    :class:`DefaultModelError` saying why not otherwise."""
    folder = Path(folder)
    _check_trusted_above(folder.parent)
    record = folder / CONTENT_FILE
    listed = {}
    for entry in [folder, *sorted(folder.iterdir())]:
        _check_trusted(entry, stat.S_ISDIR if entry == folder else stat.S_ISREG)
    try:
        for line in record.read_text().splitlines():
            digest, name = line.split('  ', 1)
            listed[name] = digest
    except (OSError, ValueError) as error:
        raise DefaultModelError(f'{folder}: no readable {CONTENT_FILE} ({error}); remove the '
                                'folder to rebuild it') from None
    present = {entry.name for entry in folder.iterdir()} - {CONTENT_FILE}
    if present != set(listed):
        raise DefaultModelError(
            f'{folder}: its files differ from those {CONTENT_FILE} lists (extra: '
            f'{sorted(present - set(listed))}, missing: {sorted(set(listed) - present)}); '
            'remove the folder to rebuild it')
    for name, digest in listed.items():
        if _sha256(folder / name) != digest:
            raise DefaultModelError(f'{folder / name} does not match its hash in '
                                    f'{CONTENT_FILE} (changed after it was built); remove the '
                                    'folder to rebuild it')
    return folder


def _check_trusted(path: Path, kind) -> None:
    reason = untrusted_entry(path, kind)
    if reason is not None:
        raise DefaultModelError(f'{reason}; refusing the cached default model')


def _check_trusted_above(folder: Path) -> None:
    reason = untrusted_above(folder)
    if reason is not None:
        raise DefaultModelError(f'{reason}; refusing the cached default model below it '
                                '(README, "Reliability and security")')


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as stream:
        for block in iter(lambda: stream.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _seal(folder: Path) -> None:
    """Make a finished build shareable (0644 files in a 0755 folder) and record its hashes."""
    lines = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            raise DefaultModelError(f'{entry}: the build left something that is not a file')
        entry.chmod(0o644)
        lines.append(f'{_sha256(entry)}  {entry.name}\n')
    record = folder / CONTENT_FILE
    record.write_text(''.join(lines))
    record.chmod(0o644)
    folder.chmod(0o755)


def resolve_model_path(path: PathLike, form: str = 'nf4',
                       log: Callable[[str], None] = print) -> Path:
    """``path`` as a checkpoint folder: ``'default'`` (:data:`DEFAULT_MODEL_NAME`) gives the
    default model's folder in ``form`` ('nf4' to detect with, 'none' for the float32 one that
    fine-tuning, merging and quantizing start from), made on first use; any other path is
    returned as it is. The tools and the demo take their model options through it."""
    if str(path) == DEFAULT_MODEL_NAME:
        return ensure_default_model(form, log=log)
    return Path(path)


def _build_once(target: Path, build: Callable[[Path], object],
                log: Callable[[str], None]) -> Path:
    if target.exists() or target.is_symlink():
        return verify_cached(target)
    make_folders(target.parent)  # readable by all, writable by their owner only
    for stale in target.parent.glob(target.name + '.*'):  # left by a build that was killed
        if time.time() - stale.stat().st_mtime > _STALE_BUILD_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    log(f'preparing the default model in {target} (first use only)')
    tmp = Path(tempfile.mkdtemp(prefix=target.name + '.', dir=target.parent))
    try:
        build(tmp)
        _seal(tmp)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            tmp.rename(target)
        except OSError:
            if not target.exists():  # not a concurrent builder's result
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return verify_cached(target)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + '\n')


if __name__ == '__main__':  # python -m qwen_vl_perception.model.default_model: fill a cache
    for form in ('none', 'nf4'):
        print(ensure_default_model(form))
