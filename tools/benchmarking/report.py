"""What the benchmark writes and prints: the results' JSON and environment, rows and tables."""
import json
import platform
import sys

from qwen_vl_perception.model.torch_support import require

from .arguments import parse_pair


def new_results(args, torch, device):
    """The local benchmark's results before any run."""
    return {'command': ' '.join(sys.argv), 'environment': environment(torch, device),
            'architecture': 'tiny' if args.tiny else ('checkpoint' if args.model
                                                      else 'Qwen3-VL-4B (random weights)'),
            'image': 'x'.join(str(value) for value in parse_pair(args.image)), 'runs': [],
            'agreement': [], 'errors': [], 'allocated_gb': {}, 'profile_ms_per_step': {}}


def environment(torch, device):
    """Versions and the device the figures were measured with."""
    info = {'python': platform.python_version(), 'torch': torch.__version__,
            'transformers': require('transformers', '').__version__, 'device': str(device)}
    try:
        info['bitsandbytes'] = require('bitsandbytes', '').__version__
    except ImportError:
        info['bitsandbytes'] = None
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
        info['cuda'] = torch.version.cuda
    else:
        info['cpu'] = platform.processor() or platform.machine()
        info['threads'] = torch.get_num_threads()
    return info


def write_json(path, results) -> None:
    """``results`` as indented JSON at ``path`` (its folder made); nothing without a path."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + '\n')


def row_text(run):
    """One timed run as the line printed when it is done."""
    peak = f"{run['peak_gb']:.2f}" if run.get('peak_gb') is not None else '-'
    return (f"{run['engine']:8} {run['label'][:44]:44} b{run['batch']:<2} n{run['new_tokens']:<4}"
            f" prefill {run['prefill_ms']:8.1f} ms  decode {run['decode_ms_per_token']:7.2f}"
            f" ms/tok  frame {run['frame_s']:7.3f} s  {run['frames_per_s']:7.2f} frames/s"
            f"  peak {peak} GB")


def table(results):
    """The local runs as a Markdown table."""
    header = ('| engine | weights | batch | tokens | prefill ms | decode ms/token | frame s '
              '| frames/s | peak GB |\n|---|---|---|---|---|---|---|---|---|')
    lines = [header]
    for run in results['runs']:
        peak = f"{run['peak_gb']:.2f}" if run.get('peak_gb') is not None else '-'
        engine = 'model.generate' if run['engine'] == 'generate' else 'FastGreedyDecoder'
        lines.append(f"| {engine} | {run['label']} | {run['batch']} | {run['new_tokens']} | "
                     f"{run['prefill_ms']:.1f} | {run['decode_ms_per_token']:.2f} | "
                     f"{run['frame_s']:.3f} | {run['frames_per_s']:.2f} | {peak} |")
    return '\n'.join(lines)


def served_row(figures) -> str:
    """One served or local run of ``--server`` as the line printed when it is done."""
    what = ('served, in flight' if figures.backend == 'openai' else 'local, batch')
    return (f'{what:18} {figures.concurrency:2}: {figures.frames_per_s:6.2f} frames/s, latency '
            f'mean {figures.latency_ms_mean:7.0f} ms, p50 {figures.latency_ms_p50:7.0f} ms, '
            f'max {figures.latency_ms_max:7.0f} ms, {figures.tokens_mean:.0f} tokens/answer')


def served_table(results) -> str:
    """The runs of ``--server`` as a Markdown table."""
    lines = ['| engine | in flight / batch | frames/s | latency mean ms | p50 ms | max ms | '
             'tokens/answer |', '|---|---|---|---|---|---|---|']
    for run in results['runs']:
        engine = 'served (openai backend)' if run['backend'] == 'openai' else 'local engine'
        lines.append(f"| {engine} | {run['concurrency']} | {run['frames_per_s']:.2f} | "
                     f"{run['latency_ms_mean']:.0f} | {run['latency_ms_p50']:.0f} | "
                     f"{run['latency_ms_max']:.0f} | {run['tokens_mean']:.0f} |")
    return '\n'.join(lines)
