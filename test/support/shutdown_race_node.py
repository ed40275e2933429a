"""perception_node's main(), with SIGTERM landing exactly while the worker publishes.

The first publish sends SIGTERM to this process and waits (up to 5 s) for the context to be
shut down before it publishes, the moment that used to fail with "publisher's context is
invalid". Prints ``published after SIGTERM`` when that publish went through.
"""
import os
import signal
import sys
import time

import rclpy

from qwen_vl_perception.ros import node as node_module
from qwen_vl_perception.ros.outputs import Outputs

_publish_frame = Outputs.publish_frame
_signalled = []


def _publish_during_sigterm(self, header, rgb, result):
    if not _signalled:
        _signalled.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while rclpy.ok() and time.monotonic() < deadline:  # main() runs the default context
            time.sleep(0.01)
        _publish_frame(self, header, rgb, result)
        print('published after SIGTERM', flush=True)
        return
    _publish_frame(self, header, rgb, result)


Outputs.publish_frame = _publish_during_sigterm

if __name__ == '__main__':
    sys.exit(node_module.main(sys.argv))
