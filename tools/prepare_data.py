#!/usr/bin/env python3
"""Turn labelled images (COCO, YOLO or LabelMe) into a LLaMA-Factory multimodal SFT dataset.

Writes into --out: ``dataset.json`` (sharegpt: one user turn = the node's instruction followed
by one ``<image>``, one assistant turn = the boxes on Qwen3-VL's 0-1000 grid in its native
```json answer), ``dataset_val.json`` with --val-fraction, the images under ``images/``,
``dataset_info.json`` registering them, and ``detection_prompt.json`` (categories, attributes,
instruction) that the fine-tune, merge and quantize tools carry into the model folders.
"""
import argparse
import sys
import warnings
from pathlib import Path

from tqdm import tqdm

from qwen_vl_perception.data.labels import FORMATS, load_labels
from qwen_vl_perception.prompt import DEFAULT_ATTRIBUTES, PromptBuilder
from qwen_vl_perception.data.sft_data import category_coverage, write_sft_dataset
from qwen_vl_perception.tool_support import (ToolError, category_names, prepare_output_dir,
                                             run_tool, split_names)
from qwen_vl_perception.trained_prompt import write_prompt_file

EXAMPLE = """example (the article's office categories, with descriptions):
  python tools/prepare_data.py --labels data/office/annotations.json --out data/office_sft \\
      --categories table cup bottle chair robot "garbage can" shelf "tissue box" \\
      "potted plant" --describe --attributes color shape appearance --val-fraction 0.1

then, in LLaMA-Factory (Qwen3-VL-4B-Instruct, QLoRA as in the article):
  model_name_or_path: Qwen/Qwen3-VL-4B-Instruct   template: qwen3_vl_nothink
  dataset_dir: data/office_sft   dataset: detection   eval_dataset: detection_val
  image_max_pixels: 409600   (the node's max_pixels: train and inference resolution match)
or the project's own trainer: python tools/finetune.py --base ... --dataset data/office_sft
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--labels', required=True,
                        help='COCO JSON, YOLO dataset root (data.yaml/classes.txt) or LabelMe '
                             'JSON file/folder')
    parser.add_argument('--format', default='auto', choices=('auto',) + FORMATS,
                        help='label format (default: auto-detect)')
    parser.add_argument('--out', required=True, help='dataset folder to write')
    parser.add_argument('--name', default='detection',
                        help='dataset name in dataset_info.json (default: detection; the '
                             'validation split is NAME_val)')
    parser.add_argument('--categories', nargs='+', default=None, metavar='NAME',
                        help='categories the prompt asks for, space- or comma-separated '
                             '(default: every category in the labels); objects of other '
                             'labels are left out of the answers')
    parser.add_argument('--describe', action='store_true',
                        help='ask for (and teach) the attributes of each object')
    parser.add_argument('--attributes', nargs='+', default=list(DEFAULT_ATTRIBUTES),
                        metavar='NAME',
                        help='attribute names with --describe (default: %(default)s)')
    parser.add_argument('--prompt-template', default=None,
                        help='instruction template, as the node\'s prompt_template parameter '
                             '(must contain {categories}; may contain {attributes})')
    parser.add_argument('--val-fraction', type=float, default=0.0,
                        help='share of samples for dataset_val.json (default 0: none)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the split (default 0)')
    parser.add_argument('--link', action='store_true',
                        help='symlink the images instead of copying them')
    parser.add_argument('--skip-empty', action='store_true',
                        help='leave out images without any object of the categories (default: '
                             'keep them, teaching the model to answer an empty list)')
    parser.add_argument('--overwrite', action='store_true',
                        help='allow writing into a non-empty --out folder')
    return parser


def main(argv=None) -> int:
    return run_tool(run, build_parser().parse_args(argv))


def run(args) -> int:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            images = load_labels(args.labels, args.format)
        for warning in caught:
            print(f'warning: {warning.message}', file=sys.stderr)
    except ValueError as error:
        raise ToolError(str(error)) from None
    if not images:
        raise ToolError(f'{args.labels}: no labelled images')
    categories = category_names(args.categories)
    if categories is None:
        categories = sorted({obj.label for image in images for obj in image.objects})
        if not categories:
            raise ToolError(f'{args.labels}: no labelled object, so no category to ask for; '
                            'pass --categories')
    try:
        prompt = PromptBuilder(categories, describe=args.describe, template=args.prompt_template,
                               attributes=split_names(args.attributes))
    except ValueError as error:
        raise ToolError(str(error)) from None
    kept, dropped = category_coverage(images, prompt)
    if not kept:
        labels = ', '.join(f'{count} {label}' for label, count in sorted(dropped.items()))
        raise ToolError(f'no labelled object is one of the categories '
                        f'({", ".join(prompt.categories)}), so every answer would be empty; '
                        f'the labels are: {labels or "none"}')
    out = prepare_output_dir(args.out, args.overwrite, inputs=[Path(args.labels)])
    try:
        summary = write_sft_dataset(
            images, out, prompt, name=args.name, val_fraction=args.val_fraction,
            seed=args.seed, link=args.link, skip_empty=args.skip_empty,
            progress=lambda items: tqdm(items, desc='samples', unit='image'))
    except ValueError as error:
        raise ToolError(str(error)) from None
    write_prompt_file(out, prompt, args.prompt_template)
    _report(summary, prompt, out, args)
    return 0


def _report(summary, prompt, out: Path, args) -> None:
    for path, reason in summary.skipped_images:
        print(f'skipped {path}: {reason}', file=sys.stderr)
    if summary.dropped_labels:
        dropped = ', '.join(f'{count} {label}' for label, count in
                            sorted(summary.dropped_labels.items()))
        left_out = sum(summary.dropped_labels.values())
        total = left_out + sum(summary.objects.values())
        print(f'warning: left out objects whose label is not a category: {dropped} '
              f'({left_out} of {total} objects)', file=sys.stderr)
    for name in prompt.answer_attributes:
        if not summary.attribute_counts.get(name):
            print(f'warning: no object has the attribute {name!r}; the model will learn to '
                  'leave it out', file=sys.stderr)
    objects = ', '.join(f'{count} {label}' for label, count in sorted(summary.objects.items()))
    empty = f', {summary.empty_images} without objects' if summary.empty_images else ''
    skipped = ' (skipped)' if args.skip_empty and summary.empty_images else ''
    print(f'instruction: {prompt.instruction}')
    print(f'wrote {summary.train} training and {summary.val} validation samples '
          f'({objects or "no objects"}{empty}{skipped}) to {out}')
    print(f'LLaMA-Factory: dataset_dir: {out}  dataset: {args.name}'
          + (f'  eval_dataset: {args.name}_val' if summary.val else ''))


if __name__ == '__main__':
    sys.exit(main())
