"""One launch of each decode NF4 launch shape of the 4B model (one row, bf16) after tuning, for
Nsight Compute (``gpu_ncu_nf4_cuda.txt``; session 11, #16): profiling starts after the tuner,
e.g. ``ncu --profile-from-start off -k nf4_mma ... python3 results/benchmark/scripts/
ncu_nf4_launches.py``. Run from the repository root on a CUDA machine with bitsandbytes."""
import sys

import bitsandbytes as bnb
import torch

sys.path.insert(0, '.')
from qwen_vl_perception.model.nf4_matmul import NF4Matmul  # noqa: E402
from tools.benchmarking.models import nf4_linear  # noqa: E402


def make(out_features, in_features):
    linear = torch.nn.Linear(in_features, out_features, bias=False, device='cuda',
                             dtype=torch.bfloat16)
    return nf4_linear(bnb, linear, torch.bfloat16, True)


def main():
    torch.manual_seed(0)
    matmul = NF4Matmul()
    sets = (('k', [make(1024, 2560)]),
            ('qkv', [make(4096, 2560), make(1024, 2560), make(1024, 2560)]),
            ('o', [make(2560, 4096)]), ('gate_up', [make(9728, 2560), make(9728, 2560)]),
            ('down', [make(2560, 9728)]))
    launches = []
    for name, modules in sets:
        function = (matmul.group_linear_for(modules) if len(modules) > 1
                    else matmul.linear_for(modules[0]))
        x = torch.randn(1, 1, modules[0].in_features, device='cuda', dtype=torch.bfloat16)
        for _ in range(3):
            function(x)
        launches.append((name, function, x))
    torch.cuda.synchronize()
    for shape in matmul.tuned_shapes():
        print(shape)
    torch.cuda.cudart().cudaProfilerStart()
    for name, function, x in launches:
        torch.cuda.nvtx.range_push(name)
        function(x)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == '__main__':
    main()
