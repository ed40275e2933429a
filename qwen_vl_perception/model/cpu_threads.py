"""How many CPU threads the model's operations use on the CPU (torch's intra-op threads).

A small model's matrices are too small to split between threads: the default model (20 M
parameters) took 0.36-0.38 s of CPU time per frame with one thread and 1.9-3.7 s with two on
the project's 2-core machine while other processes ran (the threads spin waiting for each
other; the wall time grew the same way), and 1.25 s against 0.48-0.60 s per frame in the demo.
So ``0`` (auto) means one thread for a model under :data:`SMALL_MODEL_PARAMETERS`, else torch's
default (one per core; ``OMP_NUM_THREADS`` sets it). Large models on the CPU were not measured.
"""
from typing import Optional

SMALL_MODEL_PARAMETERS = 100_000_000
"""Below this many parameters (as stored: NF4 counts its packed bytes) ``auto`` is 1 thread."""

_torch_default: Optional[int] = None


def thread_count(requested: int, parameters: int, torch_default: int) -> int:
    """Threads for a model of ``parameters``: ``requested`` when positive, else the rule
    above. ``requested`` below 0 is a ValueError."""
    if requested < 0:
        raise ValueError(f'cpu_threads must be 0 (auto) or positive, not {requested}')
    if requested:
        return requested
    return 1 if parameters < SMALL_MODEL_PARAMETERS else torch_default


def use_cpu_threads(torch, model, requested: int = 0) -> int:
    """Set torch's intra-op threads for ``model`` on the CPU (process-wide) and return them."""
    global _torch_default
    if _torch_default is None:  # before any engine changed it
        _torch_default = torch.get_num_threads()
    threads = thread_count(requested, sum(p.numel() for p in model.parameters()),
                           _torch_default)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
