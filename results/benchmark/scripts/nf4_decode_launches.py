"""The 4B model's decode NF4 launch shapes at one row (bf16, random weights), tuned by
``NF4Matmul`` (session 11, #16). Run from the repository root on a CUDA machine with
bitsandbytes:

- ``profile``: tune, then one launch of each shape with the CUDA profiler on, for Nsight
  Compute (``gpu_ncu_nf4_cuda.txt``): ``ncu --profile-from-start off -k nf4_mma ... python3
  results/benchmark/scripts/nf4_decode_launches.py profile``;
- ``tune-repeat``: tune three times in a row in this fresh process and print each tuner's
  picks and best timings (``gpu_tuner_repeat.txt``).
"""
import argparse
import subprocess
import sys
import time

import bitsandbytes as bnb
import torch

sys.path.insert(0, '.')
from qwen_vl_perception.model.nf4_matmul import NF4Matmul  # noqa: E402
from tools.benchmarking.models import nf4_linear  # noqa: E402

SHAPES = (('k', [(1024, 2560)]), ('qkv', [(4096, 2560), (1024, 2560), (1024, 2560)]),
          ('o', [(2560, 4096)]), ('gate_up', [(9728, 2560), (9728, 2560)]),
          ('down', [(2560, 9728)]))
"""Launch name, (out, in) features of its layers."""


def layer_sets():
    torch.manual_seed(0)
    sets = []
    for name, shapes in SHAPES:
        layers = [nf4_linear(bnb, torch.nn.Linear(inputs, outputs, bias=False, device='cuda',
                                                  dtype=torch.bfloat16), torch.bfloat16, True)
                  for outputs, inputs in shapes]
        sets.append((name, layers))
    return sets


def tuned_launches(matmul, sets):
    """(name, function, x) per launch, each run (and so tuned) once."""
    launches = []
    for name, layers in sets:
        function = (matmul.group_linear_for(layers) if len(layers) > 1
                    else matmul.linear_for(layers[0]))
        x = torch.randn(1, 1, layers[0].in_features, device='cuda', dtype=torch.bfloat16)
        function(x)
        launches.append((name, function, x))
    torch.cuda.synchronize()
    return launches


def sm_clock():
    return subprocess.run(['nvidia-smi', '--query-gpu=clocks.sm', '--format=csv,noheader'],
                          capture_output=True, text=True).stdout.strip()


def profile(sets):
    matmul = NF4Matmul()
    launches = tuned_launches(matmul, sets)
    for _ in range(2):  # warm, outside the profiled range
        for _, function, x in launches:
            function(x)
    for shape in matmul.tuned_shapes():
        print(shape)
    torch.cuda.cudart().cudaProfilerStart()
    for name, function, x in launches:
        torch.cuda.nvtx.range_push(name)
        function(x)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def tune_repeat(sets, attempts=3):
    for attempt in range(attempts):
        print('attempt', attempt, 'sm clock before', sm_clock(), flush=True)
        matmul = NF4Matmul()
        start = time.perf_counter()
        tuned_launches(matmul, sets)
        print(f'  tuned in {time.perf_counter() - start:.1f} s, sm clock after', sm_clock())
        for shape in matmul.tuned_shapes():
            timed = sorted(shape['timed_ms'], key=lambda pair: pair[0])
            b = shape['shape']
            chosen = f"{b['kernel'][0]}{b['block_n']}/{b['splits']}/{b['num_warps']}/" \
                     f"{b['num_stages']}"
            print('  ', shape['widths'], shape['in_features'], 'chosen', chosen, 'best us',
                  [round(ms * 1000, 1) for ms, _ in timed[:4]], 'worst',
                  round(timed[-1][0] * 1000, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('mode', choices=('profile', 'tune-repeat'))
    mode = parser.parse_args().mode
    sets = layer_sets()
    if mode == 'profile':
        profile(sets)
    else:
        tune_repeat(sets)


if __name__ == '__main__':
    main()
