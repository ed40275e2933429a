"""Run-time compilation of the CUDA NF4 kernel: every variant compiles for the GPUs it targets
where NVRTC is found (it needs no GPU); elsewhere the reason says what is missing."""
import os

import pytest

torch = pytest.importorskip('torch')

from qwen_vl_perception.model import nf4_cuda, nvrtc  # noqa: E402
from qwen_vl_perception.model.nf4_codes import NF4_TABLE  # noqa: E402
from qwen_vl_perception.model.nf4_matmul import _CUDA_CONFIGS, _CUDA_X_AHEAD  # noqa: E402


def test_a_missing_compiler_is_a_reason_not_an_error(monkeypatch):
    def missing(name, *args, **kwargs):
        raise OSError(f'{name}: cannot open shared object file')
    monkeypatch.setattr(nvrtc, '_LIBRARIES', {})
    monkeypatch.setattr(nvrtc.ctypes, 'CDLL', missing)
    reason = nvrtc.unavailable_reason(need_driver=False)
    assert reason.startswith('cannot load nvrtc: ') and 'libnvrtc.so' in reason
    with pytest.raises(OSError, match='cannot load nvrtc'):
        nvrtc.compile_cubin('extern "C" __global__ void k() {}', 'k', 'sm_90')


no_nvrtc = pytest.mark.skipif(nvrtc.unavailable_reason(need_driver=False) is not None,
                              reason='NVRTC is not installed (CUDA builds of torch bring it)')
KERNEL = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] += %d.0f; }'


@no_nvrtc
@pytest.mark.parametrize('arch', ['sm_80', 'sm_87', 'sm_90'])
def test_every_variant_of_the_kernel_compiles(arch):
    """Every shape the tuner tries, for the Jetson Orin (sm_87) and the H200 (sm_90); the
    default shape for sm_80 (what compiles for sm_87 compiles there)."""
    from concurrent.futures import ThreadPoolExecutor
    configs = [config + (0, False) for config in _CUDA_CONFIGS]
    configs += [config + (0, True) for config in _CUDA_X_AHEAD]  # x loaded a block ahead
    configs = configs[:1] if arch == 'sm_80' else configs
    sources = [nf4_cuda.source_for(NF4_TABLE, bf16, nested, nf4_cuda.CudaShape(*config), n_tiles,
                                   programmatic)
               for config in configs for n_tiles in (1, 2)
               for bf16, nested, programmatic in ((True, True, False), (False, False, False),
                                                  (True, True, True))]
    with ThreadPoolExecutor(2) as pool:  # NVRTC runs outside the GIL
        cubins = list(pool.map(lambda source: nvrtc.compile_cubin(
            source, nf4_cuda.KERNEL_NAME, arch, cache=False), sources))
    assert len(cubins) == 6 * len(configs)
    assert all(cubin[:4] == b'\x7fELF' for cubin in cubins)
    with pytest.raises(RuntimeError, match='does not compile'):
        nvrtc.compile_cubin('extern "C" __global__ void k() { undefined(); }', 'k', arch,
                            cache=False)


@no_nvrtc
@pytest.mark.parametrize('arch', ['sm_87', 'sm_90'])
def test_the_folded_variants_compile(arch):
    """The decode step's folded launches (RMSNorm or SiLU x up into x, the residual add and
    its sums of squares out, with the next norm's x beside it, the norm's scale alone, SiLU
    x up out of gate+up), bf16 and fp16, with programmatic launch on sm_90; an unknown fold
    and SiLU x up out of unpaired tiles are refused."""
    from concurrent.futures import ThreadPoolExecutor
    sources = [nf4_cuda.source_for(NF4_TABLE, bf16, True, nf4_cuda.CudaShape(*config), n_tiles,
                                   arch == 'sm_90', False, fold, residual, norm_out)
               for config in _CUDA_CONFIGS[:2] for n_tiles in (1, 2) for bf16 in (True, False)
               for fold, residual, norm_out in (
                   (nf4_cuda.FOLD_NORM, False, False), (nf4_cuda.FOLD_NONE, True, False),
                   (nf4_cuda.FOLD_ACT, True, False), (nf4_cuda.FOLD_NONE, True, True),
                   (nf4_cuda.FOLD_SCALE, False, False))]
    # gate+up writing SiLU(gate) * up (row tiles in pairs), scaled by the norm or not
    sources += [nf4_cuda.source_for(NF4_TABLE, bf16, True, nf4_cuda.CudaShape(4, 2, 4),
                                    n_tiles, arch == 'sm_90', False, fold, act_out=True)
                for n_tiles in (1, 2) for bf16 in (True, False)
                for fold in (nf4_cuda.FOLD_NONE, nf4_cuda.FOLD_SCALE)]
    with ThreadPoolExecutor(2) as pool:
        cubins = list(pool.map(lambda source: nvrtc.compile_cubin(
            source, nf4_cuda.KERNEL_NAME, arch, cache=False), sources))
    assert len(cubins) == 48 and all(cubin[:4] == b'\x7fELF' for cubin in cubins)
    with pytest.raises(ValueError, match='even row_tiles'):
        nf4_cuda.source_for(NF4_TABLE, True, True, nf4_cuda.CudaShape(4, 1, 4), 1, act_out=True)
    with pytest.raises(ValueError, match='x_fold'):
        nf4_cuda.source_for(NF4_TABLE, True, True, nf4_cuda.CudaShape(), 1, x_fold=4)
    with pytest.raises(ValueError, match='residual'):
        nf4_cuda.source_for(NF4_TABLE, True, True, nf4_cuda.CudaShape(), 1, norm_out=True)


@no_nvrtc
@pytest.mark.parametrize('arch', ['sm_87', 'sm_90'])
def test_the_variants_with_bf16_x_and_out_around_an_fp16_product_compile(arch):
    """A model of bf16 layers with fp16 compute (the article's): every shape the tuner tries,
    plain and nested absmax, programmatic launch on sm_90; the decode step's folds (the
    residual launch with the next norm's x, the scaled q+k+v and gate+up, SiLU x up into
    down's x or out of gate+up); with bf16 compute or the norm folded into x it is refused."""
    from concurrent.futures import ThreadPoolExecutor
    configs = [config + (0, False) for config in _CUDA_CONFIGS]
    configs += [config + (0, True) for config in _CUDA_X_AHEAD]
    sources = [nf4_cuda.source_for(NF4_TABLE, False, nested, nf4_cuda.CudaShape(*config),
                                   n_tiles, arch == 'sm_90', io_bf16=True)
               for config in configs for n_tiles in (1, 2) for nested in (True, False)]
    folds = [nf4_cuda.source_for(NF4_TABLE, False, True, nf4_cuda.CudaShape(4, 2, 4), n_tiles,
                                 arch == 'sm_90', False, fold, residual, norm_out, act_out,
                                 io_bf16=True)
             for n_tiles in (1, 2) for fold, residual, norm_out, act_out in (
                 (nf4_cuda.FOLD_NONE, True, True, False),
                 (nf4_cuda.FOLD_SCALE, False, False, False),
                 (nf4_cuda.FOLD_SCALE, False, False, True),
                 (nf4_cuda.FOLD_ACT, True, True, False))]
    with ThreadPoolExecutor(2) as pool:
        cubins = list(pool.map(lambda source: nvrtc.compile_cubin(
            source, nf4_cuda.KERNEL_NAME, arch, cache=False), sources + folds))
    assert len(cubins) == 4 * len(configs) + 8
    assert all(cubin[:4] == b'\x7fELF' for cubin in cubins)
    for refused in ({'bf16': True}, {'x_fold': nf4_cuda.FOLD_NORM}):
        arguments = {'bf16': False, **refused}
        with pytest.raises(ValueError, match='fp16 compute and no norm folded'):
            nf4_cuda.source_for(NF4_TABLE, arguments.pop('bf16'), True, nf4_cuda.CudaShape(), 1,
                                io_bf16=True, **arguments)


@no_nvrtc
def test_the_clustered_variants_compile_for_sm_90():
    """Split reductions through a thread-block cluster's shared memory (sm_90 only): plain,
    the residual launch with the next norm's x, gate+up writing SiLU x up, with and without
    programmatic launch; their static shared memory is counted."""
    shape = nf4_cuda.CudaShape(4, 2, 4, cluster=True)
    assert nf4_cuda.shared_bytes(shape, 2) == nf4_cuda.shared_bytes(
        nf4_cuda.CudaShape(4, 2, 4), 2) + 2048
    sources = [nf4_cuda.source_for(NF4_TABLE, bf16, True, shape, n_tiles, programmatic, False,
                                   fold, residual, norm_out, act_out)
               for n_tiles in (1, 2) for bf16 in (True, False) for programmatic in (False, True)
               for fold, residual, norm_out, act_out in (
                   (nf4_cuda.FOLD_NONE, False, False, False),
                   (nf4_cuda.FOLD_NONE, True, True, False),
                   (nf4_cuda.FOLD_SCALE, False, False, True))]
    assert all('#define CLUSTER 1' in source for source in sources)
    cubins = [nvrtc.compile_cubin(source, nf4_cuda.KERNEL_NAME, 'sm_90', cache=False)
              for source in sources]
    assert len(cubins) == 24 and all(cubin[:4] == b'\x7fELF' for cubin in cubins)


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


@pytest.fixture
def counted(monkeypatch):
    """NVRTC's compiles, counted (the real compiler behind)."""
    calls = []
    compiled = nvrtc._compiled

    def counting(*args):
        calls.append(args[1:3])
        return compiled(*args)
    monkeypatch.setattr(nvrtc, '_compiled', counting)
    return calls


@no_nvrtc
def test_compiled_kernels_are_kept_on_disk_and_reused(tmp_path, monkeypatch, counted):
    folder = tmp_path / 'kernels'
    monkeypatch.setenv(nvrtc.KERNEL_CACHE_ENV, str(folder))
    first = nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90')
    assert first[:4] == b'\x7fELF' and len(counted) == 1
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].name.startswith('k-sm_90-')
    assert nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90') == first and len(counted) == 1
    # another source, architecture or option: another cubin
    nvrtc.compile_cubin(KERNEL % 2, 'k', 'sm_90')
    nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_87')
    nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90', ['-DX=1'])
    assert len(counted) == 4 and len(list(folder.iterdir())) == 4
    # a damaged file is compiled again and replaced
    data = bytearray(files[0].read_bytes())
    data[-10] ^= 0xFF
    files[0].write_bytes(bytes(data))
    assert nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90') == first and len(counted) == 5
    assert nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90') == first and len(counted) == 5
    files[0].write_bytes(b'')  # torn
    assert nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90') == first and len(counted) == 6
    # another NVRTC: compiled again
    monkeypatch.setattr(nvrtc, 'nvrtc_version', lambda: (99, 0))
    assert nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90') == first and len(counted) == 7
    assert not [path for path in folder.iterdir() if path.name.startswith('.')]  # no leftovers


@no_nvrtc
def test_the_kernel_cache_can_be_off_and_a_read_only_one_is_warned_about_once(
        tmp_path, monkeypatch, counted):
    monkeypatch.setenv(nvrtc.KERNEL_CACHE_ENV, 'off')
    assert nvrtc.kernel_cache_dir() is None
    nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90')
    nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90')
    assert len(counted) == 2 and not list(tmp_path.iterdir())
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    blocker.chmod(0o644)
    monkeypatch.setenv(nvrtc.KERNEL_CACHE_ENV, str(blocker / 'kernels'))  # cannot be made
    monkeypatch.setattr(nvrtc, '_cache_warned', [])
    with pytest.warns(RuntimeWarning, match='cannot keep compiled kernels in .*a-file'):
        assert nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90')[:4] == b'\x7fELF'
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # once
        nvrtc.compile_cubin(KERNEL % 2, 'k', 'sm_90')
    assert len(counted) == 4


@no_nvrtc
def test_a_kernel_cache_others_can_change_is_not_used(tmp_path, monkeypatch, counted):
    """As the default model's cache: a folder (or one above it) that group or others can
    write is not used at all; a cached file they can write is compiled again and replaced."""
    folder = tmp_path / 'shared' / 'kernels'
    folder.mkdir(parents=True)
    for made in (folder.parent, folder):  # whatever the umask
        made.chmod(0o755)
    monkeypatch.setenv(nvrtc.KERNEL_CACHE_ENV, str(folder))
    monkeypatch.setattr(nvrtc, '_cache_warned', [])
    first = nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90')
    cached, = folder.iterdir()
    assert cached.stat().st_mode & 0o777 == 0o644
    cached.chmod(0o666)
    assert nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90') == first and len(counted) == 2
    assert cached.stat().st_mode & 0o777 == 0o644  # replaced
    assert nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90') == first and len(counted) == 2
    (tmp_path / 'shared').chmod(0o777)  # someone else could swap the folder below
    try:
        with pytest.warns(RuntimeWarning, match='not using the kernel cache .* can be changed '
                                                'by other users'):
            assert nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90') == first
        assert len(counted) == 3
        fresh = tmp_path / 'shared' / 'not-yet'  # not made yet: the folder above decides
        monkeypatch.setenv(nvrtc.KERNEL_CACHE_ENV, str(fresh / 'kernels'))
        with pytest.warns(RuntimeWarning, match='not using the kernel cache'):
            nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90')
        assert not fresh.exists() and len(counted) == 4
    finally:
        (tmp_path / 'shared').chmod(0o755)


@no_nvrtc
def test_the_folders_the_kernel_cache_makes_pass_its_checks_under_any_umask(
        tmp_path, monkeypatch, counted):
    """With a umask of 002 (Ubuntu's for ordinary users) the folders made for the cache are
    0755 all the way down, so the next start uses them."""
    import warnings
    folder = tmp_path / 'home' / '.cache' / 'qvp' / 'kernels'
    monkeypatch.setenv(nvrtc.KERNEL_CACHE_ENV, str(folder))
    monkeypatch.setattr(nvrtc, '_cache_warned', [])
    old = os.umask(0o002)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90')
            nvrtc.compile_cubin(KERNEL % 1, 'k', 'sm_90')
    finally:
        os.umask(old)
    assert len(counted) == 1
    for made in (folder, *list(folder.parents)[:3]):
        assert made.stat().st_mode & 0o777 == 0o755, made


def test_the_kernel_cache_defaults_to_the_model_cache(tmp_path, monkeypatch):
    from qwen_vl_perception.model.default_model import CACHE_ENV
    monkeypatch.delenv(nvrtc.KERNEL_CACHE_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert nvrtc.kernel_cache_dir() == tmp_path / 'kernels'
    monkeypatch.setenv(nvrtc.KERNEL_CACHE_ENV, '~/k')
    assert str(nvrtc.kernel_cache_dir()).endswith('/k') and '~' not in str(
        nvrtc.kernel_cache_dir())
