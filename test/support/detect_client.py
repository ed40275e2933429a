"""An action client of perception_node's ``detect`` on a node harness's peer (real DDS)."""
from diagnostic_msgs.msg import DiagnosticStatus
from qwen_vl_perception_interfaces.action import Detect
from rclpy.action import ActionClient

from waiting import wait_for

ANSWER_S = 300
"""One answer of the default model on a loaded 2-core machine, at most."""


class Client:
    """Goals, their results and rejections, through ``harness.peer``."""

    def __init__(self, harness):
        self.harness = harness
        self.client = ActionClient(harness.peer, Detect, 'detect')
        assert self.client.wait_for_server(timeout_sec=30.0)

    def send(self, goal, feedback=None):
        future = self.client.send_goal_async(
            goal, feedback_callback=(lambda m: feedback.append(m.feedback)) if feedback is not None
            else None)
        wait_for(future.done, 30, 'the goal got no answer')
        return future.result()

    def result(self, handle, timeout=ANSWER_S):
        future = handle.get_result_async()
        wait_for(future.done, timeout, 'no result')
        return future.result()

    def rejected_with(self, goal, reason_part, lifecycle):
        """The goal is rejected, and the reason (also logged) is in /diagnostics."""
        handle = self.send(goal)
        assert not handle.accepted
        wait_for(lambda: lifecycle.reported(DiagnosticStatus.OK, 'detect goal rejected: ',
                                            reason_part), 30,
                 f'the reason {reason_part!r} is not in /diagnostics')
