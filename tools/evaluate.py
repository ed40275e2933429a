#!/usr/bin/env python3
"""Score a folder of prediction JSON files against ground-truth labels.

Prints a per-category table and writes ``metrics.json`` and ``metrics.png`` into ``--out``.
"""
import argparse
import json
import sys
import warnings

from qwen_vl_perception.data.evaluation import evaluate, format_table, plot_report
from qwen_vl_perception.data.labels import (FORMATS, PREDICTIONS_DIR, load_labels,
                                            load_predictions, predictions_folder)
from qwen_vl_perception.tool_support import (ToolError, category_names, prepare_output_dir,
                                             run_tool)

EXAMPLE = """example:
  # predictions of the 4-bit fine-tuned Qwen3-VL-4B-Instruct over a test folder, then scores
  python tools/detect_folder.py --model models/qwen3-vl-4b-nf4 --images data/office/test \\
      --out runs/office_test
  python tools/evaluate.py --labels data/office/test/annotations.json \\
      --predictions runs/office_test/predictions --out runs/office_test/metrics

  --labels accepts a COCO JSON, a YOLO dataset root (with data.yaml or classes.txt), or a
  LabelMe JSON file / folder; --predictions holds one JSON per image:
  {"image": "scene_00000.png", "width": 320, "height": 240,
   "detections": [{"id": "0", "label": "ball", "box": [10, 53, 99, 142],
                   "score": 0.93, "attributes": {"color": "purple"}}]}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--labels', required=True, help='ground-truth file or folder')
    parser.add_argument('--format', default='auto', choices=('auto',) + FORMATS,
                        help='label format (default: auto-detect)')
    parser.add_argument('--predictions', required=True,
                        help='folder of per-image prediction JSON files, or the run folder '
                             f'of tools/detect_folder.py (its {PREDICTIONS_DIR}/ is read)')
    parser.add_argument('--out', required=True, help='folder for metrics.json and metrics.png')
    parser.add_argument('--iou', type=float, default=0.5,
                        help='IoU threshold for precision/recall matching (default 0.5)')
    parser.add_argument('--score-threshold', type=float, default=0.0,
                        help='ignore predictions below this score for precision/recall '
                             '(AP always uses every prediction; default 0.0)')
    parser.add_argument('--categories', default=None,
                        help='comma-separated category names to evaluate (default: all seen)')
    parser.add_argument('--overwrite', action='store_true',
                        help='allow writing into a non-empty --out folder')
    return parser


def main(argv=None) -> int:
    return run_tool(run, build_parser().parse_args(argv), expected=(ValueError,))


def run(args) -> int:
    if not 0.0 < args.iou <= 1.0:
        raise ToolError(f'--iou must be in (0, 1], got {args.iou}')
    categories = category_names(None if args.categories is None else [args.categories])
    folder = predictions_folder(args.predictions)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ground_truth = load_labels(args.labels, args.format)
        predictions = load_predictions(folder)
    for warning in caught:
        print(f'warning: {warning.message}', file=sys.stderr)
    names = [image.name for image in ground_truth]
    missing = [name for name in names if name not in predictions]
    if names and len(missing) == len(names):
        raise ToolError(f'none of the {len(names)} labelled images has a prediction file in '
                        f'{folder} ({len(predictions)} prediction files there); give the '
                        f'folder tools/detect_folder.py wrote (its {PREDICTIONS_DIR}/ '
                        'sub-folder or the run folder itself)')
    if missing:
        print(f'warning: {len(missing)} of {len(names)} labelled images have no prediction '
              f'file in {folder} (counted as no detections), e.g. {missing[0]}',
              file=sys.stderr)
    out_dir = prepare_output_dir(args.out, args.overwrite, inputs=[folder])
    report = evaluate(ground_truth, predictions, categories=categories,
                      iou_threshold=args.iou, score_threshold=args.score_threshold)
    print(format_table(report))
    metrics_path = out_dir / 'metrics.json'
    with open(metrics_path, 'w', encoding='utf-8') as stream:
        json.dump(report.to_dict(), stream, indent=2)
        stream.write('\n')
    plot_path = out_dir / 'metrics.png'
    plot_report(report, plot_path)
    print(f'wrote {metrics_path} and {plot_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
