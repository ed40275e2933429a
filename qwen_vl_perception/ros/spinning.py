"""Spin nodes in a background thread and stop without racing rclpy's shutdown.

``Executor.shutdown()`` destroys the executor's guard condition while a spinning thread (or a
multi-threaded executor's worker) may still trigger it, which raises ``InvalidHandle ...
destruction was requested`` in that thread. Here one thread calls ``spin_once`` on a
single-threaded executor until told to stop; :meth:`Spinner.stop` joins it first and only then
shuts the executor down, so no callback can still be running. Stop it before a node's
subscriptions or publishers go (a lifecycle shutdown destroys them) when that happens outside
the spinning thread: a wait set being built at that moment meets a destroyed handle. The demo
and the tests use it.
"""
import threading

from rclpy.executors import SingleThreadedExecutor


class Spinner:
    """Spins ``nodes`` (of ``context``) in a daemon thread from construction until stop()."""

    def __init__(self, context, *nodes):
        self.executor = SingleThreadedExecutor(context=context)
        for node in nodes:
            self.executor.add_node(node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self):
        while not self._stop.is_set() and self.executor.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop spinning and shut the executor down; the nodes stay (destroy them after).
        RuntimeError if the thread is still in a callback after ``timeout`` seconds."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f'the executor thread did not stop within {timeout:.0f} s')
        self.executor.shutdown()
