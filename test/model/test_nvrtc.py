"""Run-time compilation of the CUDA NF4 kernel: every variant compiles for the GPUs it targets
where NVRTC is found (it needs no GPU); elsewhere the reason says what is missing."""
import pytest

torch = pytest.importorskip('torch')

from qwen_vl_perception.model import nf4_cuda, nvrtc  # noqa: E402
from qwen_vl_perception.model.nf4_codes import NF4_TABLE  # noqa: E402
from qwen_vl_perception.model.nf4_matmul import _CUDA_CONFIGS  # noqa: E402


def test_a_missing_compiler_is_a_reason_not_an_error(monkeypatch):
    def missing(name, *args, **kwargs):
        raise OSError(f'{name}: cannot open shared object file')
    monkeypatch.setattr(nvrtc, '_LIBRARIES', {})
    monkeypatch.setattr(nvrtc.ctypes, 'CDLL', missing)
    reason = nvrtc.unavailable_reason(need_driver=False)
    assert reason.startswith('cannot load nvrtc: ') and 'libnvrtc.so' in reason
    with pytest.raises(OSError, match='cannot load nvrtc'):
        nvrtc.compile_cubin('extern "C" __global__ void k() {}', 'k', 'sm_90')


@pytest.mark.skipif(nvrtc.unavailable_reason(need_driver=False) is not None,
                    reason='NVRTC is not installed (CUDA builds of torch bring it)')
@pytest.mark.parametrize('arch', ['sm_80', 'sm_87', 'sm_90'])
def test_every_variant_of_the_kernel_compiles(arch):
    for warps, row_tiles, pipe in _CUDA_CONFIGS:
        shape = nf4_cuda.CudaShape(warps, row_tiles, pipe)
        for n_tiles in (1, 2):
            for bf16, nested, programmatic in ((True, True, False), (False, False, False),
                                               (True, True, True)):
                source = nf4_cuda.source_for(NF4_TABLE, bf16, nested, shape, n_tiles,
                                             programmatic)
                assert nvrtc.compile_cubin(source, nf4_cuda.KERNEL_NAME, arch)[:4] == b'\x7fELF'
    with pytest.raises(RuntimeError, match='does not compile'):
        nvrtc.compile_cubin('extern "C" __global__ void k() { undefined(); }', 'k', arch)


def test_the_launch_structures_have_the_driver_api_layout():
    """cuLaunchKernelEx reads CUlaunchConfig and CUlaunchAttribute as cuda.h lays them out
    (64-bit): a wrong size or offset would launch with garbage."""
    import ctypes
    assert ctypes.sizeof(nvrtc._LaunchAttribute) == 72  # id, padding, a 64-byte union
    assert nvrtc._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(nvrtc._LaunchConfig) == 56
    assert (nvrtc._LaunchConfig.shared_bytes.offset, nvrtc._LaunchConfig.stream.offset,
            nvrtc._LaunchConfig.attributes.offset,
            nvrtc._LaunchConfig.attribute_count.offset) == (24, 32, 40, 48)
