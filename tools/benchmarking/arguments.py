"""The benchmark's command line: its arguments and how their values read."""
import argparse
from pathlib import Path

from qwen_vl_perception.model.default_model import DEFAULT_MODEL_NAME

VARIANTS = ('bf16', 'nf4', 'nf4-all', 'article')
"""What ``--variants`` can time; "article" is the model of the blog post the project grew from
("Qwen3-VL + LoRA SFT + 4-bit quantization", see README.md): NF4 with float16 compute."""
TRISTATE = {'auto': None, 'on': True, 'off': False}
"""``--fuse``, ``--nf4-kernel``, ``--overlap`` and ``--fold`` as FastGreedyDecoder takes
them."""


def parse_pair(text):
    """``'640x480'`` -> ``(640, 480)``; also ``BATCHxTOKENS`` (``'8x80'``)."""
    first, second = (int(value) for value in text.lower().split('x'))
    return first, second


def pair(text):
    """An argument of two positive integers, ``AxB``: the text itself, checked (the tool reads
    it with :func:`parse_pair`)."""
    try:
        values = parse_pair(text)
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not AxB with positive integers A and B')
    return text


def parse_args(argv, doc: str):
    """The arguments of ``argv`` (None: the command line); ``doc`` is the tool's docstring,
    its first paragraph the description, the rest the help's epilog."""
    parser = argparse.ArgumentParser(
        description=doc.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split('\n\n', 1)[1])
    add_run_arguments(parser)
    add_check_arguments(parser)
    parser.add_argument('--cpu-time', action='store_true',
                        help='CPU only: one torch thread, time with the process CPU clock '
                             '(fair on a machine shared with other jobs)')
    parser.add_argument('--out', type=Path, default=None, help='write the results as JSON')
    add_served_arguments(parser.add_argument_group('a served model (--server)'))
    args = parser.parse_args(argv)
    if 'article' in args.variants and not (args.server or args.article_runs):
        # The article variant times only these runs: without one it would time nothing.
        parser.error('--variants article needs at least one --article-runs BATCHxTOKENS')
    return args


def add_run_arguments(parser):
    """What is timed: device, model, input, batches, answer lengths, variants."""
    parser.add_argument('--device', default=None, choices=('cuda', 'cpu'),
                        help='where to run (default: cuda if available)')
    parser.add_argument('--tiny', action='store_true',
                        help='the tiny test architecture instead of the 4B one')
    parser.add_argument('--model', type=Path, default=None,
                        help='an unquantized Qwen3-VL checkpoint folder instead of random '
                             f"weights, or '{DEFAULT_MODEL_NAME}' (the project's "
                             'synthetic-scenes model, its float32 form)')
    parser.add_argument('--image', default='640x480', type=pair,
                        help='WIDTHxHEIGHT of the test image')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 4, 8])
    parser.add_argument('--new-tokens', type=int, nargs='+', default=[150, 80])
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per configuration')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS,
                        help='bf16: unquantized; nf4: language model NF4 (project loading); '
                             'nf4-all: every linear but lm_head NF4, model-dtype compute; '
                             "article: nf4-all with float16 compute (the article's model)")
    parser.add_argument('--article-runs', nargs='*', type=pair,
                        default=['1x150', '1x80', '8x80'],
                        help="model.generate runs on the article's model, BATCHxTOKENS")
    parser.add_argument('--article-repeats', type=int, default=2,
                        help='timed model.generate runs per article configuration')


def add_check_arguments(parser):
    """The checks beside the timed runs: profile, agreement, kernels, memory."""
    parser.add_argument('--profile', action='store_true',
                        help='write kernel-time tables of eager decode steps (CUDA)')
    parser.add_argument('--agreement-tokens', type=int, default=64,
                        help='tokens for the agreement check with model.generate (0: skip)')
    parser.add_argument('--fuse', default='auto', choices=('auto', 'on', 'off'),
                        help='fuse the decode step elementwise work with torch.compile')
    parser.add_argument('--unfused-check', action='store_true',
                        help='also time our engine unfused (batch 1, first --new-tokens)')
    parser.add_argument('--overlap', default='auto', choices=('auto', 'on', 'off'),
                        help='CUDA: start the NF4 and decode attention kernels with '
                             'programmatic dependent launch (auto: on, where the GPU has it)')
    parser.add_argument('--fold', default='auto', choices=('auto', 'on', 'off'),
                        help="CUDA: fold the decode step's residual adds and RMSNorms into the "
                             'NF4 launches (auto: where the launches overlap)')
    parser.add_argument('--fold-act-out', default='auto', choices=('auto', 'on', 'off'),
                        help="CUDA: folded steps' gate+up launches write SiLU(gate) * up "
                             'themselves rather than leave it to a kernel of its own (auto: on)')
    parser.add_argument('--step-check', '--overlap-check', '--fold-check',
                        dest='step_check', action='store_true',
                        help='CUDA: also time our engine with each decode step (folded or '
                             'not, overlapped or not, and folded and overlapped with SiLU(gate) '
                             '* up apart; nf4 variant, each --batch-sizes, first --new-tokens) '
                             'and add them to the agreement check')
    parser.add_argument('--fuse-prefill', default='auto', choices=('auto', 'on', 'off'),
                        help="CUDA: the static prefill's norms, residual adds and SiLU x up "
                             'run through the compiled step kernels (FastGreedyDecoder('
                             'fuse_prefill=...); auto: its default)')
    parser.add_argument('--prefill-check', action='store_true',
                        help='CUDA: also time our engine with the other --fuse-prefill choice '
                             '(nf4 variant, each --batch-sizes, first --new-tokens) and add it '
                             'to the agreement check')
    parser.add_argument('--nf4-kernel', default='auto', choices=('auto', 'on', 'off'),
                        help="NF4 decode linears through the project's fused Triton kernel "
                             "(auto: on CUDA with Triton) or bitsandbytes' own path")
    parser.add_argument('--bnb-check', nargs='*', type=pair, default=[],
                        metavar='BATCHxTOKENS',
                        help="also time the nf4 variant with bitsandbytes' own decode "
                             'linears (no fused kernel) at these configurations, e.g. 1x80 8x80')
    parser.add_argument('--linear-rows', type=int, nargs='*', default=[],
                        help="CUDA: time one decode step's NF4 linears alone (CUDA graph of "
                             "every layer's seven) at these row counts, fused kernel against "
                             'bitsandbytes')
    parser.add_argument('--linears-only', action='store_true',
                        help='CUDA: quantize as the nf4 variant, run --linear-rows, '
                             '--lm-head-check and --attention-splits, nothing else')
    parser.add_argument('--attention-splits', type=int, nargs='*', default=[],
                        metavar='KEYS',
                        help="CUDA: time one decode step's attention alone (every layer, a CUDA "
                             'graph) with the decode attention kernel at these keys per part '
                             '(powers of two >= 16, e.g. 64 128 256 1024) against SDPA, at '
                             'each --batch-sizes')
    parser.add_argument('--lm-head-check', action='store_true',
                        help='CUDA: time lm_head in bf16 against an 8-bit (fp8, per-row '
                             'scales) decode-only copy, and their top-1 agreement on the '
                             "model's final hidden states of the agreement batch")
    parser.add_argument('--memory-processes', action='store_true',
                        help='CUDA: measure the batch-1 peak memory of nf4 and nf4-all each in '
                             'a fresh process (nothing left over from other runs)')
    parser.add_argument('--memory-only', default=None, choices=('nf4', 'nf4-all'),
                        help=argparse.SUPPRESS)  # one such process; prints JSON


def add_served_arguments(served):
    """``--server`` and what its benchmark takes."""
    served.add_argument('--server', default=None, metavar='URL',
                        help="an OpenAI-compatible server's API base, e.g. "
                             'http://gpu-box:8000/v1: time it instead (see above)')
    served.add_argument('--server-model', default='', metavar='NAME',
                        help="the served model's name (default: the server's only model)")
    served.add_argument('--server-api-key-env', default='', metavar='VAR',
                        help='the name of an environment variable holding the API key')
    served.add_argument('--server-timeout', type=float, default=300.0, metavar='S',
                        help='seconds a request may take (default %(default)s)')
    served.add_argument('--in-flight', type=int, nargs='+', default=[1, 4, 8], metavar='K',
                        help='requests at once (default: 1 4 8)')
    served.add_argument('--frames', type=int, default=16,
                        help='images per run (default %(default)s)')
    served.add_argument('--images', type=Path, default=None,
                        help='a folder of images to send (default: synthetic scenes)')
    served.add_argument('--max-new-tokens', type=int, default=256,
                        help='longest answer (default %(default)s)')
    served.add_argument('--no-local', action='store_true',
                        help='time only the server (the local engine cannot run --model here)')
