#!/usr/bin/env python3
"""LoRA fine-tuning of Qwen3-VL on a detection dataset written by tools/prepare_data.py.

Defaults follow the article's LLaMA-Factory run: QLoRA (NF4 base) in bf16 on CUDA, learning
rate 3e-5, 3 epochs, batch 2 x gradient accumulation 2, cosine schedule, cutoff 2048 tokens,
LoRA rank 8 / alpha 16 / dropout 0 on the language model's linear layers (never lm_head or
embed_tokens: Qwen3-VL ties them, peft#2018). Training prompts are built exactly as the node
builds its prompts, at the resolution the node runs the base at (--min-pixels/--max-pixels:
a base fine-tuned by these tools keeps the budget it was trained at).

Writes a PEFT adapter folder: adapter_config.json, adapter_model.safetensors, the base's
tokenizer/processor files (with the training pixel budget), detection_prompt.json and
training_log.json. tools/merge_lora.py merges it into the base.
"""
import argparse
import sys
import warnings
from pathlib import Path

from qwen_vl_perception.model.default_model import (FLOAT32_DEFAULT_HELP, DefaultModelError,
                                                    resolve_model_path)
from qwen_vl_perception.model.loading import COMPUTE_DTYPES, QUANTIZATIONS, ModelLoadError
from qwen_vl_perception.pipeline.lora import AdapterError, TARGET_GROUPS
from qwen_vl_perception.pipeline.lora_training import LoraTrainingConfig, train_lora
from qwen_vl_perception.model.pixel_budget import (NODE_MAX_PIXELS, NODE_MIN_PIXELS,
                                                   model_pixel_budget)
from qwen_vl_perception.model.torch_support import MissingDependencyError
from qwen_vl_perception.data.sft_data import VAL_DATASET_FILE, resolve_dataset_file
from qwen_vl_perception.tool_support import (MODEL_WEIGHT_PATTERNS, ToolError,
                                             prepare_output_dir, run_tool, split_names)

EXAMPLE = """example (the article's run, on one 16 GB+ GPU):
  python tools/finetune.py --base ~/models/Qwen3-VL-4B-Instruct --dataset data/office_sft \\
      --out saves/Qwen3-VL-4B-Instruct/lora/office

  also train the vision tower:      --lora-targets language vision
  a quick smoke run on the CPU:     --device cpu --max-steps 5 --quantization none
  then: python tools/merge_lora.py --base ~/models/Qwen3-VL-4B-Instruct \\
      --adapter saves/Qwen3-VL-4B-Instruct/lora/office --out models/office-merged
"""


def build_parser() -> argparse.ArgumentParser:
    defaults = LoraTrainingConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--base', required=True,
                        help='base Qwen3-VL checkpoint folder, or ' + FLOAT32_DEFAULT_HELP)
    parser.add_argument('--dataset', required=True,
                        help='dataset folder (with dataset.json) or a sharegpt JSON file')
    parser.add_argument('--val-dataset', default=None,
                        help='validation JSON (default: dataset_val.json beside the dataset, '
                             'when present); its loss is reported at the end')
    parser.add_argument('--out', required=True, help='adapter folder to write')
    train = parser.add_argument_group('training')
    train.add_argument('--learning-rate', '--lr', type=float, default=defaults.learning_rate,
                       help='peak learning rate (default %(default)s)')
    train.add_argument('--epochs', type=float, default=defaults.epochs,
                       help='epochs (default %(default)s)')
    train.add_argument('--max-steps', type=int, default=defaults.max_steps,
                       help='optimizer steps; overrides --epochs when positive')
    train.add_argument('--batch-size', type=int, default=defaults.batch_size,
                       help='samples per step per device (default %(default)s)')
    train.add_argument('--grad-accum', type=int, default=defaults.gradient_accumulation,
                       help='gradient accumulation steps (default %(default)s)')
    train.add_argument('--lr-scheduler', default=defaults.lr_scheduler,
                       help='transformers scheduler name (default %(default)s)')
    train.add_argument('--warmup', type=float, default=defaults.warmup,
                       help='warm-up steps (>= 1) or share of all steps (< 1); default 0')
    train.add_argument('--weight-decay', type=float, default=defaults.weight_decay)
    train.add_argument('--max-grad-norm', type=float, default=defaults.max_grad_norm)
    train.add_argument('--cutoff-len', type=int, default=defaults.cutoff_len,
                       help='leave out samples longer than this many tokens (default '
                            '%(default)s)')
    train.add_argument('--seed', type=int, default=defaults.seed,
                       help='seed of LoRA init and data order (default %(default)s)')
    train.add_argument('--logging-steps', type=int, default=defaults.logging_steps)
    train.add_argument('--save-steps', type=int, default=0,
                       help='also save resumable checkpoints every N steps (default: never)')
    lora = parser.add_argument_group('LoRA')
    lora.add_argument('--lora-rank', type=int, default=defaults.lora_rank,
                      help='rank (default %(default)s)')
    lora.add_argument('--lora-alpha', type=float, default=None,
                      help='alpha (default: 2 x rank)')
    lora.add_argument('--lora-dropout', type=float, default=defaults.lora_dropout,
                      help='dropout (default %(default)s)')
    lora.add_argument('--lora-targets', nargs='+', default=list(defaults.lora_targets),
                      metavar='TARGET',
                      help=f'layer groups ({", ".join(TARGET_GROUPS)}, all) or layer names '
                           '(q_proj, attn.qkv, ...); default: language. lm_head and '
                           'embed_tokens are refused')
    runtime = parser.add_argument_group('model and device')
    runtime.add_argument('--device', default='auto',
                         help="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'")
    runtime.add_argument('--quantization', default='auto', choices=QUANTIZATIONS,
                         help='base weights while training: auto = nf4 (QLoRA) on CUDA, none '
                              'on CPU')
    runtime.add_argument('--compute-dtype', default='auto', choices=COMPUTE_DTYPES,
                         help='auto = bfloat16 on CUDA, float32 on CPU')
    runtime.add_argument('--gradient-checkpointing', action=argparse.BooleanOptionalAction,
                         default=None, help='default: on for CUDA, off on CPU')
    runtime.add_argument('--min-pixels', type=int, default=None,
                         help="smallest image area fed to the model (default: the base's, as "
                              'the node runs it: the budget a model fine-tuned by these tools '
                              f'was trained at, else {NODE_MIN_PIXELS})')
    runtime.add_argument('--max-pixels', type=int, default=None,
                         help="largest image area fed to the model (default: the base's, as "
                              f'the node runs it, else {NODE_MAX_PIXELS})')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    parser.add_argument('--overwrite', action='store_true',
                        help='allow writing into a non-empty --out folder')
    return parser


def main(argv=None) -> int:
    return run_tool(run, build_parser().parse_args(argv),
                    expected=(ModelLoadError, AdapterError, MissingDependencyError,
                              DefaultModelError, ValueError, FloatingPointError))


def run(args) -> int:
    args.base = resolve_model_path(args.base, 'none')
    dataset = resolve_dataset_file(args.dataset)
    val_dataset = args.val_dataset
    if val_dataset is None and (dataset.parent / VAL_DATASET_FILE).is_file() \
            and dataset.name != VAL_DATASET_FILE:
        val_dataset = dataset.parent / VAL_DATASET_FILE
    if not Path(args.base).is_dir():
        raise ToolError(f'base model folder {args.base} does not exist')
    min_pixels, max_pixels = model_pixel_budget(args.base, args.min_pixels, args.max_pixels)
    config = LoraTrainingConfig(
        learning_rate=args.learning_rate, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, gradient_accumulation=args.grad_accum,
        lr_scheduler=args.lr_scheduler, warmup=args.warmup, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=tuple(split_names(args.lora_targets)),
        min_pixels=min_pixels, max_pixels=max_pixels, cutoff_len=args.cutoff_len,
        seed=args.seed, device=args.device, quantization=args.quantization,
        compute_dtype=args.compute_dtype, gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps, save_steps=args.save_steps)
    out = prepare_output_dir(args.out, args.overwrite, inputs=[args.base, dataset.parent],
                             stale_patterns=MODEL_WEIGHT_PATTERNS)
    print(f'training images fed at {min_pixels}-{max_pixels} pixels')
    with warnings.catch_warnings():
        # transformers 5 warns about its own deprecated alias while loading Qwen3-VL.
        warnings.filterwarnings('ignore', message='.*is_gradient_checkpointing.*')
        result = train_lora(args.base, dataset, out, config, val_dataset=val_dataset,
                            progress=not args.no_progress)
    for path, reason in result.skipped:
        print(f'skipped {path}: {reason}', file=sys.stderr)
    evaluation = f', validation loss {result.eval_loss:.4f}' if result.eval_loss is not None \
        else ''
    print(f'trained {result.trainable_parameters:,} LoRA parameters for {result.steps} steps on '
          f'{result.samples} samples in {result.seconds:.0f} s: training loss '
          f'{result.train_loss:.4f}{evaluation}')
    print(f'wrote the adapter to {out} (merge it with tools/merge_lora.py)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
