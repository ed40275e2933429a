"""The CUDA graphs the decoders keep, and the one lock around capturing them and dropping what
they use.

A captured graph replays with the addresses it was captured with, among them cuBLAS's
per-stream workspaces, which torch keeps for the process's life. Dropping those workspaces
(``torch_support.release_cuda_memory``) is safe only while no kept graph can replay, and not
while a graph is being captured in another thread: :func:`capturing` registers the graph's
holder and holds the lock, :func:`library_workspaces_unused` says whether none is kept (call it
with :data:`LOCK` held, and drop the workspaces before letting go). Graphs captured outside the
project (other libraries in the same process) are not seen here.
"""
import contextlib
import threading
import weakref

LOCK = threading.RLock()
_HOLDERS = weakref.WeakSet()  # objects with a ``graph`` attribute: a captured graph or None


@contextlib.contextmanager
def capturing(holder):
    """Hold while warming up and capturing the graph ``holder.graph`` will keep."""
    with LOCK:
        _HOLDERS.add(holder)
        yield


def library_workspaces_unused() -> bool:
    """True when no holder keeps a captured graph (its ``graph`` is None or it is gone)."""
    with LOCK:
        return all(getattr(holder, 'graph', None) is None for holder in list(_HOLDERS))
