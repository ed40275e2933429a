#!/usr/bin/env python3
"""Detect objects in every image of a folder with a Qwen3-VL checkpoint, as the node does.

Images (jpg, jpeg, png, bmp, webp; any case) are taken in natural order (img2 before img10)
and run through the node's own Detector (same prompt, parser, coordinates and scores). Writes
into --out: ``predictions/<name>.json`` per image (what tools/evaluate.py reads),
``annotated/<name>_detections.jpg``, and ``summary.json`` (settings, counts per category,
timing, each image's raw answer). Prints every object's label, score, box and attributes.
Unreadable images are reported and skipped.

With ``--server URL`` the model is the one an OpenAI-compatible server (vLLM, SGLang, ...)
serves, through the node's ``openai`` backend (same prompt, parser and scores; ``--batch-size``
requests in flight); ``--model`` is then optional, the served model's folder, read only for its
detection_prompt.json and pixel budget. A failed batch is tried again (``--retries``: whole
with ``--server``, else an image at a time; a retry that fails too stops retrying for the
run); an image that still fails is skipped (reported, and listed in the summary).
"""
import argparse
import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from qwen_vl_perception.backends.http_client import ServerError
from qwen_vl_perception.detector import (DEFAULT_ATTRIBUTES, DetectionSettings, Detector,
                                         prepare_settings)
from qwen_vl_perception.drawing import draw_detections
from qwen_vl_perception.image_conversion import ImageFormatError, load_image_file, save_rgb
from qwen_vl_perception.data.image_folder import FOLDER_IMAGE_EXTENSIONS, list_images
from qwen_vl_perception.data.labels import PREDICTIONS_DIR, write_prediction_file
from qwen_vl_perception.model.default_model import (DEFAULT_MODEL_NAME, DefaultModelError,
                                                    resolve_model_path)
from qwen_vl_perception.model.loading import QUANTIZATIONS, ModelLoadError, read_checkpoint_config
from qwen_vl_perception.model.torch_support import MissingDependencyError
from qwen_vl_perception.tool_support import (ToolError, category_names, prepare_output_dir,
                                             run_tool, split_names)
from qwen_vl_perception.trained_prompt import PROMPT_FILE, read_prompt_file

ANNOTATED_DIR = 'annotated'
SUMMARY_FILE = 'summary.json'

EXAMPLE = """example (the article's step 4, on the 4-bit fine-tuned Qwen3-VL-4B-Instruct):
  python tools/detect_folder.py --model models/qwen3-vl-4b-nf4 --images data/office/test \\
      --out runs/office_test --categories table cup bottle chair robot "garbage can" shelf \\
      "tissue box" "potted plant" --describe
  python tools/evaluate.py --labels data/office/test.json \\
      --predictions runs/office_test/predictions --out runs/office_test/metrics

  --categories, --describe and --attributes default to what the model was fine-tuned with
  (its detection_prompt.json, written by tools/prepare_data.py and carried by the tools).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=None,
                        help=f"Qwen3-VL checkpoint folder, or '{DEFAULT_MODEL_NAME}' for the "
                             "project's synthetic-scenes model (NF4; float32 with "
                             '--quantization none); required without --server')
    parser.add_argument('--server', default=None, metavar='URL',
                        help="detect with the model an OpenAI-compatible server serves: its "
                             'API base, e.g. http://gpu-box:8000/v1')
    parser.add_argument('--server-model', default='', metavar='NAME',
                        help="with --server: the served model's name (default: the server's "
                             'only model)')
    parser.add_argument('--server-api-key-env', default='', metavar='VAR',
                        help='with --server: the name of an environment variable holding the '
                             'API key')
    parser.add_argument('--server-timeout', type=float, default=300.0, metavar='S',
                        help='with --server: seconds a request may take (default %(default)s)')
    parser.add_argument('--images', required=True, help='folder of images (not recursive)')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--categories', nargs='+', default=None, metavar='NAME',
                        help='categories to find, space- or comma-separated (default: those '
                             f"in the model's {PROMPT_FILE})")
    parser.add_argument('--describe', action=argparse.BooleanOptionalAction, default=None,
                        help="also ask for each object's attributes (default: as the model "
                             'was trained, else on)')
    parser.add_argument('--attributes', nargs='+', default=None, metavar='NAME',
                        help='attribute names with --describe (default: as trained, else '
                             f'{" ".join(DEFAULT_ATTRIBUTES)})')
    parser.add_argument('--prompt-template', default=None,
                        help='instruction template (as the node\'s prompt_template parameter)')
    parser.add_argument('--batch-size', type=int, default=1,
                        help='images decoded together, or with --server requests in flight '
                             '(default %(default)s)')
    parser.add_argument('--retries', type=int, default=1,
                        help='times a failed batch is tried again before its images are '
                             'skipped: whole with --server, else an image at a time; a retry '
                             'that fails too stops retrying for the run (default '
                             '%(default)s; 0: never)')
    parser.add_argument('--score-threshold', type=float, default=0.0,
                        help='drop detections scoring below this (default 0: keep all; the '
                             'evaluate tool thresholds later)')
    parser.add_argument('--max-new-tokens', type=int, default=512,
                        help='longest answer (default %(default)s)')
    parser.add_argument('--device', default='auto',
                        help="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--quantization', default='auto', choices=QUANTIZATIONS,
                        help='auto: a 4-bit checkpoint as saved, else NF4 on CUDA and none on '
                             'CPU')
    parser.add_argument('--min-pixels', type=int, default=None,
                        help="smallest image area fed to the model (default: the checkpoint's)")
    parser.add_argument('--max-pixels', type=int, default=None,
                        help="largest image area fed to the model (default: the checkpoint's)")
    parser.add_argument('--quiet', action='store_true', help='do not print every object')
    parser.add_argument('--overwrite', action='store_true',
                        help='allow writing into a non-empty --out folder (an earlier run\'s '
                             f'{PREDICTIONS_DIR}/, {ANNOTATED_DIR}/ and {SUMMARY_FILE} there are '
                             'deleted first)')
    return parser


def main(argv=None) -> int:
    return run_tool(run, build_parser().parse_args(argv),
                    expected=(ModelLoadError, MissingDependencyError, DefaultModelError,
                              ValueError, FileNotFoundError, ServerError))


def detection_settings(args, model_dir: Optional[Path]) -> DetectionSettings:
    """Settings from the options, completed from the model's detection_prompt.json."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trained = read_prompt_file(model_dir) if model_dir is not None else None
    for warning in caught:
        print(f'warning: {warning.message}', file=sys.stderr)
    trained = trained or {}
    categories = category_names(args.categories) or trained.get('categories')
    if not categories:
        where = (f'{model_dir} has no {PROMPT_FILE}' if model_dir is not None
                 else 'no --model folder has a ' + PROMPT_FILE)
        raise ToolError(f'no --categories given and {where} saying what it was trained to '
                        'find; pass --categories')
    describe = args.describe if args.describe is not None else trained.get('describe', True)
    attributes = split_names(args.attributes) or trained.get('attributes') \
        or list(DEFAULT_ATTRIBUTES)
    template = args.prompt_template
    if template is None and args.categories is None:
        template = trained.get('prompt_template')
    if args.batch_size < 1:
        raise ToolError('--batch-size must be at least 1')
    if args.retries < 0:
        raise ToolError('--retries must be 0 or more')
    return DetectionSettings(categories=tuple(categories), describe=bool(describe),
                             attributes=tuple(attributes), prompt_template=template or None,
                             score_threshold=args.score_threshold,
                             max_new_tokens=args.max_new_tokens)


def output_names(paths):
    """File-name stems for outputs, unique even for ``a.png`` beside ``a.jpg``."""
    stems = Counter(path.stem.casefold() for path in paths)
    return [path.stem if stems[path.stem.casefold()] == 1 else path.name for path in paths]


def run(args) -> int:
    if args.model is None and not args.server:
        raise ToolError('--model is required (or --server URL for a served model)')
    model_dir = None
    if args.model is not None:
        # a served model's folder is only read: its float32 form has the same files
        form = 'none' if args.quantization == 'none' or args.server else 'nf4'
        model_dir = resolve_model_path(args.model, form)
        read_checkpoint_config(model_dir)  # a clear error for a missing or wrong folder, now
    settings = detection_settings(args, model_dir)
    try:
        images = list_images(args.images)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise ToolError(str(error)) from None
    if not images:
        raise ToolError(f'no images ({", ".join(FOLDER_IMAGE_EXTENSIONS)}) in {args.images}')
    prepared = prepare_settings(settings)  # refuse bad options before the model loads
    started = time.perf_counter()
    served = served_engine(args, model_dir) if args.server else None  # asked before writing
    # --overwrite: the earlier run's outputs go, so the folder holds only this run's.
    inputs = [args.images] + ([model_dir] if model_dir is not None else [])
    out = prepare_output_dir(args.out, args.overwrite, inputs=inputs,
                             stale_patterns=(PREDICTIONS_DIR, ANNOTATED_DIR, SUMMARY_FILE))

    if served is not None:
        engine = served
        where = {'server': engine.server_url, 'server_model': engine.model_name}
        min_pixels, max_pixels = engine.min_pixels, engine.max_pixels
        load_seconds = time.perf_counter() - started
        print(f'{engine.description} (of {", ".join(engine.served_models)}); images sent at '
              f'{min_pixels}-{max_pixels} pixels, up to {args.batch_size} requests in flight')
    else:
        from qwen_vl_perception.model.engine import VisionLanguageEngine
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='.*is_gradient_checkpointing.*')
            engine = VisionLanguageEngine(model_dir, device=args.device,
                                          quantization=args.quantization,
                                          min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        where = {'device': str(engine.device), 'quantization': engine.quantization}
        min_pixels, max_pixels = engine.inputs.min_pixels, engine.inputs.max_pixels
        load_seconds = time.perf_counter() - started
        print(f'model {model_dir} on {engine.device} ({engine.quantization}), loaded in '
              f'{load_seconds:.1f} s; images fed at {min_pixels}-{max_pixels} pixels')
    detector = Detector(engine, settings)
    print(f'instruction: {prepared.instruction}')

    names = dict(zip(images, output_names(images)))
    records, skipped, retried = [], [], []
    retries = RetryPolicy(args.retries, whole_batch=served is not None)
    counts = Counter()
    detect_seconds = 0.0
    bar = tqdm(total=len(images), desc='images', unit='image')
    for start in range(0, len(images), args.batch_size):
        batch = []
        for path in images[start:start + args.batch_size]:
            try:
                batch.append((path, load_image_file(path)))
            except (ImageFormatError, OSError) as error:
                skipped.append({'image': path.name, 'reason': str(error)})
                tqdm.write(f'skipped {path.name}: {error}', file=sys.stderr)
                bar.update(1)
        if not batch:
            continue
        for path, rgb, frame, shared, error in _detect_batch(detector, batch, retries,
                                                             retried):
            if frame is None:
                skipped.append({'image': path.name, 'reason': f'detection failed: {error}'})
                tqdm.write(f'detection failed for {path.name}: {error}', file=sys.stderr)
                bar.update(1)
                continue
            detect_seconds += frame.seconds / shared  # a batch's time, shared out
            records.append(_write_outputs(out, names[path], path, rgb, frame, settings))
            counts.update(detection.label for detection in frame.detections)
            if not args.quiet:
                tqdm.write(describe_frame(path, frame, shared))
            bar.update(1)
    bar.close()

    processed = len(records)
    summary = {
        'model': str(model_dir) if model_dir is not None else None, **where,
        'images_folder': str(args.images),
        'instruction': prepared.instruction, 'settings': _settings_dict(prepared.settings),
        'min_pixels': min_pixels, 'max_pixels': max_pixels,
        'images': len(images), 'processed': processed, 'skipped': skipped,
        'retried': retried,
        'detections': sum(counts.values()), 'counts': dict(sorted(counts.items())),
        'timing': {'model_load_s': load_seconds, 'detect_s': detect_seconds,
                   'per_image_s': detect_seconds / processed if processed else None,
                   'batch_size': args.batch_size},
        'per_image': records,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + '\n',
                                    encoding='utf-8')
    engine.close()
    found = ', '.join(f'{count} {label}' for label, count in sorted(counts.items()))
    per_image = f', {detect_seconds / processed:.2f} s per image' if processed else ''
    again = f', {len(retried)} tried again' if retried else ''
    print(f'{processed} of {len(images)} images processed ({len(skipped)} skipped{again})'
          f'{per_image}; found {found or "nothing"}')
    print(f'wrote {out / PREDICTIONS_DIR}, {out / ANNOTATED_DIR} and {out / SUMMARY_FILE}')
    return 0 if processed else 1


class RetryPolicy:
    """How a run tries failed batches again: ``times`` more attempts each, the batch whole
    when its requests go to a server at once (one more round of requests: at most one more
    time-out), else an image at a time (a batch too large for the GPU). A retry that fails
    too stops retrying for the rest of the run: a server that is down or does not answer
    then costs one more attempt, not one per image."""

    def __init__(self, times: int, whole_batch: bool):
        self.times, self.whole_batch, self.stopped = times, whole_batch, False


def _detect_batch(detector, batch, policy: RetryPolicy, retried: list):
    """(path, rgb, frame or None, images it was decoded with, error) for each image of
    ``batch``; images tried again are appended to ``retried`` with the first error, so that
    the summary says so."""
    try:
        frames = detector.detect([rgb for _, rgb in batch])
    except RuntimeError as error:
        if not policy.times or policy.stopped:
            return [(path, rgb, None, len(batch), error) for path, rgb in batch]
        how = 'the batch' if policy.whole_batch or len(batch) == 1 else 'an image at a time'
        tqdm.write(f'{", ".join(path.name for path, _ in batch)}: {error}; trying again '
                   f'({how})', file=sys.stderr)
        units = [batch] if policy.whole_batch else [[item] for item in batch]
        results = []
        for unit in units:
            answers, last = None, error
            if not policy.stopped:
                retried.extend({'image': path.name, 'reason': f'detection failed: {error}'}
                               for path, _ in unit)
                for _ in range(policy.times):
                    try:
                        answers = detector.detect([rgb for _, rgb in unit])
                        break
                    except RuntimeError as again:
                        last = again
                if answers is None:
                    policy.stopped = True
                    tqdm.write('trying again did not help: failed batches are skipped from '
                               'now on', file=sys.stderr)
            if answers is None:
                results += [(path, rgb, None, len(unit), last) for path, rgb in unit]
            else:
                results += [(path, rgb, frame, len(unit), None)
                            for (path, rgb), frame in zip(unit, answers)]
        return results
    return [(path, rgb, frame, len(batch), None) for (path, rgb), frame in zip(batch, frames)]


def served_engine(args, model_dir: Optional[Path]):
    """The openai backend's engine for ``--server``, connected (a clear error if it cannot
    be): at the model folder's pixel budget as the local engine would feed it, else at the
    node's default; ``--min-pixels``/``--max-pixels`` override."""
    from qwen_vl_perception.backends.openai_engine import OpenAIEngine
    from qwen_vl_perception.model.pixel_budget import (NODE_MAX_PIXELS, NODE_MIN_PIXELS,
                                                       image_factor, read_pixel_budget)
    low, high = (read_pixel_budget(model_dir) if model_dir is not None else None) \
        or (NODE_MIN_PIXELS, NODE_MAX_PIXELS)
    engine = OpenAIEngine(args.server, model=args.server_model,
                          api_key_env=args.server_api_key_env, timeout_s=args.server_timeout,
                          max_in_flight=args.batch_size,
                          min_pixels=args.min_pixels or low, max_pixels=args.max_pixels or high,
                          factor=image_factor(model_dir))
    engine.connect()
    return engine


def _write_outputs(out: Path, name: str, path: Path, rgb, frame, settings) -> dict:
    height, width = rgb.shape[:2]
    write_prediction_file(out / PREDICTIONS_DIR / f'{name}.json', path.name, width, height,
                          frame.detections)
    annotated = draw_detections(rgb, frame.detections, show_scores=True,
                                show_attributes=settings.describe)
    save_rgb(out / ANNOTATED_DIR / f'{name}_detections.jpg', annotated)
    return {'image': path.name, 'width': width, 'height': height,
            'detections': len(frame.detections), 'seconds': frame.seconds,
            'raw_answer': frame.raw_text, 'truncated': frame.truncated,
            'unknown_labels': frame.unknown_labels, 'invalid': frame.invalid,
            'below_threshold': frame.below_threshold, 'degenerate': frame.degenerate,
            'duplicates': frame.duplicates, 'excess': frame.excess}


def describe_frame(path: Path, frame, batch_size: int) -> str:
    per_image = frame.seconds / batch_size
    lines = [f'{path.name}: {len(frame.detections)} object(s) in {per_image:.2f} s'
             + (' (answer cut at --max-new-tokens)' if frame.truncated else '')]
    for detection in frame.detections:
        box = ', '.join(f'{value:.0f}' for value in detection.box)
        attributes = ''.join(f' {key}={value}' for key, value in detection.attributes.items())
        lines.append(f'  #{detection.id} {detection.label} {detection.score:.2f} '
                     f'[{box}]{attributes}')
    return '\n'.join(lines)


def _settings_dict(settings: DetectionSettings) -> dict:
    return {'categories': list(settings.categories), 'describe': settings.describe,
            'attributes': list(settings.attributes),
            'prompt_template': settings.prompt_template,
            'score_threshold': settings.score_threshold,
            'max_new_tokens': settings.max_new_tokens, 'dedupe_iou': settings.dedupe_iou}


if __name__ == '__main__':
    sys.exit(main())
