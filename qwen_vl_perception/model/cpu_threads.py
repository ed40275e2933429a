"""How many CPU threads the model's operations use on the CPU (torch's intra-op threads).

A small model's matrices are too small to split between threads: the default model (20 M
parameters) took 0.36-0.38 s of CPU time per frame with one thread and 1.9-3.7 s with two on
the project's 2-core machine while other processes ran (the threads spin waiting for each
other; the wall time grew the same way), and 1.25 s against 0.48-0.60 s per frame in the demo.
So ``0`` (auto) means one thread for a model under :data:`SMALL_MODEL_PARAMETERS`, else torch's
default (one per core; ``OMP_NUM_THREADS`` sets it). Large models on the CPU were not measured.
"""
import weakref
from typing import Optional

SMALL_MODEL_PARAMETERS = 100_000_000
"""Below this many parameters (as stored: NF4 counts its packed bytes) ``auto`` is 1 thread."""

_torch_default: Optional[int] = None
_users = weakref.WeakSet()  # the engines that set a count, until they close


def thread_count(requested: int, parameters: int, torch_default: int) -> int:
    """Threads for a model of ``parameters``: ``requested`` when positive, else the rule
    above. ``requested`` below 0 is a ValueError."""
    if requested < 0:
        raise ValueError(f'cpu_threads must be 0 (auto) or positive, not {requested}')
    if requested:
        return requested
    return 1 if parameters < SMALL_MODEL_PARAMETERS else torch_default


def cpu_threads_for(torch, model, requested: int, user) -> int:
    """The thread count for ``model`` (set now, in this thread); ``user`` (an engine) holds it
    until :func:`stop_using_cpu_threads`."""
    global _torch_default
    if _torch_default is None:  # before any engine changed it
        _torch_default = torch.get_num_threads()
    threads = thread_count(requested, sum(p.numel() for p in model.parameters()),
                           _torch_default)
    _users.add(user)
    use_cpu_threads(torch, threads)
    return threads


def use_cpu_threads(torch, threads: int) -> None:
    """torch's intra-op threads for what this thread runs next (torch keeps one count per
    thread once it has run CPU work)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def torch_default() -> Optional[int]:
    """torch's thread count before the first engine changed it (None until then)."""
    return _torch_default


def stop_using_cpu_threads(torch, user) -> None:
    """``user`` is closed: when no engine holds a count any more, torch's default is back."""
    if user in _users:
        _users.discard(user)
        if not _users and _torch_default is not None:
            use_cpu_threads(torch, _torch_default)
