"""The node under test and a peer node over real DDS, for the node tests: the harness, frames,
lifecycle services and reading /diagnostics."""
import random

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition, TransitionEvent
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String
from vision_msgs.msg import Detection2DArray, LabelInfo

from qwen_vl_perception.ros.node import LATCHED, PerceptionNode
from qwen_vl_perception.ros.spinning import Spinner
from waiting import wait_for

SERVICE_S = 600
"""The longest a lifecycle service may take: a configure loads the model (minutes on a loaded
CI machine at worst)."""


def rgb_image(stamp_sec, frame_id='camera', width=640, height=480, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    message = Image(height=height, width=width, encoding='rgb8', step=width * 3)
    message.header.stamp.sec = stamp_sec
    message.header.stamp.nanosec = 500
    message.header.frame_id = frame_id
    message.data = pixels.tobytes()
    return message


class Harness:
    """The node under test plus a peer node (cameras and listeners), spun in a thread.

    ``depth``: the queue depth of the peer's (reliable) result subscriptions; ``annotated``:
    the peer subscribes to ``annotated_image`` too (the node draws only for a subscriber).
    """

    def __init__(self, parameters, depth=10, annotated=False):
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=random.randint(1, 200))
        overrides = [Parameter(name, value=value) for name, value in parameters.items()]
        self.node = PerceptionNode(context=self.context, parameter_overrides=overrides)
        self.peer = rclpy.create_node('test_peer', context=self.context)
        self.detections, self.label_infos, self.descriptions = [], [], []
        self.annotated, self.diagnostics = [], []
        subscribe = self.peer.create_subscription
        subscribe(Detection2DArray, 'detections', self.detections.append, depth)
        subscribe(LabelInfo, 'label_info', self.label_infos.append, LATCHED)
        subscribe(String, 'descriptions', self.descriptions.append, depth)
        if annotated:
            subscribe(Image, 'annotated_image', self.annotated.append, depth)
        subscribe(DiagnosticArray, '/diagnostics', self.diagnostics.append, 10)
        self.cameras = {}
        self.spinner = Spinner(self.context, self.node, self.peer)

    def camera(self, reliability=ReliabilityPolicy.BEST_EFFORT, topic='image', depth=5):
        """The peer's image publisher on ``topic`` with that QoS (made on first use)."""
        key = (topic, reliability, depth)
        if key not in self.cameras:
            qos = QoSProfile(depth=depth, reliability=reliability)
            self.cameras[key] = self.peer.create_publisher(Image, topic, qos)
        return self.cameras[key]

    def publish_when_connected(self, message, reliability=ReliabilityPolicy.BEST_EFFORT):
        publisher = self.camera(reliability)
        wait_for(lambda: publisher.get_subscription_count() > 0, 10, 'camera not connected')
        publisher.publish(message)

    def set_parameters(self, *parameters):
        client = AsyncParameterClient(self.peer, self.node.get_name())
        assert client.wait_for_services(timeout_sec=10.0)
        future = client.set_parameters(list(parameters))
        wait_for(future.done, 10, 'set_parameters got no answer')
        return future.result().results

    def close(self):
        # The spinning thread must have stopped before anything of the nodes goes (shutting the
        # node down destroys its subscriptions: a wait set being built in that thread at the
        # same moment met a destroyed handle, InvalidHandle; ros/spinning.py says more).
        self.spinner.stop()
        self.node.shutdown()
        self.node.destroy_node()
        self.peer.destroy_node()
        rclpy.try_shutdown(context=self.context)


def diagnostic(array, key):
    for status in array.status:
        for value in status.values:
            if value.key == key:
                return value.value
    return None


class Lifecycle:
    """The node's lifecycle services and transition events, seen from the harness's peer."""

    def __init__(self, harness):
        peer, name = harness.peer, harness.node.get_name()
        self.change = peer.create_client(ChangeState, f'/{name}/change_state')
        self.get = peer.create_client(GetState, f'/{name}/get_state')
        self.events, self.diagnostics = [], []
        peer.create_subscription(TransitionEvent, f'/{name}/transition_event',
                                 self.events.append, 50)
        peer.create_subscription(DiagnosticArray, '/diagnostics', self.diagnostics.append, 10)

    def _call(self, client, request):
        assert client.wait_for_service(timeout_sec=30.0), f'{client.srv_name} not found'
        future = client.call_async(request)
        wait_for(future.done, SERVICE_S, f'{client.srv_name} got no answer')
        return future.result()

    def transition(self, transition_id: int) -> bool:
        return self._call(self.change, ChangeState.Request(
            transition=Transition(id=transition_id))).success

    def state(self) -> str:
        return self._call(self.get, GetState.Request()).current_state.label

    def reported(self, level, *parts) -> bool:
        """Whether a /diagnostics status of ``level`` has every one of ``parts`` in its
        message or in one of its values."""
        for array in self.diagnostics:
            for status in array.status:
                texts = [status.message] + [item.value for item in status.values]
                if status.level == level and any(all(p in t for p in parts) for t in texts):
                    return True
        return False

    def deactivate(self) -> bool:
        return self.transition(Transition.TRANSITION_DEACTIVATE)

    def activate(self) -> bool:
        return self.transition(Transition.TRANSITION_ACTIVATE)
