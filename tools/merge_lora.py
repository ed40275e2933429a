#!/usr/bin/env python3
"""Merge a LoRA adapter (PEFT or LLaMA-Factory) into its Qwen3-VL base: full weights.

The result (default bf16) holds the merged weights, the base's tokenizer, processor configs
and chat template, and loads with AutoModelForImageTextToText (and the node). Checked before
anything loads: the base is not quantized (merge into bf16, then run tools/quantize.py), and
the adapter puts no LoRA or modules_to_save on lm_head/embed_tokens (tied in Qwen3-VL:
peft#2018). Checked after saving: on a probe image + instruction, the reloaded merged model's
logits match base+adapter within a tolerance, compared in float32 so that the check tells
merged from base (max |difference| printed; merge_log.json); a check that cannot tell them
apart (an untrained adapter) fails.
"""
import argparse
import sys
import warnings

from qwen_vl_perception.model.default_model import (FLOAT32_DEFAULT_HELP, DefaultModelError,
                                                    resolve_model_path)
from qwen_vl_perception.model.loading import ModelLoadError
from qwen_vl_perception.pipeline.lora import AdapterError, read_adapter
from qwen_vl_perception.pipeline.merging import (MERGE_DTYPES, MERGE_LOG, RELATIVE_TOLERANCE,
                                                 MergeCheckError, MergeError, check_mergeable_base,
                                                 merge_lora)
from qwen_vl_perception.model.torch_support import MissingDependencyError
from qwen_vl_perception.tool_support import (MODEL_WEIGHT_PATTERNS, format_bytes,
                                             prepare_output_dir, run_tool)

EXAMPLE = """example (the article's LLaMA-Factory adapter):
  python tools/merge_lora.py --base ~/models/Qwen3-VL-4B-Instruct \\
      --adapter LLaMA-Factory/saves/Qwen3-VL-4B-Instruct/lora/train_2025-11-11-08-59-06 \\
      --out models/qwen3-vl-4b-merged
  python tools/quantize.py --model models/qwen3-vl-4b-merged --out models/qwen3-vl-4b-nf4

  LLaMA-Factory resized training images to image_max_pixels (default 589824): pass the same
  budget (--max-pixels 589824) so the merged checkpoint is run at its training resolution.
  Adapters from tools/finetune.py carry their budget and need no option.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--base', required=True,
                        help='unquantized base checkpoint the adapter was trained on, or '
                             + FLOAT32_DEFAULT_HELP)
    parser.add_argument('--adapter', required=True,
                        help='adapter folder (adapter_config.json + adapter_model.safetensors)')
    parser.add_argument('--out', required=True, help='folder for the merged checkpoint')
    parser.add_argument('--dtype', default='bfloat16', choices=MERGE_DTYPES,
                        help='dtype of the merged weights (default %(default)s; merging and '
                             'the check run in float32 whatever it is)')
    parser.add_argument('--device', default='auto',
                        help="where to merge and check: 'auto' (CUDA when available), 'cpu', "
                             "'cuda' or 'cuda:N'")
    parser.add_argument('--tolerance', type=float, default=None,
                        help='largest allowed |logit difference| on the probe, compared in '
                             f'float32 (default: {RELATIVE_TOLERANCE:g} x the largest |logit|)')
    parser.add_argument('--probe-image', default=None,
                        help='image for the check (default: a fixed synthetic scene)')
    parser.add_argument('--probe-instruction', default=None,
                        help="instruction for the check (default: the adapter's "
                             'detection_prompt.json, else a grounding prompt)')
    parser.add_argument('--min-pixels', type=int, default=None,
                        help="image budget written to the result (default: the adapter's, "
                             "else the base's)")
    parser.add_argument('--max-pixels', type=int, default=None,
                        help="image budget written to the result (default: the adapter's, "
                             "else the base's)")
    parser.add_argument('--overwrite', action='store_true',
                        help='allow writing into a non-empty --out folder (old weight files '
                             'there are deleted first)')
    return parser


def main(argv=None) -> int:
    return run_tool(run, build_parser().parse_args(argv),
                    expected=(ModelLoadError, AdapterError, MergeError, MissingDependencyError,
                              DefaultModelError, ValueError),
                    check_failures=(MergeCheckError,))


def run(args) -> int:
    args.base = resolve_model_path(args.base, 'none')
    check_mergeable_base(args.base)
    adapter = read_adapter(args.adapter)
    out = prepare_output_dir(args.out, args.overwrite, inputs=[args.base, args.adapter],
                             stale_patterns=MODEL_WEIGHT_PATTERNS + (MERGE_LOG,))
    print(f'adapter: LoRA rank {adapter.rank}, alpha {adapter.config.get("lora_alpha")}, '
          f'trained on {adapter.base_model_name or "an unnamed base"}')
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*is_gradient_checkpointing.*')
        result = merge_lora(args.base, args.adapter, out, dtype=args.dtype, device=args.device,
                            tolerance=args.tolerance, probe_image_path=args.probe_image,
                            instruction=args.probe_instruction, min_pixels=args.min_pixels,
                            max_pixels=args.max_pixels)
    check = result.check
    print(f'logit check in float32 on {check.positions} probe positions: max |merged - '
          f'base+adapter| = {check.max_abs_diff:.4g} (tolerance {check.tolerance:.4g}; largest '
          f'|logit| {check.logit_scale:.4g}); the adapter changes the logits by up to '
          f'{check.adapter_effect:.4g}')
    print(f'saved in {result.dtype}: reloaded vs as saved {check.reload_diff:.4g}; rounding to '
          f'{result.dtype} moves the logits by up to {check.rounding_diff:.4g} (top-1 agreement '
          f'{check.top1_agreement:.1%})')
    print(f'sizes: base {format_bytes(result.base_weight_bytes)}, adapter '
          f'{format_bytes(result.adapter_weight_bytes)}, merged '
          f'{format_bytes(result.merged_weight_bytes)} ({result.dtype})')
    print(f'wrote the merged checkpoint to {out} in {result.seconds:.0f} s')
    if not check.conclusive:
        print(f'error: the adapter changes the probe logits by only {check.adapter_effect:.4g}, '
              f'not more than the tolerance {check.tolerance:.4g}: the check cannot tell the '
              f'merged model in {out} from its base (an untrained adapter, or one for another '
              'base?); check with a --probe-image/--probe-instruction where the adapter '
              'matters, or a smaller --tolerance', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
