"""Train a tiny Qwen3-VL from random initialisation on synthetic scenes (all parameters).

This makes the base of the project's default model (``tools/make_default_model.py``): no real
Qwen3-VL weights can be downloaded here, so the project grows its own small one, which the
LoRA trainer then fine-tunes like any base. Three things make that fit in CPU minutes:

* **Exact full-vocabulary loss on a few rows.** The tokenizer stays the real 151,936-token
  Qwen3 one, but every embedding row of a token that never occurs in the prompt or in any
  answer is zero and stays zero. With the tied ``lm_head`` those tokens' logits are exactly 0,
  so the full cross entropy is ``logsumexp([z_used..., log(V - K)]) - z_target`` over the
  K (~100) used rows. Training holds only those rows (:class:`CompactEmbedding`); the export
  scatters them into a zero ``V x H`` matrix, so the result is a normal Qwen3-VL checkpoint.
* **A 2D sin/cos initialisation of the vision tower's learned position embedding.** Position
  reaches the visual tokens' *values* only through ``pos_embed`` (rotary embeddings change
  attention weights, not values); at its default ``N(0, 0.02)`` it is too weak for boxes to
  follow the image within minutes.
* **Dense auxiliary supervision** of every merged visual token (its object's category,
  colour and box), by small heads that are dropped at export.

Targets are the node's answer format (:func:`~qwen_vl_perception.prompt.format_answer`) with
objects in reading order and grid boxes rounded to multiples of ``box_step``.
"""
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..detection import ParsedObject
from ..geometry import to_grid
from ..data.labels import GroundTruthObject
from ..prompt import PromptBuilder, format_answer
from ..data.scenes import CATEGORIES, COLORS, DEFAULT_SIZES, Scene, render_scene
from ..trained_prompt import write_prompt_file
from ..model.configs import (ENDOFTEXT_TOKEN_ID, IM_END_TOKEN_ID, IM_START_TOKEN_ID,
                             IMAGE_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID,
                             tiny_config)
from ..model.pixel_budget import write_pixel_budget
from ..model.processor import InputBuilder
from ..model.checkpoint_files import GENERATION_CONFIG, write_input_files
from ..model.torch_support import require, require_torch
from .training import IGNORE_INDEX, collate_examples, training_example

PathLike = Union[str, Path]

ATTRIBUTES = ('color',)
"""Attributes the scene models are asked for (the scenes' colour names)."""

SCRATCH_LOG = 'scratch_training.json'


@dataclass
class ScratchTrainingConfig:
    """Architecture, data and optimisation of :func:`train_from_scratch`."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_depth: int = 2
    learning_rate: float = 3e-3
    warmup: int = 50
    steps: int = 5000
    batch_size: int = 8
    time_limit: float = 0.0
    """Seconds of training (0: none). The cosine schedule ends at whichever of ``steps`` and
    ``time_limit`` comes first, so a slow machine still gets a whole schedule."""
    scenes: int = 5000
    """Distinct training scenes, rendered and encoded once, then sampled with replacement."""
    min_objects: int = 1
    max_objects: int = 4
    sizes: Tuple[Tuple[int, int], ...] = DEFAULT_SIZES
    min_pixels: int = 1024
    max_pixels: int = 36864
    """Image pixel budget (36864: at most 36 visual tokens); written into the checkpoint."""
    box_step: int = 25
    """Round target grid boxes to multiples of this (1: exact)."""
    aux_weight: float = 2.0
    position_init_scale: float = 1.0
    """Amplitude of the sin/cos init of the vision position embedding (0: random init)."""
    seed: int = 0
    device: str = 'cpu'
    threads: int = 0
    """torch CPU threads (0: leave torch's default)."""
    log_every: int = 100


def scratch_model_config(config: ScratchTrainingConfig) -> dict:
    """The Qwen3-VL config dict (``Qwen3VLConfig(**cfg)``) of a scratch model."""
    cfg = tiny_config()
    text, vision = cfg['text_config'], cfg['vision_config']
    if config.hidden % config.heads or config.heads % config.kv_heads:
        raise ValueError('hidden must divide by heads, and heads by kv_heads')
    head_dim = config.hidden // config.heads
    half = head_dim // 2
    third = half // 3
    text.update(hidden_size=config.hidden, intermediate_size=2 * config.hidden,
                num_hidden_layers=config.layers, num_attention_heads=config.heads,
                num_key_value_heads=config.kv_heads, head_dim=head_dim)
    text['rope_scaling'] = {'rope_type': 'default',
                            'mrope_section': [half - 2 * third, third, third],
                            'mrope_interleaved': True}
    vision.update(depth=config.vision_depth, hidden_size=config.hidden,
                  intermediate_size=2 * config.hidden, num_heads=4,
                  out_hidden_size=config.hidden,
                  deepstack_visual_indexes=[config.vision_depth - 1])
    return cfg


def scene_prompt() -> PromptBuilder:
    """The prompt scene models are trained and asked with."""
    return PromptBuilder(CATEGORIES, describe=True, attributes=ATTRIBUTES)


def scene_answer(objects: Sequence[GroundTruthObject], width: int, height: int,
                 box_step: int = 25) -> str:
    """The answer text to learn for a scene's objects: in reading order (top to bottom, then
    left to right), grid boxes rounded to multiples of ``box_step``, colour attribute."""
    objects = sorted(objects, key=lambda o: (round(o.box[1]), round(o.box[0])))
    parsed = []
    for obj in objects:
        box = [int(v) for v in to_grid(obj.box, (width, height))]
        if box_step > 1:
            box = [min(1000, max(0, int(round(v / box_step)) * box_step)) for v in box]
            box[2] = max(box[2], min(1000, box[0] + box_step))
            box[3] = max(box[3], min(1000, box[1] + box_step))
        parsed.append(ParsedObject(label=obj.label, box=tuple(box),
                                   attributes={'color': obj.attributes['color']}))
    return format_answer(parsed, ATTRIBUTES)


def make_scene(config: ScratchTrainingConfig, seed: int, index: int) -> Scene:
    """Scene ``index`` of the stream seeded by ``seed`` (same as ``write_dataset``'s)."""
    rng = np.random.default_rng([seed, index])
    width, height = config.sizes[int(rng.integers(len(config.sizes)))]
    return render_scene(rng, int(width), int(height), config.min_objects, config.max_objects)


def used_token_ids(builder: InputBuilder, prompt: PromptBuilder) -> List[int]:
    """Every token id the prompt or any scene answer can contain, plus the chat specials."""
    tokenizer = builder.tokenizer
    ids = set(builder.prompt_ids(prompt.instruction)[0])
    every_object = [ParsedObject(label=label, box=(0, 10, 999, 1000),
                                 attributes={'color': color})
                    for label in CATEGORIES for color in COLORS]
    text = format_answer(every_object, ATTRIBUTES) + format_answer([], ATTRIBUTES)
    text += ' 0123456789 ' + ''.join(f'[{value}, ' for value in range(1001))
    ids |= set(tokenizer(text, add_special_tokens=False)['input_ids'])
    ids |= {IM_END_TOKEN_ID, ENDOFTEXT_TOKEN_ID, IMAGE_TOKEN_ID, VISION_START_TOKEN_ID,
            VISION_END_TOKEN_ID, IM_START_TOKEN_ID}
    ids |= set(tokenizer('\n', add_special_tokens=False)['input_ids'])
    return sorted(ids)


def sincos_position_table(torch, positions: int, dim: int, scale: float):
    """A ``positions x dim`` table of 2D features of a square grid (x/y ramps, then sin/cos
    pairs at rising frequencies), times ``scale``; zero-padded to ``dim``."""
    side = int(round(positions ** 0.5))
    steps = torch.linspace(0, 1, side)
    rows, cols = torch.meshgrid(steps, steps, indexing='ij')
    features = [cols * 2 - 1, rows * 2 - 1]
    for k in range((dim - 2) // 4):
        frequency = math.pi * (0.5 + k * 0.5)
        features += [torch.sin(frequency * cols), torch.cos(frequency * cols),
                     torch.sin(frequency * rows), torch.cos(frequency * rows)]
    table = torch.stack(features, -1).reshape(side * side, -1)
    out = torch.zeros(positions, dim)
    out[:side * side, :table.shape[1]] = table[:, :dim]
    return out * scale


def training_modules(torch):
    """The compact embedding and the auxiliary heads used only while training (classes)."""
    nn = torch.nn

    class CompactEmbedding(nn.Module):
        """The used rows of a ``vocab x hidden`` embedding; all other rows are zero."""

        def __init__(self, used_ids: Sequence[int], vocab: int, hidden: int):
            super().__init__()
            remap = torch.zeros(vocab, dtype=torch.long)
            remap[torch.tensor(list(used_ids))] = torch.arange(len(used_ids))
            self.register_buffer('remap', remap, persistent=False)
            self.register_buffer('used', torch.tensor(list(used_ids)), persistent=False)
            self.weight = nn.Parameter(torch.randn(len(used_ids), hidden) * 0.02)

        def forward(self, ids):
            return nn.functional.embedding(self.remap[ids], self.weight)

    class AuxHeads(nn.Module):
        """Per-visual-token category, colour and box heads (training only)."""

        def __init__(self, hidden: int):
            super().__init__()
            self.category = nn.Linear(hidden, 1 + len(CATEGORIES))
            self.color = nn.Linear(hidden, 1 + len(COLORS))
            self.box = nn.Linear(hidden, 4)

        def loss(self, features, targets):
            category = torch.cat([t[0] for t in targets]).to(features.device)
            color = torch.cat([t[1] for t in targets]).to(features.device)
            box = torch.cat([t[2] for t in targets]).to(features.device)
            functional = nn.functional
            loss = (functional.cross_entropy(self.category(features), category)
                    + functional.cross_entropy(self.color(features), color))
            foreground = category > 0
            if foreground.any():
                predicted = torch.sigmoid(self.box(features[foreground]))
                loss = loss + 5 * functional.l1_loss(predicted, box[foreground])
            return loss

    return CompactEmbedding, AuxHeads


def exact_loss(torch, hidden, labels, embedding, unused_count: int):
    """Mean full-vocabulary next-token cross entropy of a model whose unused embedding rows
    are zero (tied head), computed over the used rows only."""
    states = hidden[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = states[mask] @ embedding.weight.t()
    rest = torch.full((logits.shape[0], 1), math.log(unused_count), dtype=logits.dtype,
                      device=logits.device)
    normaliser = torch.logsumexp(torch.cat([logits, rest], 1), 1)
    target_rows = embedding.remap[targets[mask]]
    return (normaliser - logits.gather(1, target_rows[:, None])[:, 0]).mean()


def token_targets(torch, scene: Scene, grid_thw: Sequence[int], merge: int = 2):
    """Per merged visual token: category (0 = background), colour and normalised box of the
    object covering most of it (more than a quarter)."""
    import cv2
    _, grid_h, grid_w = (int(v) for v in grid_thw)
    grid_h, grid_w = grid_h // merge, grid_w // merge
    height, width = scene.image.shape[:2]
    count = grid_h * grid_w
    category = torch.zeros(count, dtype=torch.long)
    color = torch.zeros(count, dtype=torch.long)
    box = torch.zeros(count, 4)
    if scene.objects:
        coverage = np.stack([cv2.resize(mask.astype(np.float32), (grid_w, grid_h),
                                        interpolation=cv2.INTER_AREA)
                             for mask in scene.masks]).reshape(len(scene.masks), -1)
        best = coverage.argmax(0)
        for token in np.nonzero(coverage.max(0) > 0.25)[0]:
            obj = scene.objects[best[token]]
            category[token] = 1 + CATEGORIES.index(obj.label)
            color[token] = 1 + list(COLORS).index(obj.attributes['color'])
            x1, y1, x2, y2 = obj.box
            box[token] = torch.tensor([x1 / width, y1 / height, x2 / width, y2 / height])
    return category, color, box


def _learning_rate(config: ScratchTrainingConfig, step: int, elapsed: float) -> float:
    """Linear warm-up, then cosine down to 5% over whichever ends first: steps or time."""
    if step < config.warmup:
        return config.learning_rate * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    if config.time_limit > 0:
        progress = max(progress, elapsed / config.time_limit)
    return config.learning_rate * (0.05 + 0.475 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_from_scratch(out_dir: PathLike, config: Optional[ScratchTrainingConfig] = None,
                       log: Callable[[str], None] = print) -> dict:
    """Train a scratch model and save it to ``out_dir`` as a plain float32 Qwen3-VL checkpoint
    (weights, tokenizer, processor files with the training pixel budget, and the prompt it
    was trained with in ``detection_prompt.json``). Returns the run's figures, also written
    to ``out_dir/scratch_training.json``.
    """
    config = config or ScratchTrainingConfig()
    torch = require_torch()
    transformers = require('transformers', 'to train a Qwen3-VL')
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    write_input_files(out_dir)
    write_pixel_budget(out_dir, config.min_pixels, config.max_pixels)
    builder = InputBuilder.from_pretrained(out_dir, config.min_pixels, config.max_pixels,
                                           image_backend='pil')
    prompt = scene_prompt()
    used = used_token_ids(builder, prompt)
    model_config = scratch_model_config(config)
    vocab = model_config['text_config']['vocab_size']
    model = transformers.Qwen3VLForConditionalGeneration(
        transformers.Qwen3VLConfig(**model_config))
    CompactEmbedding, AuxHeads = training_modules(torch)
    embedding = CompactEmbedding(used, vocab, config.hidden)
    model.model.language_model.embed_tokens = embedding
    model.lm_head = torch.nn.Identity()
    if config.position_init_scale:
        weight = model.model.visual.pos_embed.weight
        weight.data.copy_(sincos_position_table(torch, weight.shape[0], weight.shape[1],
                                                config.position_init_scale))
    heads = AuxHeads(config.hidden)
    model.to(config.device).train()
    heads.to(config.device)

    samples = []
    for index in range(config.scenes):
        scene = make_scene(config, config.seed, index)
        sample = training_example(builder, scene.image, prompt.instruction,
                                  scene_answer(scene.objects, scene.image.shape[1],
                                               scene.image.shape[0], config.box_step))
        sample['aux'] = token_targets(torch, scene, sample['image_grid_thw'][0].tolist())
        samples.append(sample)
    data_seconds = time.perf_counter() - started
    log(f'{len(samples)} training scenes encoded in {data_seconds:.0f} s')

    captured = {}
    model.model.visual.merger.register_forward_hook(
        lambda module, inputs, output: captured.__setitem__('visual', output))
    parameters = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0,
                                  betas=(0.9, 0.98))
    order = np.random.default_rng(config.seed + 1)
    unused_count = vocab - len(used)
    train_started = time.perf_counter()
    smoothed = None
    step = 0
    for step in range(config.steps):
        elapsed = time.perf_counter() - train_started
        for group in optimizer.param_groups:
            group['lr'] = _learning_rate(config, step, elapsed)
        chosen = [samples[i] for i in order.integers(0, len(samples), config.batch_size)]
        batch = {key: value.to(config.device) for key, value in
                 collate_examples(chosen, builder.pad_token_id).items()}
        labels = batch.pop('labels')
        hidden = model.model(**batch).last_hidden_state
        loss = exact_loss(torch, hidden, labels, embedding, unused_count)
        total = loss
        if config.aux_weight:
            total = loss + config.aux_weight * heads.loss(captured['visual'],
                                                          [s['aux'] for s in chosen])
        total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.item())
        if not math.isfinite(value):
            raise FloatingPointError(f'training diverged at step {step}: loss {value}')
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if step % config.log_every == 0:
            log(f'step {step} loss {value:.4f} (smoothed {smoothed:.4f}) '
                f'{time.perf_counter() - train_started:.0f} s')
        if config.time_limit > 0 and time.perf_counter() - train_started >= config.time_limit:
            break
    train_seconds = time.perf_counter() - train_started

    model.eval()
    _export(torch, transformers, model, embedding, model_config, out_dir)
    write_prompt_file(out_dir, prompt)
    result = {
        'steps': step + 1,
        'final_loss_smoothed': smoothed,
        'data_seconds': round(data_seconds, 1),
        'train_seconds': round(train_seconds, 1),
        'total_seconds': round(time.perf_counter() - started, 1),
        'used_tokens': len(used),
        'trained_parameters': sum(p.numel() for p in model.parameters()),
        'config': asdict(config),
    }
    (out_dir / SCRATCH_LOG).write_text(json.dumps(result, indent=2) + '\n')
    return result


def _export(torch, transformers, model, embedding, model_config: dict, out_dir: Path) -> None:
    """Save ``model`` as a normal Qwen3-VL: compact rows scattered into a zero embedding."""
    full = transformers.Qwen3VLForConditionalGeneration(
        transformers.Qwen3VLConfig(**model_config))
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()
             if 'embed_tokens' not in key and 'lm_head' not in key}
    missing, unexpected = full.load_state_dict(state, strict=False)
    if unexpected or any('embed_tokens' not in k and 'lm_head' not in k for k in missing):
        raise RuntimeError(f'export mismatch: missing {missing}, unexpected {unexpected}')
    weight = torch.zeros(model_config['text_config']['vocab_size'], embedding.weight.shape[1])
    weight[embedding.used.cpu()] = embedding.weight.detach().float().cpu()
    full.model.language_model.embed_tokens.weight.data.copy_(weight)
    full.tie_weights()
    full.generation_config = transformers.GenerationConfig(**GENERATION_CONFIG)
    full.eval().save_pretrained(out_dir)
