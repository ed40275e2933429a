#!/usr/bin/env python3
"""Make the project's default model with the project's own pipeline, and pack it.

1. Train a tiny Qwen3-VL from random initialisation on synthetic scenes (all parameters;
   qwen_vl_perception/pipeline/scratch_training.py): the base.
2. Fine-tune it with the LoRA trainer (tools/finetune.py's train_lora) on other scenes.
3. Merge the adapter (tools/merge_lora.py's merge_lora) into a float32 checkpoint.
4. Evaluate base and merged model on held-out scenes through the node's Engine + Detector
   path; quantize the merged model to NF4 (tools/quantize.py's quantize_checkpoint) and
   evaluate that, with its agreement with the bf16 model.
5. Pack the merged checkpoint into --artifact (default: the package's default_model/ folder,
   a few MB), then evaluate the packed model as the node gets it ("shipped": unpacked and
   quantized by ensure_default_model). Every figure goes into its manifest.json. The node's
   `model_path: default` and tools/demo.py unpack and quantize it on first use.

The default model knows only the synthetic categories (ball, box, cone, ring) and colours.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from qwen_vl_perception.library_logs import quiet_library_logs
from qwen_vl_perception.model.default_model import PACKED_DIR, pack_checkpoint, update_manifest
from qwen_vl_perception.pipeline.scene_evaluation import detection_agreement, evaluate_on_scenes
from qwen_vl_perception.pipeline.scratch_training import (ScratchTrainingConfig, scene_answer,
                                                          scene_prompt, train_from_scratch)
from qwen_vl_perception.tool_support import ToolError, run_tool

EXAMPLE = """example:
  python tools/make_default_model.py                     # the committed recipe, CPU
  python tools/make_default_model.py --device cuda       # same recipe on a GPU
  python tools/make_default_model.py --steps 50 --lora-steps 5 --artifact /tmp/try  # smoke
"""
RECIPE = ScratchTrainingConfig(layers=4, batch_size=16, steps=4000, scenes=8000,
                               min_objects=1, max_objects=4)
"""The default model's scratch-training settings (see the module's docstring)."""
HELD_OUT_SEED = 10_000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work', default='build/default_model',
                        help='working folder for base, adapter, merged and NF4 checkpoints '
                             '(default build/default_model)')
    parser.add_argument('--artifact', default=str(PACKED_DIR),
                        help='where to write the packed model (default: the package folder)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda (default cpu)')
    parser.add_argument('--steps', type=int, default=RECIPE.steps,
                        help=f'scratch-training steps (default {RECIPE.steps})')
    parser.add_argument('--time-limit', type=float, default=0.0,
                        help='stop scratch training after this many seconds, with the '
                             'learning-rate schedule fitted to it (default 0: no limit)')
    parser.add_argument('--scenes', type=int, default=RECIPE.scenes,
                        help=f'distinct training scenes (default {RECIPE.scenes})')
    parser.add_argument('--lora-steps', type=int, default=200,
                        help='LoRA fine-tuning steps (default 200)')
    parser.add_argument('--lora-scenes', type=int, default=800,
                        help='scenes written for the LoRA fine-tune (default 800)')
    parser.add_argument('--eval-scenes', type=int, default=80,
                        help='held-out scenes to evaluate on (default 80)')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads (default 2)')
    parser.add_argument('--evaluate-only', action='store_true',
                        help='train nothing: re-evaluate the packed model in --artifact as the '
                             'node runs it and store the figures in its manifest')
    return parser


def main(argv=None) -> int:
    return run_tool(run, build_parser().parse_args(argv))


def run(args) -> int:
    quiet_library_logs()
    import torch
    from qwen_vl_perception.pipeline.lora_training import LoraTrainingConfig, train_lora
    from qwen_vl_perception.pipeline.merging import merge_lora
    from qwen_vl_perception.pipeline.quantization import quantize_checkpoint
    from qwen_vl_perception.data.scenes import write_dataset
    from qwen_vl_perception.data.sft_data import SftSample
    from qwen_vl_perception.trained_prompt import write_prompt_file
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ToolError('--device cuda asked for, but torch sees no CUDA device')
    torch.set_num_threads(args.threads)
    if args.evaluate_only:
        return evaluate_only(args)
    work = Path(args.work)
    if work.exists() and any(work.iterdir()):
        raise ToolError(f'{work} is not empty; remove it or pass another --work')
    started = time.perf_counter()
    figures = {'device': args.device, 'torch_threads': args.threads}

    config = ScratchTrainingConfig(**{**RECIPE.__dict__, 'steps': args.steps,
                                      'scenes': args.scenes, 'device': args.device,
                                      'time_limit': args.time_limit,
                                      'threads': args.threads, 'log_every': 250})
    print(f'[1/5] scratch training ({config.steps} steps x {config.batch_size})', flush=True)
    scratch = train_from_scratch(work / 'base', config)
    figures['scratch'] = {k: v for k, v in scratch.items() if k != 'config'}

    print('[2/5] LoRA fine-tune on new scenes', flush=True)
    prompt = scene_prompt()
    images = write_dataset(work / 'lora_scenes', args.lora_scenes, seed=1,
                           sizes=config.sizes, min_objects=config.min_objects,
                           max_objects=config.max_objects)
    samples = [SftSample(image.image_path, prompt.instruction,
                         scene_answer(image.objects, image.width, image.height,
                                      config.box_step)) for image in images]
    (work / 'adapter').mkdir()
    lora_config = LoraTrainingConfig(
        learning_rate=3e-4, max_steps=args.lora_steps, batch_size=8, gradient_accumulation=1,
        warmup=0.1, lora_rank=16, min_pixels=config.min_pixels, max_pixels=config.max_pixels,
        device=args.device, quantization='none', compute_dtype='float32', logging_steps=25,
        seed=config.seed)
    lora = train_lora(work / 'base', samples, work / 'adapter', lora_config, progress=False)
    write_prompt_file(work / 'adapter', prompt)
    figures['lora'] = {'steps': lora.steps, 'train_loss': lora.train_loss,
                       'seconds': round(lora.seconds, 1), 'samples': lora.samples,
                       'rank': lora_config.lora_rank,
                       'trainable_parameters': lora.trainable_parameters}

    print('[3/5] merge', flush=True)
    (work / 'merged').mkdir()
    merge_lora(work / 'base', work / 'adapter', work / 'merged', dtype='float32',
               device=args.device, log=lambda message: None)
    figures['recipe_seconds'] = round(time.perf_counter() - started, 1)

    print('[4/5] evaluate and quantize', flush=True)
    evaluation = dict(count=args.eval_scenes, seed=HELD_OUT_SEED,
                      min_objects=config.min_objects, max_objects=config.max_objects,
                      sizes=config.sizes, device=args.device)
    figures['base_float32'], _, _ = evaluate_on_scenes(work / 'base', **evaluation)
    figures['merged_float32'], _, _ = evaluate_on_scenes(work / 'merged', **evaluation)
    figures['merged_bfloat16'], bf16_answers, bf16_detected = evaluate_on_scenes(
        work / 'merged', compute_dtype='bfloat16', **evaluation)
    (work / 'nf4').mkdir()
    quantize_checkpoint(work / 'merged', work / 'nf4', quant_type='nf4',
                        compute_dtype='float32', device=args.device,
                        log=lambda message: None)
    figures['nf4'], nf4_answers, nf4_detected = evaluate_on_scenes(
        work / 'nf4', quantization='nf4', **evaluation)
    same = sum(a == b for a, b in zip(bf16_answers, nf4_answers))
    figures['nf4_vs_bfloat16_identical_answers'] = same / max(1, len(nf4_answers))
    figures['nf4_vs_bfloat16_detections'] = detection_agreement(bf16_detected, nf4_detected)

    print('[5/5] pack, then evaluate what the node runs', flush=True)
    figures['recipe'] = {'command': 'python tools/make_default_model.py ' + ' '.join(
        sys.argv[1:]), 'scratch_config': {k: v for k, v in scratch['config'].items()}}
    out = pack_checkpoint(work / 'merged', args.artifact, {'figures': figures})
    figures['shipped'] = evaluate_shipped(out, work / 'cache', evaluation)
    update_manifest(out, {'figures': figures})
    size = sum(f.stat().st_size for f in out.iterdir())
    print(json.dumps({k: v for k, v in figures.items() if k != 'recipe'}, indent=2))
    print(f'packed {size / 1e6:.1f} MB into {out} (total {time.perf_counter() - started:.0f} s)')
    return 0


def evaluate_shipped(artifact: Path, cache: Path, evaluation: dict) -> dict:
    """Figures of the packed model as the node gets it (unpacked from float16, NF4 built by
    ensure_default_model): bf16 and NF4 precision/recall, and how far they agree."""
    from qwen_vl_perception.model.default_model import ensure_default_model
    unpacked = ensure_default_model('none', packed_dir=artifact, cache=cache)
    quantized = ensure_default_model('nf4', packed_dir=artifact, cache=cache)
    shipped = {}
    shipped['bfloat16'], bf16_answers, bf16_detected = evaluate_on_scenes(
        unpacked, compute_dtype='bfloat16', **evaluation)
    shipped['nf4'], nf4_answers, nf4_detected = evaluate_on_scenes(
        quantized, quantization='nf4', **evaluation)
    same = sum(a == b for a, b in zip(bf16_answers, nf4_answers))
    shipped['nf4_vs_bfloat16_identical_answers'] = same / max(1, len(nf4_answers))
    shipped['nf4_vs_bfloat16_detections'] = detection_agreement(bf16_detected, nf4_detected)
    return shipped


def evaluate_only(args) -> int:
    """Re-measure an already packed model (--artifact) and store the figures in it."""
    from qwen_vl_perception.model.default_model import read_manifest
    artifact = Path(args.artifact)
    manifest = read_manifest(artifact)
    config = RECIPE
    evaluation = dict(count=args.eval_scenes, seed=HELD_OUT_SEED,
                      min_objects=config.min_objects, max_objects=config.max_objects,
                      sizes=config.sizes, device=args.device)
    figures = dict(manifest.get('figures') or {})
    figures['shipped'] = evaluate_shipped(artifact, Path(args.work) / 'cache', evaluation)
    update_manifest(artifact, {'figures': figures})
    print(json.dumps(figures['shipped'], indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
