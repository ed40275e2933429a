"""The default model gives the same answers under every supported transformers version.

The supported range runs from transformers 5.20.x (the newest on Python 3.10) to 5.24 (3.11+;
`tools/env/requirements.txt`). CI runs this suite on both ends; each end must reproduce the
answers recorded in ``test/support/data/default_model_answers.json``: the default model's raw
answer texts on 12 held-out scenes, float32 and NF4, greedy, on the CPU, through the node's
Engine + Detector path. Identical text means identical detections (labels, boxes, colours).

The answers are computed in a child process with the CPU libraries' portable code paths
(:data:`PORTABLE`): ATen's vectorized kernels round differently per instruction set (AVX2,
AVX-512), and two NF4 answers changed with the machine (2026-12-02, same packages); with those
pinned, MKL's and oneDNN's own dispatch still changed one NF4 answer on an AMD EPYC
(2026-12-04: scene 5 with ATen's alone, scene 3 with MKL's pinned too; the recorded answers,
on 3.10 and 3.11, with all three).

The reference was written by this file's own code
(``python test/model/test_default_model_reference.py --update``, run in the 3.11 venv with
transformers 5.24); regenerate it only when the default model itself changes.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'support'))  # as a script too
from locations import DATA_DIR  # noqa: E402

REFERENCE = DATA_DIR / 'default_model_answers.json'
SCENES = 12
SEED = 31_000  # none of the seeds used in training (0, 1), the recipe (10000) or e2e (30000)


PINNED = {'ATEN_CPU_CAPABILITY': 'default', 'MKL_CBWR': 'COMPATIBLE',
          'ONEDNN_MAX_CPU_ISA': 'SSE41'}
"""ATen's CPU kernels without instruction-set variants, MKL's code path that gives the same
results on every x86 CPU (its conditional numerical reproducibility), oneDNN's kernels for
SSE4.1 at most."""
PORTABLE = dict(os.environ, **PINNED)
"""The child process's environment."""


def portable_answers(quantization, cache):
    """:func:`answers` computed in a child process with :data:`PORTABLE`."""
    result = subprocess.run([sys.executable, __file__, '--answers', quantization, '--cache',
                             str(cache)], env=PORTABLE, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


def answers(quantization, cache):
    from qwen_vl_perception.model.default_model import ensure_default_model
    from qwen_vl_perception.pipeline.scene_evaluation import evaluate_on_scenes
    checkpoint = ensure_default_model(quantization=quantization, cache=cache,
                                      log=lambda message: None)
    figures, texts, _ = evaluate_on_scenes(checkpoint, count=SCENES, seed=SEED, device='cpu',
                                           quantization='auto', compute_dtype='float32',
                                           batch_size=4)
    return {'figures': {k: figures[k] for k in ('precision', 'recall', 'color_accuracy')},
            'answers': texts}


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    pytest.importorskip('torch')
    pytest.importorskip('bitsandbytes')
    return tmp_path_factory.mktemp('default-model-cache')


@pytest.mark.parametrize('quantization', ['none', 'nf4'])
def test_default_model_answers_match_the_reference(cache, quantization):
    import transformers
    reference = json.loads(REFERENCE.read_text())[quantization]
    got = portable_answers(quantization, cache)
    different = [i for i, (a, b) in enumerate(zip(got['answers'], reference['answers']))
                 if a != b]
    assert not different, (
        f'transformers {transformers.__version__}: {len(different)} of {SCENES} answers '
        f'differ from the reference (written with {reference["transformers"]}), e.g. scene '
        f'{different[0]}:\n{got["answers"][different[0]]}\nvs\n'
        f'{reference["answers"][different[0]]}')
    assert got['figures'] == reference['figures']


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--update', action='store_true', help='rewrite the reference file')
    parser.add_argument('--answers', choices=('none', 'nf4'),
                        help='print one quantization\'s answers as JSON (the test\'s child)')
    parser.add_argument('--cache', type=Path, help='with --answers: the default model cache')
    args = parser.parse_args(argv)
    if args.answers:
        if any(os.environ.get(key) != value for key, value in PINNED.items()):
            parser.error('--answers needs ' + ' '.join(f'{key}={value}'
                                                       for key, value in PINNED.items()))
        print(json.dumps(answers(args.answers, args.cache)))
        return 0
    if not args.update:
        parser.error('nothing to do without --update or --answers')
    import tempfile

    import transformers
    with tempfile.TemporaryDirectory() as cache:
        data = {}
        for quantization in ('none', 'nf4'):
            data[quantization] = dict(portable_answers(quantization, Path(cache)),
                                      transformers=transformers.__version__)
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(data, indent=1, ensure_ascii=False) + '\n')
    print(f'wrote {REFERENCE}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
