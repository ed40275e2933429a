#!/usr/bin/env python3
"""Write a deterministic synthetic detection dataset (coloured balls, boxes, cones, rings).

Images go to ``OUT/images/scene_NNNNN.png``; labels as COCO (``OUT/annotations.json``),
YOLO (``OUT/labels/*.txt``, ``classes.txt``, ``data.yaml``) and/or LabelMe
(``OUT/images/scene_NNNNN.json``). The same --seed always gives the same files.
"""
import argparse
import sys
from collections import Counter

from qwen_vl_perception.data.labels import FORMATS
from qwen_vl_perception.data.scenes import DEFAULT_SIZES, parse_sizes, write_dataset
from qwen_vl_perception.tool_support import fail

EXAMPLE = """example:
  python tools/make_scenes.py --out data/scenes_train --count 2000 --seed 1
  python tools/make_scenes.py --out data/scenes_val --count 200 --seed 2 --all-formats \\
      --sizes 320x240,256x256
"""


def build_parser() -> argparse.ArgumentParser:
    default_sizes = ','.join(f'{w}x{h}' for w, h in DEFAULT_SIZES)
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--count', type=int, required=True, help='number of images')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    parser.add_argument('--sizes', default=default_sizes,
                        help=f'comma-separated WIDTHxHEIGHT choices (default {default_sizes})')
    parser.add_argument('--min-objects', type=int, default=1,
                        help='fewest objects asked for per scene (default 1)')
    parser.add_argument('--max-objects', type=int, default=4,
                        help='most objects per scene (default 4)')
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--format', choices=FORMATS, default='coco',
                       help='label format (default coco)')
    group.add_argument('--all-formats', action='store_true',
                       help='write COCO, YOLO and LabelMe labels for the same images')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace a dataset already in --out (other files are kept)')
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as error:
        parser.error(str(error))
    formats = list(FORMATS) if args.all_formats else [args.format]
    try:
        images = write_dataset(args.out, args.count, args.seed, sizes=sizes, format=formats,
                               overwrite=args.overwrite, min_objects=args.min_objects,
                               max_objects=args.max_objects)
    except FileExistsError:
        return fail(f'{args.out} exists and is not empty (pass --overwrite to replace the '
                    'dataset there; other files are kept)')
    except ValueError as error:
        return fail(str(error))
    objects = Counter(obj.label for image in images for obj in image.objects)
    summary = ', '.join(f'{count} {label}' for label, count in sorted(objects.items()))
    print(f'wrote {len(images)} images ({summary}) with {"/".join(formats)} labels '
          f'to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
