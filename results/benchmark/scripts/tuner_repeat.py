"""The NF4 tuner three times in a row in one fresh process, same weights: does it pick the same
launch shapes with the GPU just started as later? (``gpu_tuner_repeat.txt``; session 11, #16.)
Run from the repository root on a CUDA machine with bitsandbytes."""
import subprocess
import sys
import time

import bitsandbytes as bnb
import torch

sys.path.insert(0, '.')
from qwen_vl_perception.model.nf4_matmul import NF4Matmul  # noqa: E402
from tools.benchmarking.models import nf4_linear  # noqa: E402


def clocks():
    return subprocess.run(['nvidia-smi', '--query-gpu=clocks.sm', '--format=csv,noheader'],
                          capture_output=True, text=True).stdout.strip()


def make(out_features, in_features):
    linear = torch.nn.Linear(in_features, out_features, bias=False, device='cuda',
                             dtype=torch.bfloat16)
    return nf4_linear(bnb, linear, torch.bfloat16, True)


def main():
    torch.manual_seed(0)
    sets = {'k': [make(1024, 2560)],
            'qkv': [make(4096, 2560), make(1024, 2560), make(1024, 2560)],
            'o': [make(2560, 4096)], 'gate_up': [make(9728, 2560), make(9728, 2560)],
            'down': [make(2560, 9728)]}
    torch.cuda.synchronize()
    for attempt in range(3):
        print('attempt', attempt, 'sm clock before', clocks(), flush=True)
        matmul = NF4Matmul()
        start = time.perf_counter()
        for modules in sets.values():
            function = (matmul.group_linear_for(modules) if len(modules) > 1
                        else matmul.linear_for(modules[0]))
            function(torch.randn(1, 1, modules[0].in_features, device='cuda',
                                 dtype=torch.bfloat16))
        torch.cuda.synchronize()
        print(f'  tuned in {time.perf_counter() - start:.1f} s, sm clock after', clocks())
        for shape in matmul.tuned_shapes():
            timed = sorted(shape['timed_ms'], key=lambda pair: pair[0])
            b = shape['shape']
            chosen = f"{b['kernel'][0]}{b['block_n']}/{b['splits']}/{b['num_warps']}/" \
                     f"{b['num_stages']}"
            print('  ', shape['widths'], shape['in_features'], 'chosen', chosen, 'best us',
                  [round(ms * 1000, 1) for ms, _ in timed[:4]], 'worst',
                  round(timed[-1][0] * 1000, 1))


if __name__ == '__main__':
    main()
