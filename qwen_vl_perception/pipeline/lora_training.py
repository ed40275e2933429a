"""LoRA supervised fine-tuning of Qwen3-VL on a sharegpt detection dataset.

The defaults are the article's LLaMA-Factory run (the article: the blog post the project grew
from, "Qwen3-VL + LoRA SFT + 4-bit quantization", see README.md): LoRA on the language model's
linear layers (rank 8, alpha 16, no dropout), QLoRA (NF4 base) on CUDA, bf16, learning rate
3e-5, 3 epochs, batch 2 x gradient accumulation 2, cosine schedule, cutoff 2048 tokens. Batches
come from :func:`~qwen_vl_perception.pipeline.training.training_batch`, so the model is trained on
exactly the tokens the node sends (chat template, instruction-first order, image resizing);
only the answer and its ``<|im_end|>`` carry a loss.

transformers' ``Trainer`` runs the loop (schedule, accumulation with token-count loss
normalisation, gradient clipping, mixed precision, checkpoints); the multimodal collator is
this module's :class:`SftCollator`. The loss is computed from the hidden states of the
answer positions only (:func:`answer_loss`): the 151,936-way ``lm_head`` is never applied to
the prompt and image tokens, whose logits the loss ignores anyway.
"""
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from ..image_conversion import load_image_file
from ..data.labels import image_size
from ..data.sft_data import SftSample, read_sft_dataset
from ..trained_prompt import copy_prompt_file
from ..model.loading import load_model, model_quantization, resolve_device
from .lora import DEFAULT_TARGETS, check_no_tied_lora, select_target_modules
from ..model.pixel_budget import model_pixel_budget, resized_size, write_pixel_budget
from ..model.processor import InputBuilder
from ..model.checkpoint_files import copy_processor_files
from ..model.torch_support import require, require_torch
from .training import IGNORE_INDEX, training_batch

PathLike = Union[str, Path]

TRAINING_LOG = 'training_log.json'


@dataclass
class LoraTrainingConfig:
    """Hyper-parameters and runtime choices of :func:`train_lora` (article defaults)."""

    learning_rate: float = 3e-5
    epochs: float = 3.0
    max_steps: int = -1
    """Optimizer steps to run; a positive value overrides ``epochs``."""
    batch_size: int = 2
    gradient_accumulation: int = 2
    lr_scheduler: str = 'cosine'
    warmup: float = 0.0
    """Warm-up steps (>= 1) or share of the steps (< 1)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: Optional[float] = None
    """Default: 2 x rank (LLaMA-Factory's default)."""
    lora_dropout: float = 0.0
    lora_targets: Tuple[str, ...] = DEFAULT_TARGETS
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    """Image budget of training. Unset: the base's own, as the node would run it
    (:func:`~.pixel_budget.model_pixel_budget`: a model fine-tuned by the project's tools keeps
    its training budget, any other gets the node's default)."""
    cutoff_len: int = 2048
    """Samples longer than this many tokens are left out (a cut answer teaches broken JSON)."""
    seed: int = 42
    device: str = 'auto'
    quantization: str = 'auto'
    """Base weights: 'auto' (NF4 = QLoRA on CUDA, as the article; none on CPU), 'none',
    'nf4' or 'fp4'."""
    compute_dtype: str = 'auto'
    """'auto': bfloat16 on CUDA (float16 without bf16 support), float32 on CPU."""
    gradient_checkpointing: Optional[bool] = None
    """Default: on for CUDA (as LLaMA-Factory), off on CPU."""
    logging_steps: int = 10
    save_steps: int = 0
    """Save a resumable Trainer checkpoint every N steps under ``checkpoints/`` (0: never)."""

    def resolved_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank


@dataclass
class LoraTrainingResult:
    """What :func:`train_lora` did; also written to ``training_log.json``."""

    adapter_dir: str
    steps: int
    train_loss: float
    last_logged_loss: Optional[float]
    eval_loss: Optional[float]
    samples: int
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    trainable_parameters: int = 0
    target_modules: str = ''
    seconds: float = 0.0
    log_history: List[dict] = field(default_factory=list)


class SftCollator:
    """Turns a list of :class:`SftSample` into one ``training_batch`` (images read here)."""

    def __init__(self, builder: InputBuilder):
        self.builder = builder

    def __call__(self, samples: Sequence[SftSample]) -> dict:
        images = [load_image_file(sample.image_path) for sample in samples]
        return training_batch(self.builder, images, [s.instruction for s in samples],
                              [s.answer for s in samples])


def answer_loss(model, inputs: dict, num_items_in_batch=None):
    """Next-token cross entropy over the positions ``labels`` marks (not ``IGNORE_INDEX``),
    with logits computed for those positions only. Summed and divided by
    ``num_items_in_batch`` when given (the Trainer's count over accumulated micro-batches),
    else averaged."""
    torch = require_torch()
    inputs = dict(inputs)
    labels = inputs.pop('labels')
    network = model.get_base_model() if hasattr(model, 'get_base_model') else model
    hidden = network.model(**inputs).last_hidden_state
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = network.lm_head(hidden[:, :-1][mask]).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[mask], reduction='sum')
    if num_items_in_batch is None:
        return loss / mask.sum().clamp(min=1)
    return loss / num_items_in_batch


def _answer_loss_trainer(transformers):
    class AnswerLossTrainer(transformers.Trainer):
        """``Trainer`` whose loss is :func:`answer_loss`, normalised by the answer tokens of
        all accumulated micro-batches (the Trainer counts them and passes the count only when
        it believes the loss accepts it; Qwen3-VL's model class says it does not)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = answer_loss(model, inputs, num_items_in_batch)
            return (loss, {}) if return_outputs else loss

    return AnswerLossTrainer


def sample_length(builder: InputBuilder, sample: SftSample) -> int:
    """Tokens of a sample as :func:`training_batch` builds it, computed from the image size
    (file header) without decoding pixels."""
    width, height = image_size(sample.image_path)
    factor = builder.patch_size * builder.merge_size
    resized_w, resized_h = resized_size(width, height, builder.min_pixels, builder.max_pixels,
                                        factor)
    visual = (resized_h // factor) * (resized_w // factor)
    prompt_ids, _ = builder.prompt_ids(sample.instruction)
    answer = builder.tokenizer(sample.answer, add_special_tokens=False)['input_ids']
    return len(prompt_ids) - 1 + visual + len(answer) + 1


def filter_samples(builder: InputBuilder, samples: Sequence[SftSample], cutoff_len: int,
                   progress: Callable = iter) -> Tuple[List[SftSample], List[Tuple[str, str]]]:
    """Samples whose image reads and whose length fits ``cutoff_len``; the rest with reasons."""
    kept, skipped = [], []
    for sample in progress(list(samples)):
        try:
            length = sample_length(builder, sample)
        except ValueError as error:
            skipped.append((sample.image_path, str(error)))
            continue
        if length > cutoff_len:
            skipped.append((sample.image_path,
                            f'{length} tokens, longer than the cutoff of {cutoff_len}'))
            continue
        kept.append(sample)
    return kept, skipped


def _load_samples(dataset) -> List[SftSample]:
    if dataset is None:
        return []
    if isinstance(dataset, (str, Path)):
        return read_sft_dataset(dataset)
    return list(dataset)


def train_lora(base: PathLike, dataset, out_dir: PathLike,
               config: Optional[LoraTrainingConfig] = None, val_dataset=None,
               progress: bool = True) -> LoraTrainingResult:
    """Fine-tune a LoRA adapter on ``base`` and save it into ``out_dir`` (which must exist).

    ``dataset``/``val_dataset``: a sharegpt file, a folder holding ``dataset.json``
    (``tools/prepare_data.py``'s output), or a list of :class:`SftSample`. Writes PEFT's
    ``adapter_config.json`` and ``adapter_model.safetensors``, the base's tokenizer and
    processor files (with the training pixel budget), the dataset's ``detection_prompt.json``
    and ``training_log.json``. Raises ``ValueError`` for unusable data and
    :class:`~qwen_vl_perception.model.loading.ModelLoadError` for an unusable base.
    """
    config = config or LoraTrainingConfig()
    _check_config(config)
    low, high = model_pixel_budget(base, config.min_pixels, config.max_pixels)
    config = replace(config, min_pixels=low, max_pixels=high)
    torch = require_torch()
    transformers = require('transformers', 'to fine-tune Qwen3-VL')
    peft = require('peft', 'to train LoRA adapters')
    out_dir = Path(out_dir)
    started = time.perf_counter()

    builder = InputBuilder.from_pretrained(base, min_pixels=config.min_pixels,
                                           max_pixels=config.max_pixels)
    bar = _progress_wrapper(progress, 'checking samples')
    train, skipped = filter_samples(builder, _load_samples(dataset), config.cutoff_len, bar)
    val, val_skipped = filter_samples(builder, _load_samples(val_dataset), config.cutoff_len)
    if not train:
        raise ValueError('no usable training sample'
                         + (f' ({len(skipped)} skipped, e.g. {skipped[0][1]})' if skipped else ''))

    device = resolve_device(config.device)
    if device.startswith('cuda') and ':' in device:
        torch.cuda.set_device(int(device.split(':')[1]))
    transformers.set_seed(config.seed)
    model = load_model(base, device=device, quantization=config.quantization,
                       compute_dtype=config.compute_dtype)
    target_regex, _ = select_target_modules(model, config.lora_targets)
    lora_config = peft.LoraConfig(
        r=config.lora_rank, lora_alpha=config.resolved_alpha(), lora_dropout=config.lora_dropout,
        target_modules=target_regex, bias='none', task_type='CAUSAL_LM')
    model = peft.get_peft_model(model, lora_config)
    check_no_tied_lora(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    gradient_checkpointing = config.gradient_checkpointing
    if gradient_checkpointing is None:
        gradient_checkpointing = device != 'cpu'
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    args = transformers.TrainingArguments(
        output_dir=str(out_dir / 'checkpoints'),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate, num_train_epochs=config.epochs,
        max_steps=config.max_steps, lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy='steps' if config.save_steps > 0 else 'no',
        save_steps=config.save_steps if config.save_steps > 0 else 500,
        report_to='none', remove_unused_columns=False, seed=config.seed,
        data_seed=config.seed, use_cpu=device == 'cpu', disable_tqdm=not progress,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        dataloader_pin_memory=device != 'cpu', optim='adamw_torch',
        **_checkpointing_arguments(transformers, gradient_checkpointing))
    trainer_class = _answer_loss_trainer(transformers)
    trainer = trainer_class(model=model, args=args, train_dataset=train,
                            eval_dataset=val or None, data_collator=SftCollator(builder))
    output = trainer.train()
    eval_loss = None
    if val:
        eval_loss = float(trainer.evaluate()['eval_loss'])
    train_loss = float(output.training_loss)
    if not math.isfinite(train_loss):
        raise FloatingPointError(f'training diverged: loss {train_loss}; lower the learning '
                                 'rate')

    model.save_pretrained(str(out_dir))
    checkpoints = out_dir / 'checkpoints'
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    copy_processor_files(base, out_dir)
    write_pixel_budget(out_dir, config.min_pixels, config.max_pixels)
    if isinstance(dataset, (str, Path)):
        source = Path(dataset)
        copy_prompt_file(source if source.is_dir() else source.parent, out_dir)
    history = list(trainer.state.log_history)
    losses = [entry['loss'] for entry in history if 'loss' in entry]
    result = LoraTrainingResult(
        adapter_dir=str(out_dir), steps=int(trainer.state.global_step), train_loss=train_loss,
        last_logged_loss=float(losses[-1]) if losses else None, eval_loss=eval_loss,
        samples=len(train), skipped=skipped + val_skipped, trainable_parameters=int(trainable),
        target_modules=target_regex, seconds=time.perf_counter() - started,
        log_history=history)
    _write_log(out_dir / TRAINING_LOG, base, config, result, device,
               model_quantization(model.get_base_model()), len(val))
    return result


def _check_config(config: LoraTrainingConfig) -> None:
    checks = (
        (config.learning_rate > 0, 'learning_rate must be positive'),
        (config.epochs > 0 or config.max_steps > 0, 'epochs or max_steps must be positive'),
        (config.batch_size >= 1, 'batch_size must be at least 1'),
        (config.gradient_accumulation >= 1, 'gradient_accumulation must be at least 1'),
        (config.lora_rank >= 1, 'lora_rank must be at least 1'),
        (config.resolved_alpha() > 0, 'lora_alpha must be positive'),
        (0.0 <= config.lora_dropout < 1.0, 'lora_dropout must be in [0, 1)'),
        (config.cutoff_len >= 1, 'cutoff_len must be at least 1'),
        (config.warmup >= 0, 'warmup must not be negative'),
        (config.logging_steps >= 1, 'logging_steps must be at least 1'),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _checkpointing_arguments(transformers, enabled: bool) -> dict:
    """TrainingArguments for activation checkpointing under their current name
    (``activation_checkpointing`` since transformers 5.2x, ``gradient_checkpointing``
    before)."""
    names = {item.name for item in fields(transformers.TrainingArguments)}
    prefix = 'activation' if 'activation_checkpointing' in names else 'gradient'
    return {f'{prefix}_checkpointing': enabled,
            f'{prefix}_checkpointing_kwargs': {'use_reentrant': False} if enabled else None}


def _progress_wrapper(progress: bool, description: str) -> Callable:
    if not progress:
        return iter
    from tqdm import tqdm
    return lambda items: tqdm(items, desc=description, unit='sample')


def _write_log(path: Path, base, config: LoraTrainingConfig, result: LoraTrainingResult,
               device: str, quantization: str, val_samples: int) -> None:
    log = {
        'base': str(base),
        'device': device,
        'base_quantization': quantization,
        'config': asdict(config),
        'lora_alpha': config.resolved_alpha(),
        'val_samples': val_samples,
        'result': asdict(result),
    }
    path.write_text(json.dumps(log, indent=2, default=str) + '\n')
