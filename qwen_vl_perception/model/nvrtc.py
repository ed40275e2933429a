"""CUDA C++ kernels compiled at run time by NVRTC and launched through the CUDA driver, with
ctypes only (no CUDA toolkit, no compiler on the robot: CUDA builds of torch bring NVRTC).

:func:`compile_cubin` turns source into a cubin for one architecture (it needs NVRTC, not a
GPU), kept on disk for the next start (:func:`kernel_cache_dir`); :class:`Kernel` loads one
onto a device and launches it on torch's current stream, so that CUDA-graph capture records it
like any other kernel. :func:`unavailable_reason` says why
not, where NVRTC or the driver cannot be found. ``programmatic=True`` launches with programmatic
dependent launch (compute capability 9.0+, :func:`programmatic_launch_supported`): the kernel
may start before the previous kernel in the stream ends, and every one of its CTAs must execute
``griddepcontrol.wait`` before it reads anything an earlier kernel writes or writes anything an
earlier kernel reads (then each kernel ends after the one before it, and the order holds along
the stream).
"""
import ctypes
import glob
import hashlib
import os
import stat
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from .cache_trust import make_folders, untrusted_above, untrusted_entry, untrusted_status
from .torch_support import require_torch

_LIBRARIES: Dict[str, object] = {}
_LIBRARY_NAMES: Dict[str, str] = {}


def _load(kind: str):
    """NVRTC or the driver library; the first name that loads, then the copies in pip's
    ``nvidia`` packages (CUDA builds of torch depend on them)."""
    if kind in _LIBRARIES:
        return _LIBRARIES[kind]
    if kind == 'cuda':
        names = ['libcuda.so.1', 'libcuda.so']
    else:
        names = []
        for entry in sys.path:
            names += sorted(glob.glob(os.path.join(entry, 'nvidia', '*', 'lib', 'libnvrtc.so*')))
            names += sorted(glob.glob(os.path.join(entry, 'nvidia', 'cuda_nvrtc', 'lib',
                                                   'libnvrtc.so*')))
        names = [name for name in names if 'builtins' not in name and '.alt.' not in name]
        names += [f'libnvrtc.so.{major}' for major in (13, 12)] + ['libnvrtc.so']
    errors = []
    for name in names:
        try:
            if os.sep in name:  # NVRTC opens its builtins library by name: load it first
                for builtins in sorted(glob.glob(os.path.join(os.path.dirname(name),
                                                              'libnvrtc-builtins.so*'))):
                    if '.alt.' not in builtins:
                        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            library = ctypes.CDLL(name)
        except OSError as error:
            errors.append(str(error))
            continue
        _LIBRARIES[kind] = library
        _LIBRARY_NAMES[kind] = name
        return library
    raise OSError(f'cannot load {kind}: ' + ('; '.join(errors[:3]) or 'not found'))


def unavailable_reason(need_driver: bool = True) -> Optional[str]:
    """None when NVRTC (and, with ``need_driver``, the CUDA driver) can be loaded."""
    try:
        _load('nvrtc')
        if need_driver:
            _load('cuda')
    except OSError as error:
        return str(error)
    return None


KERNEL_CACHE_ENV = 'QWEN_VL_PERCEPTION_KERNEL_CACHE'
"""A folder for compiled kernels (default: ``kernels/`` in the model cache, ``cache_root()``);
``off`` (or ``0``, ``none``, empty) compiles every time."""
_CACHE_MAGIC = b'QVPCUBIN1\n'
_cache_warned = []


def kernel_cache_dir() -> Optional[Path]:
    """Where compiled cubins are kept, or None when the cache is off."""
    configured = os.environ.get(KERNEL_CACHE_ENV)
    if configured is None:
        from .default_model import cache_root
        return cache_root() / 'kernels'
    if configured.strip().lower() in ('', '0', 'off', 'none', 'false'):
        return None
    return Path(configured).expanduser()


def nvrtc_version() -> Tuple[int, int]:
    """NVRTC's (major, minor)."""
    nvrtc = _load('nvrtc')
    major, minor = ctypes.c_int(), ctypes.c_int()
    _nvrtc_check(nvrtc, nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
    return major.value, minor.value


def compile_cubin(source: str, name: str, arch: str, options: Sequence[str] = (),
                  cache: bool = True) -> bytes:
    """The cubin of ``source`` for ``arch`` (e.g. ``'sm_90'``); RuntimeError with NVRTC's log
    if it does not compile. With ``cache`` (and the cache on: :func:`kernel_cache_dir`) a
    cubin compiled before by the same NVRTC from the same source and options is read from
    disk (~0.6-1 s saved per kernel variant; a node compiles 6-12 at start-up). Only a cache
    no one else can have changed is used (as the default model's: :mod:`cache_trust`); a file
    that does not check out is compiled again and replaced; a cache that cannot be used or
    written is warned about once and left alone."""
    folder = kernel_cache_dir() if cache else None
    if folder is not None:
        reason = _untrusted_folder(folder)
        if reason is not None:
            _warn_once(('untrusted', folder), f'not using the kernel cache {folder}: {reason} '
                       f'(set {KERNEL_CACHE_ENV} to a folder of your own, or to off)')
            folder = None
    if folder is None:
        return _compiled(source, name, arch, options)
    fields = [repr(nvrtc_version()), _library_identity('nvrtc'), arch, *options, name, source]
    key = hashlib.sha256(repr(fields).encode()).hexdigest()[:40]
    path = folder / f'{name}-{arch}-{key}.cubin'
    cubin = _read_cached(path)
    if cubin is not None:
        return cubin
    cubin = _compiled(source, name, arch, options)
    _write_cached(path, cubin)
    return cubin


def _library_identity(kind: str) -> str:
    """The loaded library's file, size and modification time (NVRTC's version says major and
    minor only: an update within them may change its code), or its name where the file is
    not found."""
    _load(kind)
    name = _LIBRARY_NAMES[kind]
    path = name if os.sep in name else _mapped_path(os.path.basename(name).split('.so')[0])
    try:
        info = os.stat(path)
    except (OSError, TypeError):
        return name
    return f'{os.path.realpath(path)}:{info.st_size}:{info.st_mtime_ns}'


def _mapped_path(stem: str) -> Optional[str]:
    """The file of a library this process has mapped whose name starts with ``stem``."""
    try:
        with open('/proc/self/maps') as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith(stem + '.so'):
                    return path
    except OSError:
        pass
    return None


def _untrusted_folder(folder: Path) -> Optional[str]:
    """Why ``folder`` (or, while it does not exist, the folder it will be made in) could be
    changed by someone else, or None."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if existing == folder:
            return untrusted_entry(folder, stat.S_ISDIR) or untrusted_above(folder.parent)
        return untrusted_above(existing)
    except OSError as error:
        return str(error)


def _read_cached(path: Path) -> Optional[bytes]:
    try:  # opened without following a link; checked as opened
        handle = os.open(path, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0))
    except OSError:
        return None
    with os.fdopen(handle, 'rb') as stream:
        if untrusted_status(path, os.fstat(stream.fileno())) is not None:
            return None  # compiled again, and replaced in this (trusted) folder
        data = stream.read()
    header = len(_CACHE_MAGIC) + 32
    cubin = data[header:]
    if (data[:len(_CACHE_MAGIC)] != _CACHE_MAGIC or cubin[:4] != b'\x7fELF'
            or hashlib.sha256(cubin).digest() != data[len(_CACHE_MAGIC):header]):
        return None  # torn or damaged: compiled again and replaced
    return cubin


def _write_cached(path: Path, cubin: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed into place), so that a
    concurrent reader sees the old file, none, or this one; 0644 in 0755 folders (a cache
    filled by root can be shared)."""
    try:
        make_folders(path.parent)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix='.' + path.name)
        try:
            with os.fdopen(handle, 'wb') as stream:
                stream.write(_CACHE_MAGIC + hashlib.sha256(cubin).digest() + cubin)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:
        _warn_once(('unwritable', path.parent),
                   f'cannot keep compiled kernels in {path.parent} ({error}); they are '
                   f'compiled at every start (set {KERNEL_CACHE_ENV} to a writable folder, '
                   'or to off)')


def _warn_once(key, message: str) -> None:
    if key not in _cache_warned:
        _cache_warned.append(key)
        warnings.warn(message, RuntimeWarning)


def _compiled(source: str, name: str, arch: str, options: Sequence[str]) -> bytes:
    nvrtc = _load('nvrtc')
    program = ctypes.c_void_p()
    _nvrtc_check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(),
                                                 f'{name}.cu'.encode(), 0, None, None))
    try:
        flags = [f'--gpu-architecture={arch}', '--std=c++17', *options]
        array = (ctypes.c_char_p * len(flags))(*[flag.encode() for flag in flags])
        result = nvrtc.nvrtcCompileProgram(program, len(flags), array)
        if result != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, log)
            raise RuntimeError(f'{name} does not compile:\n{log.value.decode(errors="replace")}')
        size = ctypes.c_size_t()
        _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBIN(program, cubin))
        return cubin.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def _nvrtc_check(nvrtc, result: int) -> None:
    if result != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f'NVRTC: {nvrtc.nvrtcGetErrorString(result).decode()}')


def _driver_check(result: int, what: str) -> None:
    if result != 0:
        driver = _load('cuda')
        text = ctypes.c_char_p()
        driver.cuGetErrorString(result, ctypes.byref(text))
        raise RuntimeError(f'{what}: CUDA driver error {result} '
                           f'({(text.value or b"?").decode()})')


_CLUSTER_DIMENSION = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION: x, y, z
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte union
    _fields_ = [('id', ctypes.c_int), ('pad', ctypes.c_char * 4),
                ('value', ctypes.c_uint * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [('grid', ctypes.c_uint * 3), ('block', ctypes.c_uint * 3),
                ('shared_bytes', ctypes.c_uint), ('stream', ctypes.c_void_p),
                ('attributes', ctypes.POINTER(_LaunchAttribute)),
                ('attribute_count', ctypes.c_uint)]


def programmatic_launch_supported(device) -> bool:
    """Whether kernels on ``device`` can be launched with programmatic dependent launch: compute
    capability 9.0 or newer and a CUDA 12.3+ driver (``cuLaunchKernelEx``; graph capture of
    programmatic launches)."""
    torch = require_torch()
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        driver = _load('cuda')
    except OSError:
        return False
    version = ctypes.c_int()
    if not hasattr(driver, 'cuLaunchKernelEx') or driver.cuDriverGetVersion(
            ctypes.byref(version)) != 0:
        return False
    return version.value >= 12030


def cluster_launch_supported(device) -> bool:
    """Whether kernels on ``device`` can be launched in thread-block clusters: compute
    capability 9.0 or newer and a driver with ``cuLaunchKernelEx`` (CUDA 12.0+)."""
    torch = require_torch()
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        driver = _load('cuda')
    except OSError:
        return False
    version = ctypes.c_int()
    if not hasattr(driver, 'cuLaunchKernelEx') or driver.cuDriverGetVersion(
            ctypes.byref(version)) != 0:
        return False
    return version.value >= 12000


class Kernel:
    """One ``extern "C"`` kernel of a cubin, loaded on CUDA device ``device``."""

    def __init__(self, cubin: bytes, name: str, device):
        torch = require_torch()
        self.device = torch.device(device)
        driver = _load('cuda')
        self._module, self._function = ctypes.c_void_p(), ctypes.c_void_p()
        with torch.cuda.device(self.device):  # setting the device makes its context current
            torch.cuda.init()
            _driver_check(driver.cuModuleLoadData(ctypes.byref(self._module), cubin),
                          f'loading {name}')
            _driver_check(driver.cuModuleGetFunction(ctypes.byref(self._function),
                                                     self._module, name.encode()),
                          f'finding {name}')
        self.name = name

    def attribute(self, attribute: int) -> int:
        """A ``CUfunction_attribute`` value (e.g. 4: registers per thread)."""
        value = ctypes.c_int()
        _driver_check(_load('cuda').cuFuncGetAttribute(ctypes.byref(value), attribute,
                                                       self._function), 'attribute')
        return value.value

    def __call__(self, grid, block, arguments, shared_bytes: int = 0,
                 programmatic: bool = False, cluster=None) -> None:
        """Launch on the current stream of the kernel's device. ``arguments``: tensors (their
        data pointers), ``None`` (a null pointer), ints (``int``), floats (``float``), in the
        kernel's order.
        ``programmatic``: with programmatic dependent launch (see the module's text).
        ``cluster``: the CTAs per thread-block cluster, (x, y, z) dividing the grid (compute
        capability 9.0+; :func:`cluster_launch_supported`)."""
        torch = require_torch()
        values = []
        for argument in arguments:
            if isinstance(argument, torch.Tensor):
                values.append(ctypes.c_void_p(argument.data_ptr()))
            elif argument is None:
                values.append(ctypes.c_void_p(None))
            elif isinstance(argument, bool) or not isinstance(argument, (int, float)):
                raise TypeError(f'unsupported kernel argument {type(argument).__name__}')
            elif isinstance(argument, int):
                values.append(ctypes.c_int(argument))
            else:
                values.append(ctypes.c_float(argument))
        pointers = (ctypes.c_void_p * len(values))(
            *[ctypes.cast(ctypes.byref(value), ctypes.c_void_p) for value in values])
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        stream = torch.cuda.current_stream(self.device).cuda_stream
        attributes = []
        if programmatic:
            attributes.append(_LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION,
                                               value=(ctypes.c_uint * 16)(1)))
        if cluster is not None:
            cluster = tuple(cluster) + (1,) * (3 - len(cluster))
            if any(size % part for size, part in zip(grid, cluster)):
                raise ValueError(f'clusters of {cluster} CTAs do not divide the grid {grid}')
            attributes.append(_LaunchAttribute(id=_CLUSTER_DIMENSION,
                                               value=(ctypes.c_uint * 16)(*cluster)))
        if attributes:
            array = (_LaunchAttribute * len(attributes))(*attributes)
            config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
                                   shared_bytes, ctypes.c_void_p(stream),
                                   ctypes.cast(array, ctypes.POINTER(_LaunchAttribute)),
                                   len(attributes))
            with torch.cuda.device(self.device):
                _driver_check(_load('cuda').cuLaunchKernelEx(
                    ctypes.byref(config), self._function, pointers, None),
                    f'launching {self.name}'
                    + (' (programmatic)' if programmatic else '')
                    + (f' (clusters of {cluster})' if cluster is not None else ''))
            return
        with torch.cuda.device(self.device):  # the launch goes to the current context
            _driver_check(_load('cuda').cuLaunchKernel(
                self._function, *[ctypes.c_uint(value) for value in grid],
                *[ctypes.c_uint(value) for value in block], ctypes.c_uint(shared_bytes),
                ctypes.c_void_p(stream), pointers, None), f'launching {self.name}')
