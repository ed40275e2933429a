"""LoRA adapters for Qwen3-VL: which layers they target, the tied-embedding guard, and
loading a saved adapter (PEFT's or LLaMA-Factory's, both PEFT format) onto a base model.

Qwen3-VL-4B ties ``lm_head`` to the input embeddings (``tie_word_embeddings``). A LoRA or a
``modules_to_save`` copy on either one unties them: the saved or merged model then reloads
with an output layer that no longer matches its embeddings and writes garbage (peft#2018,
peft#2777). Adapters are therefore never put there, and adapters that touch them are refused.
"""
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from ..model.loading import read_json_object
from ..model.torch_support import require, require_torch

PathLike = Union[str, Path]

TARGET_GROUPS = ('language', 'vision', 'merger')
"""``language``: the decoder layers' attention and MLP projections (LLaMA-Factory's
``lora_target: all`` with the vision tower frozen, the default); ``vision``: the vision
tower's blocks; ``merger``: the patch mergers that project vision features into the language
model (also the deepstack ones). ``all`` is the three together."""
DEFAULT_TARGETS = ('language',)
TIED_MODULES = ('lm_head', 'embed_tokens')
ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = ('adapter_model.safetensors', 'adapter_model.bin')
TIED_EXPLANATION = (
    'Qwen3-VL ties lm_head to embed_tokens (tie_word_embeddings); a LoRA or modules_to_save '
    'on either unties them and the merged model reloads with a wrong output layer '
    '(peft#2018, peft#2777). Train the adapter without them (LLaMA-Factory: lora_target: '
    'all, no additional_target; this project: tools/finetune.py)')

_PROBE_TIED_NAMES = ('lm_head', 'model.lm_head', 'model.language_model.embed_tokens',
                     'model.embed_tokens', 'language_model.embed_tokens', 'embed_tokens')


class AdapterError(ValueError):
    """An adapter folder cannot be used; the message says why."""


# --------------------------------------------------------------------------------------------
# Target selection


def target_group(module_name: str) -> Optional[str]:
    """The :data:`TARGET_GROUPS` entry a module belongs to; None for lm_head/embeddings."""
    parts = module_name.split('.')
    if parts[-1] in TIED_MODULES:
        return None
    if 'visual' in parts:
        return 'merger' if any('merger' in part for part in parts) else 'vision'
    if 'language_model' in parts or 'layers' in parts:
        return 'language'
    return None


def linear_module_names(model) -> List[str]:
    """Names of the model's linear layers (bitsandbytes' Linear4bit/8bit included)."""
    torch = require_torch()
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)]


def select_target_modules(model, targets: Sequence[str] = DEFAULT_TARGETS
                          ) -> Tuple[str, List[str]]:
    """The PEFT ``target_modules`` regex for ``targets``, and the module names it selects.

    Each target is a group of :data:`TARGET_GROUPS`, ``all``, or the last part(s) of a layer
    name (``q_proj``, ``mlp.down_proj``, ``attn.qkv``). lm_head and embed_tokens are never
    selected and asking for them raises :class:`AdapterError` (see :data:`TIED_EXPLANATION`).
    The regex names layers with their index written ``\\d+``, so it stays short for the 4B.
    """
    wanted = []
    for target in targets:
        target = str(target).strip()
        if not target:
            continue
        if target == 'all':
            wanted.extend(TARGET_GROUPS)
        elif target.split('.')[-1] in TIED_MODULES:
            raise AdapterError(f'LoRA target {target!r} refused: {TIED_EXPLANATION}')
        else:
            wanted.append(target)
    if not wanted:
        raise AdapterError('no LoRA target given')
    selected = []
    unmatched = set(wanted)
    for name in linear_module_names(model):
        group = target_group(name)
        if group is None:
            continue
        for target in wanted:
            if target == group or (target not in TARGET_GROUPS
                                   and (name == target or name.endswith('.' + target))):
                selected.append(name)
                unmatched.discard(target)
                break
    if unmatched:
        raise AdapterError(f'LoRA target(s) {sorted(unmatched)} match no linear layer of the '
                           f'model; use {", ".join(TARGET_GROUPS)}, all, or layer names such '
                           'as q_proj')
    patterns = sorted({re.sub(r'\\\.\d+\\\.', r'\\.\\d+\\.', re.escape(name))
                       for name in selected})
    regex = '(?:' + '|'.join(patterns) + ')'
    chosen = set(selected)
    if any((re.fullmatch(regex, name) is not None) != (name in chosen)
           for name in linear_module_names(model)):
        # Only some layer indices were asked for: name every layer exactly.
        regex = '(?:' + '|'.join(re.escape(name) for name in selected) + ')'
    return regex, selected


# --------------------------------------------------------------------------------------------
# Reading adapters


@dataclass
class AdapterInfo:
    """An adapter folder: its config, weight file and the names of its tensors."""

    path: Path
    config: dict
    weights_file: Path
    weight_keys: List[str] = field(default_factory=list)

    @property
    def rank(self):
        return self.config.get('r')

    @property
    def base_model_name(self) -> str:
        return str(self.config.get('base_model_name_or_path') or '')


def read_adapter(path: PathLike) -> AdapterInfo:
    """Check an adapter folder and read its config and tensor names (not the tensors).

    Raises :class:`AdapterError` for a missing folder or file, a non-LoRA adapter, or an
    adapter that touches the tied lm_head/embed_tokens.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f'adapter folder {path} does not exist')
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        hints = sorted(str(p.parent) for p in path.rglob(ADAPTER_CONFIG))
        hint = (f'; adapters found below it: {", ".join(hints[:5])}' if hints else
                '; LLaMA-Factory writes it to saves/<model>/lora/<run>/')
        raise AdapterError(f'{path} has no {ADAPTER_CONFIG}: not a PEFT adapter folder{hint}')
    config = read_json_object(config_file, AdapterError)
    peft_type = str(config.get('peft_type', '')).upper()
    if peft_type != 'LORA':
        raise AdapterError(f'{path} is a {peft_type or "unknown"} adapter; only LoRA adapters '
                           'can be merged')
    weights = next((path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise AdapterError(f'{path} has no adapter weights ({" or ".join(ADAPTER_WEIGHTS)})')
    info = AdapterInfo(path=path, config=config, weights_file=weights,
                       weight_keys=_tensor_names(weights))
    problems = tied_module_problems(config, info.weight_keys)
    if problems:
        raise AdapterError(f'adapter {path} refused: {"; ".join(problems)}. '
                           f'{TIED_EXPLANATION}')
    return info


def _tensor_names(weights: Path) -> List[str]:
    if weights.suffix == '.safetensors':
        safetensors = require('safetensors', 'to read adapter weights')
        try:
            with safetensors.safe_open(str(weights), framework='pt') as stream:
                return list(stream.keys())
        except Exception as error:  # safetensors raises its own error types
            raise AdapterError(f'{weights} cannot be read: {error}') from None
    torch = require_torch()
    try:
        return list(torch.load(weights, map_location='meta', weights_only=True).keys())
    except Exception as error:  # pickle/zip errors of a damaged file
        raise AdapterError(f'{weights} cannot be read: {error}') from None


def tied_module_problems(config: dict, weight_keys: Iterable[str] = ()) -> List[str]:
    """Why an adapter touches lm_head/embed_tokens (empty when it does not).

    Looks at ``target_modules`` (a list of names or a regex), ``modules_to_save`` and the
    tensor names in the weights.
    """
    problems = []
    targets = config.get('target_modules')
    if isinstance(targets, str):
        hits = [name for name in _PROBE_TIED_NAMES if _regex_matches(targets, name)]
        if hits:
            problems.append(f'its target_modules pattern {targets!r} selects {hits[0]}')
    elif isinstance(targets, (list, tuple)):
        hits = [name for name in targets if str(name).split('.')[-1] in TIED_MODULES]
        if hits:
            problems.append(f'its target_modules include {", ".join(map(str, hits))}')
    saved = config.get('modules_to_save') or []
    hits = [name for name in saved if str(name).split('.')[-1] in TIED_MODULES]
    if hits:
        problems.append(f'its modules_to_save include {", ".join(map(str, hits))}')
    touched = sorted({part for key in weight_keys for part in key.split('.')
                      if part in TIED_MODULES})
    if touched:
        problems.append(f'its weights hold tensors for {", ".join(touched)}')
    return problems


def _regex_matches(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


# --------------------------------------------------------------------------------------------
# Applying adapters


def check_no_tied_lora(peft_model) -> None:
    """Raise :class:`AdapterError` if LoRA layers were injected into lm_head/embed_tokens."""
    peft = require('peft', 'to apply LoRA adapters')
    touched = [name for name, module in peft_model.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)
               and name.split('.')[-1] in TIED_MODULES]
    if touched:
        raise AdapterError(f'the adapter puts LoRA layers on {", ".join(touched)}: '
                           f'{TIED_EXPLANATION}')


def apply_adapter(base_model, adapter: AdapterInfo):
    """Wrap ``base_model`` in a PeftModel with the adapter's weights loaded, strictly.

    Unlike ``PeftModel.from_pretrained`` (which only warns), an adapter whose tensors do not
    all land in the model, or that leaves LoRA weights of the model unset, is refused: it was
    trained for another architecture or saved incompletely.
    """
    peft = require('peft', 'to apply LoRA adapters')
    config = peft.PeftConfig.from_pretrained(str(adapter.path))
    config.inference_mode = True
    try:
        with warnings.catch_warnings():
            # The adapter names the base it was trained on (a hub id, another path); the
            # tools report it themselves.
            warnings.filterwarnings('ignore', message=".*base_model_name_or_path. was renamed")
            model = peft.get_peft_model(base_model, config)
    except ValueError as error:
        raise AdapterError(f'adapter {adapter.path} does not fit the base model: {error}') \
            from None
    check_no_tied_lora(model)
    key_mapping = getattr(base_model, '_checkpoint_conversion_mapping', None) or None
    try:
        result = model.load_adapter(str(adapter.path), adapter_name='default',
                                    key_mapping=key_mapping)
    except RuntimeError as error:  # size mismatches
        raise AdapterError(f'adapter {adapter.path} does not fit the base model: '
                           f'{str(error).splitlines()[0]}') from None
    unexpected = list(result.unexpected_keys)
    missing = [key for key in result.missing_keys if 'lora_' in key]
    if unexpected or missing:
        shown = (unexpected or missing)[:3]
        kind = 'match no layer of the base model' if unexpected else 'are missing from it'
        raise AdapterError(f'{len(unexpected or missing)} adapter tensors {kind} (e.g. '
                           f'{", ".join(shown)}): was it trained for another model?')
    return model.eval()
