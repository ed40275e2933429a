"""perception_node's main(), with SIGTERM landing exactly while the worker publishes.

The first publish sends SIGTERM to this process and waits (up to 5 s) for the context to be
shut down before it publishes, the moment that used to fail with "publisher's context is
invalid". Prints ``published after SIGTERM`` when that publish went through.
"""
import os
import signal
import sys
import time

from qwen_vl_perception.ros import node as node_module

_publish = node_module.PerceptionNode._publish
_signalled = []


def _publish_during_sigterm(self, frame, result):
    if not _signalled:
        _signalled.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while self.context.ok() and time.monotonic() < deadline:
            time.sleep(0.01)
        _publish(self, frame, result)
        print('published after SIGTERM', flush=True)
        return
    _publish(self, frame, result)


node_module.PerceptionNode._publish = _publish_during_sigterm

if __name__ == '__main__':
    sys.exit(node_module.main(sys.argv))
