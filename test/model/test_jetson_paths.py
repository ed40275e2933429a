"""What a Jetson (JetPack 6) meets, checked on this machine where it can be: no Triton,
no bitsandbytes (PyPI has no Tegra build), and a torch without CUDA asked for CUDA. Start-up
must name what is missing in one line; the rest must run without Triton."""
import os
import random
import subprocess
import sys

import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

from locations import REPO_ROOT, SUPPORT_DIR  # noqa: E402
REPO = REPO_ROOT


def test_engine_and_fast_decoder_run_without_triton(tmp_path):
    pytest.importorskip('bitsandbytes')
    result = subprocess.run([sys.executable, str(SUPPORT_DIR / 'without_triton_check.py'),
                             str(tmp_path / 'model-cache')], capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert 'ok: nothing imported Triton' in result.stdout


def test_elementwise_fusion_follows_triton():
    pytest.importorskip('triton')
    from qwen_vl_perception.model.fast_decode import FastGreedyDecoder
    decoder = FastGreedyDecoder()
    assert decoder.fuses_elementwise(graphs=True)  # Triton is here
    assert not decoder.fuses_elementwise(graphs=False)
    assert not FastGreedyDecoder(fuse_elementwise=False).fuses_elementwise(graphs=True)


def _start_node(arguments, blocked=()):
    """perception_node in its own process, with the ``blocked`` modules made unimportable (as
    if not installed); returns its exit code and output."""
    pytest.importorskip('rclpy')
    code = ('import sys\n'
            f'for name in {list(blocked)!r}:\n'
            '    sys.modules[name] = None\n'
            'from qwen_vl_perception.ros.node import main\n'
            'sys.exit(main())\n')
    env = dict(os.environ, ROS_DOMAIN_ID=str(random.randint(1, 200)))
    result = subprocess.run([sys.executable, '-c', code, '--ros-args'] + arguments, env=env,
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    return result.returncode, result.stdout + result.stderr


def _one_fatal_line(output):
    lines = [line for line in output.splitlines() if 'cannot start' in line]
    assert len(lines) == 1 and 'Traceback' not in output, output
    return lines[0]


def test_nf4_without_bitsandbytes_stops_start_up_naming_it(tiny_checkpoint):
    code, output = _start_node(['-p', f'model_path:={tiny_checkpoint}', '-p', 'device:=cpu',
                                '-p', 'quantization:=nf4'], blocked=['bitsandbytes'])
    assert code == 1, output
    line = _one_fatal_line(output)
    assert 'to quantize the model to nf4 on load: bitsandbytes is not importable' in line
    assert 'Jetson' in line


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a torch without CUDA')
def test_cuda_asked_of_a_cpu_torch_stops_start_up_naming_it(tiny_checkpoint):
    code, output = _start_node(['-p', f'model_path:={tiny_checkpoint}', '-p', 'device:=cuda'])
    assert code == 1, output
    line = _one_fatal_line(output)
    assert "device 'cuda' was asked for but CUDA is not available" in line
    if not torch.version.cuda:
        assert 'is a CPU-only build: install a CUDA build of torch' in line


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_bitsandbytes_without_its_cuda_library_is_named_for_cuda_devices():
    """Here bitsandbytes loaded its CPU library, so a CUDA device finds no CUDA library: the
    check a Jetson with PyPI's bitsandbytes meets (its CUDA library fails to load, and
    bitsandbytes puts a stand-in without CUDA in its place)."""
    pytest.importorskip('bitsandbytes')
    from qwen_vl_perception.model.loading import bitsandbytes_problem
    assert bitsandbytes_problem('cpu') is None
    problem = bitsandbytes_problem('cuda')
    assert 'has no CUDA library loaded' in problem and 'build it from source' in problem


def test_the_4bit_kernel_probe_runs_where_bitsandbytes_works():
    """The call start-up makes on a CUDA device, here on the CPU (the same bitsandbytes
    functions; a GPU runs it in bitsandbytes_problem('cuda'))."""
    pytest.importorskip('bitsandbytes')
    from qwen_vl_perception.model.loading import probe_4bit_kernels
    probe_4bit_kernels('cpu')
    if torch.cuda.is_available():
        from qwen_vl_perception.model.loading import bitsandbytes_problem
        assert bitsandbytes_problem('cuda') is None


@pytest.mark.parametrize('version,refused', [
    ('2.5.0a0+872d972e41.nv24.08', True), ('2.4.1', True), ('1.13.0', True),
    ('2.6.0', False), ('2.8.0a0+nv25.6', False), ('2.13.0+cpu', False), ('3.0.0', False)])
def test_a_torch_older_than_transformers_accepts_is_named(version, refused):
    from qwen_vl_perception.model.torch_support import torch_version_problem
    problem = torch_version_problem(version)
    assert (problem is not None) == refused
    if refused:
        assert version in problem and '2.6' in problem
