"""The served benchmark (--server): frames/s at each count in flight, beside the local engine."""
import platform
import sys

from qwen_vl_perception.categories import ARTICLE_CATEGORIES

from .arguments import parse_pair
from .report import served_row, served_table, write_json


def served_benchmark(args):
    """The served model at each ``--in-flight``, the local engine at each ``--batch-sizes``."""
    if args.model is None and not args.no_local:
        raise SystemExit('error: --server times the local engine on --model beside it '
                         '(or pass --no-local)')
    images, described = served_images(args)
    instruction = served_instruction(args)
    engine, served_models = connect(args)
    results = {'command': ' '.join(sys.argv), 'mode': 'served', 'server': engine.server_url,
               'served_models': served_models, 'server_model': engine.model_name,
               'model': str(args.model) if args.model else None, 'images': described,
               'pixel_budget': [engine.min_pixels, engine.max_pixels],
               'max_new_tokens': args.max_new_tokens, 'instruction': instruction,
               'environment': {'python': platform.python_version(),
                               'machine': platform.machine()},
               'runs': [], 'agreement': None}
    print(f'{engine.description}; {described}; instruction: {instruction}', flush=True)
    texts = time_server(args, engine, images, instruction, results)
    if not args.no_local:
        texts.update(time_local_engine(args, images, instruction, results))
        results['agreement'] = answer_agreement(args, texts, len(images))
    write_json(args.out, results)
    print()
    print(served_table(results))
    return results


def served_images(args):
    """``--frames`` images: the first of ``--images`` (natural order), else synthetic scenes."""
    if args.images is not None:
        from qwen_vl_perception.image_conversion import load_image_file
        from qwen_vl_perception.data.image_folder import list_images
        paths = list_images(args.images)[:args.frames]
        if not paths:
            raise SystemExit(f'error: no images in {args.images}')
        return [load_image_file(path) for path in paths], f'{len(paths)} of {args.images}'
    from qwen_vl_perception.data.scenes import generate_scene
    width, height = parse_pair(args.image)
    try:
        images = [generate_scene(50_000 + index, width, height)[0]
                  for index in range(args.frames)]
    except ValueError as error:  # e.g. smaller than a scene can be
        raise SystemExit(f'error: --image {args.image}: {error}') from error
    return (images,
            f'{args.frames} synthetic scenes {width}x{height} (seeds 50000+)')


def served_instruction(args) -> str:
    """The instruction the ``--model`` was trained on (its ``detection_prompt.json``), else the
    node's for the article's categories."""
    from qwen_vl_perception.detector import DetectionSettings, prepare_settings
    from qwen_vl_perception.trained_prompt import read_prompt_file
    record = read_prompt_file(args.model) if args.model is not None else None
    if record is None:
        settings = DetectionSettings(categories=tuple(ARTICLE_CATEGORIES))
    else:
        settings = DetectionSettings(categories=tuple(record['categories']),
                                     describe=bool(record.get('describe', False)),
                                     attributes=tuple(record.get('attributes') or ()),
                                     prompt_template=record.get('prompt_template'))
    return prepare_settings(settings).instruction


def connect(args):
    """The ``openai`` engine on ``--server``, connected, and the models the server lists."""
    from qwen_vl_perception.backends.http_client import ServerError
    from qwen_vl_perception.backends.openai_engine import OpenAIEngine
    engine = OpenAIEngine.for_model(args.server, args.model, model=args.server_model,
                                    api_key_env=args.server_api_key_env,
                                    timeout_s=args.server_timeout,
                                    max_in_flight=max(args.in_flight))
    try:
        return engine, engine.connect()
    except ServerError as error:
        raise SystemExit(f'error: {error}') from None


def time_server(args, engine, images, instruction, results):
    """The server at each ``--in-flight`` (after an untimed warm-up request), its runs added to
    ``results``; the answers per ``('openai', in_flight)``. A failed request ends the tool."""
    from qwen_vl_perception.backends.http_client import ServerError
    from qwen_vl_perception.backends.throughput import time_served
    texts = {}
    try:
        engine.answer(images[0], instruction, args.max_new_tokens)  # warm-up, not timed
        for in_flight in args.in_flight:
            figures, texts[('openai', in_flight)] = time_served(
                engine, images, instruction, args.max_new_tokens, in_flight)
            results['runs'].append(figures.to_dict())
            print(served_row(figures), flush=True)
    except ServerError as error:
        raise SystemExit(f'error: a request failed, no figure for this run: {error}') from None
    finally:
        engine.close()
    return texts


def time_local_engine(args, images, instruction, results):
    """The local engine on ``--model`` at each ``--batch-sizes`` (after a warm-up), its runs
    added to ``results``; the answers per ``('local', batch)``."""
    from qwen_vl_perception.backends.throughput import time_local
    from qwen_vl_perception.model.engine import VisionLanguageEngine
    local = VisionLanguageEngine(args.model, device=args.device or 'auto')
    results['environment']['local_device'] = str(local.device)
    texts = {}
    try:
        local.generate(images[:1], instruction, args.max_new_tokens)  # warm-up
        for batch in args.batch_sizes:
            figures, texts[('local', batch)] = time_local(
                local, images, instruction, args.max_new_tokens, batch)
            results['runs'].append(figures.to_dict())
            print(served_row(figures), flush=True)
    finally:
        local.close()
    return texts


def answer_agreement(args, texts, frames) -> float:
    """The share of identical answers, served (first ``--in-flight``) against local (first
    ``--batch-sizes``); printed."""
    first_served = texts[('openai', args.in_flight[0])]
    first_local = texts[('local', args.batch_sizes[0])]
    share = sum(a == b for a, b in zip(first_served, first_local)) / frames
    print(f'identical answers, served ({args.in_flight[0]} in flight) and local (batch '
          f'{args.batch_sizes[0]}): {share:.0%} of {frames}')
    return share
