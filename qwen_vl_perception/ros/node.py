"""perception_node: camera images in, Detection2DArray, attributes and an annotated image out.

A lifecycle node (``rclpy.lifecycle``) and a thin shell over the core
(:mod:`qwen_vl_perception.detector`): configure loads the model and starts the inference
thread, activate subscribes and publishes, deactivate stops taking frames (the model stays),
cleanup frees the model; ``autostart`` (default) does configure and activate at start-up.
Camera callbacks only validate and convert the image and hand it to the inference thread
(newest frame wins); that thread runs on-demand ``detect`` goals first, decodes compressed
images, runs the model and publishes. Parameter and lifecycle services stay responsive. With
``backend: openai`` a dispatcher hands frames and goals to request threads instead
(:mod:`~qwen_vl_perception.ros.remote_dispatch`).
"""
import functools
import gc
import signal
import sys
import threading
import time
from typing import Any, Optional

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.signals import SignalHandlerOptions

from ..backends.openai_engine import OpenAIEngine
from ..detector import Detector, FrameDetections
from ..frame_slot import LatestFrameSlots
from ..image_conversion import image_msg_to_rgb
from ..library_logs import quiet_library_logs, quiet_progress_bars
from .camera_input import CameraInput, Frame, camera_qos, decoded
from .depth_input import DepthInput
from .detect_action import DetectAction, GoalJob, interfaces_missing_reason
from .diagnostics import Counters, diagnostic_array, node_status
from .outputs import LATCHED, Outputs  # noqa: F401 - LATCHED: the label_info QoS, for users
from .parameter_changes import ParameterChanges, StreamValues
from .remote_dispatch import RemoteDispatcher
from .startup import StartupError, create_engine, current_settings, declare_and_check, value

SUCCESS, ERROR = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.ERROR


class PerceptionNode(LifecycleNode):
    """Open-vocabulary detection with a Qwen3-VL model."""

    def __init__(self, engine: Any = None, **node_kwargs):
        """``engine``: an already loaded engine (tools, tests), used on configure and not freed
        on cleanup; by default configure loads one from the node's parameters."""
        super().__init__('qwen_vl_perception', **node_kwargs)
        # What configure makes (set first: rclpy may destroy a node that failed to start).
        self._given_engine = engine
        self._state = 'unconfigured'
        self._failure = ''  # why the last transition failed, until one succeeds
        self._detector: Optional[Detector] = None
        self._slots: Optional[LatestFrameSlots] = None
        self._worker: Optional[threading.Thread] = None
        self._dispatcher: Optional[RemoteDispatcher] = None  # backend openai
        self._stopping = threading.Event()  # stops the decoding in flight (cleanup)
        self._outputs: Optional[Outputs] = None
        self._depth: Optional[DepthInput] = None
        self._camera: Optional[CameraInput] = None
        self._action = None
        self._last_inference_failed = False
        self.counters = Counters()
        self._model_dir = declare_and_check(self)
        self._stream = StreamValues.of(self)  # enabled, max_rate_hz, depth_box_fraction
        self._max_image_pixels = int(value(self, 'max_image_pixels'))
        self._convert_raw = functools.partial(image_msg_to_rgb,
                                              use_cv_bridge=bool(value(self, 'use_cv_bridge')))
        self._image_topics = list(value(self, 'image_topics'))
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.add_on_set_parameters_callback(ParameterChanges(
            self, self._stream, detector=lambda: self._detector,
            publish_label_info=self._publish_label_info))
        self.create_timer(1.0, self._publish_diagnostics)
        # The slots close when the context shuts down (rclpy destroys the node first where it
        # tracks nodes, which closes them too); a publish already failing then is not counted.
        self.context.on_shutdown(self._close_slots)
        missing = interfaces_missing_reason()
        if missing:
            self.get_logger().warning(f'the detect action is off: {missing}')
        else:
            self._action = DetectAction(
                self, accepting=lambda: self._state == 'active',
                settings=lambda: current_settings(self),
                convert=functools.partial(self._convert_raw,
                                          max_pixels=self._max_image_pixels),
                submit=lambda job: self._slots.put_urgent(job), counters=self.counters)
        if value(self, 'autostart'):
            for transition in (self.trigger_configure, self.trigger_activate):
                if transition() != SUCCESS:
                    failure = self._failure or 'lifecycle transition failed'
                    self.destroy_node()
                    raise StartupError(failure)
        else:
            self.get_logger().info('unconfigured (autostart is false): waiting for configure')

    # ------------------------------------------------------------------------- lifecycle
    def on_configure(self, state) -> TransitionCallbackReturn:
        """Load the model and start the inference thread."""
        try:
            engine = self._given_engine or create_engine(self, self._model_dir,
                                                         self.get_logger().info)
            self._detector = Detector(engine, current_settings(self))
        except (StartupError, ValueError) as error:
            self._failure = f'configure failed: {error}'
            self.get_logger().error(self._failure)
            return ERROR
        self._outputs = Outputs(self, with_depth=bool(value(self, 'use_depth')))
        self._slots = LatestFrameSlots()
        self._stopping.clear()
        if isinstance(engine, OpenAIEngine):
            self._dispatcher = RemoteDispatcher(
                self, self._slots, self._detector, int(value(self, 'server_max_in_flight')),
                max_rate_hz=lambda: self._stream.max_rate_hz,
                publish=functools.partial(self._publish_safely, self._slots),
                run_goal=self._action.run if self._action else None, counters=self.counters)
            self._worker = self._dispatcher.thread
        else:
            self._worker = threading.Thread(target=self._work, args=(self._slots,),
                                            name='qwen_vl_inference', daemon=True)
        self._worker.start()
        self._state, self._failure = 'inactive', ''
        return SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        """Subscribe to the camera (and depth) and publish results."""
        qos = camera_qos(value(self, 'input_reliability') == 'reliable')
        compressed = value(self, 'input_transport') == 'compressed'
        self._camera = CameraInput(
            self, self._image_topics, compressed, qos, self._convert_raw, self._max_image_pixels,
            wanted=self._wants_frames, deliver=self._take_frame, counters=self.counters)
        if value(self, 'use_depth'):
            self._depth = DepthInput(self, qos, float(value(self, 'depth_max_skew_s')),
                                     self.counters)
        result = super().on_activate(state)  # enables the lifecycle publishers
        self._state = 'active'
        self._publish_label_info()
        count = len(self._detector.settings.categories)
        engine = self._detector.engine
        where = (f'{engine.description}, up to {value(self, "server_max_in_flight")} requests '
                 'in flight' if self._dispatcher else f'model on {engine.device}')
        self.get_logger().info(
            f"ready: {count} {'category' if count == 1 else 'categories'}, {where}, "
            "subscribed to "
            f"{', '.join(self.resolve_topic_name(t) for t in self._image_topics)}"
            f"{' (compressed)' if compressed else ''}"
            f"{' with depth' if self._depth else ''}")
        return result

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        """Stop taking frames and goals; the model stays loaded."""
        self._deactivate('the node was deactivated')
        self.get_logger().info('inactive: not taking frames or goals (the model stays loaded)')
        return super().on_deactivate(state)

    def _deactivate(self, reason: str) -> None:
        self._state = 'inactive'
        if self._camera is not None:
            self._camera.destroy()
            self._camera = None
        if self._depth is not None:
            self._depth.destroy()
            self._depth = None
        if self._slots is not None:
            self._slots.discard_waiting()
        if self._action is not None:
            self._action.interrupt_all(reason)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        """Stop the inference thread and free the model."""
        self._release()
        self.get_logger().info('unconfigured: the model is freed')
        return super().on_cleanup(state)

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        if self._state == 'active':
            self._deactivate('the node is shutting down')
        self._release()
        self._state = 'finalized'
        return SUCCESS

    def on_error(self, state) -> TransitionCallbackReturn:
        """A failed transition: free what it made; back to unconfigured (the reason stays in
        /diagnostics until a transition succeeds)."""
        self._release()
        return SUCCESS

    def _release(self) -> None:
        """Stop the worker (after the token in flight), destroy the result publishers and
        drop the model; safe to call again."""
        self._stopping.set()
        self._close_slots()
        if self._worker is not None and self._worker.is_alive():
            self._worker.join(timeout=60.0)
            if self._worker.is_alive():
                self.get_logger().warning('the inference in flight did not stop within 60 s')
        self._worker = None
        detector, self._detector = self._detector, None
        owned = detector is not None and detector.engine is not self._given_engine
        if self._dispatcher is not None:  # requests in flight are cut off (an owned engine)
            self._dispatcher.stop(close_engine=owned)
            self._dispatcher, owned = None, False
        if self._outputs is not None:
            self._outputs.destroy()
            self._outputs = None
        if owned:
            close = getattr(detector.engine, 'close', None)
            if close is not None:
                close()  # frees GPU memory too
        del detector
        gc.collect()
        if self._state != 'finalized':
            self._state = 'unconfigured'

    def _close_slots(self) -> None:
        if self._slots is not None:
            self._slots.close()

    # ---------------------------------------------------------------------------- callbacks
    def _wants_frames(self) -> bool:
        """Whether camera frames are used now: the stream is enabled or a goal waits."""
        return self._state == 'active' and (
            self._stream.enabled or (self._action is not None and self._action.waiting_for_frame))

    def _take_frame(self, frame: Frame, source: str) -> None:
        """A good camera frame: the image of goals waiting for one, and (enabled) the newest
        frame of its camera for the stream."""
        if self._action is not None and self._action.waiting_for_frame:
            self._action.offer_frame(frame.header, frame.rgb if frame.decode is None
                                     else frame.decode)
        if not self._stream.enabled:
            return
        if self._depth is not None:
            frame.locate = functools.partial(self._depth.locate,
                                             self._depth.request(frame.header))
        self._slots.put(frame, source)

    # ------------------------------------------------------------------------------- worker
    def _work(self, slots: LatestFrameSlots) -> None:
        """Goals first, then the newest camera frames; until ``slots`` close (cleanup)."""
        next_start = 0.0
        while not slots.closed:
            # Rate limit (frames only): frames are taken after the wait, so the newest is.
            wait = next_start - time.monotonic() if self._stream.max_rate_hz > 0.0 else 0.0
            items = slots.take_all(timeout=min(wait, 0.1) if wait > 0.0 else 0.5,
                                   frames=wait <= 0.0)
            for job in [item for item in items if isinstance(item, GoalJob)]:
                self._action.run(job, self._detector)
            frames = [item for item in items
                      if isinstance(item, Frame) and decoded(self, self.counters, item)]
            if not frames or self._state != 'active':
                continue  # frames taken as the node deactivated are dropped
            self.counters.last_inference_start = time.monotonic()
            if self._stream.max_rate_hz > 0.0:
                next_start = self.counters.last_inference_start + 1.0 / self._stream.max_rate_hz
            try:
                results = self._detector.detect(
                    [frame.rgb for frame in frames],
                    on_step=lambda step: not self._stopping.is_set())
            except Exception as error:  # noqa: BLE001 - the node must survive any model error
                self.counters.add('inference_errors')
                self._last_inference_failed = True
                self.get_logger().error(f'inference failed: {error!r}',
                                        throttle_duration_sec=5.0)
                continue
            self._last_inference_failed = False
            if self._state != 'active':
                continue  # deactivated during the inference: its results are not published
            self.counters.batches += 1
            self.counters.largest_batch = max(self.counters.largest_batch, len(frames))
            for frame, result in zip(frames, results):
                if not self._publish_safely(slots, frame, result):
                    return

    def _publish_safely(self, slots, frame: Frame, result: FrameDetections) -> bool:
        """Publish one frame's results unless shutting down; False once shutting down."""
        with slots.held_open() as still_open:  # shutdown waits for this frame
            if not still_open or self._stopping.is_set():
                return False  # shutting down: the publishers may be gone
            if self._state != 'active':
                return True  # deactivated meanwhile: not published
            try:
                self._publish(frame, result)
            except Exception as error:  # noqa: BLE001 - one bad frame must not stop
                if not self.context.ok():  # shut down under the node by its host
                    return False
                self.counters.add('publish_errors')
                self.get_logger().error(f'publishing failed: {error!r}',
                                        throttle_duration_sec=5.0)
        return True

    def _publish(self, frame: Frame, result: FrameDetections) -> None:
        self.counters.count_published(result, latency_s=time.monotonic() - frame.received)
        if result.unknown_labels:
            self.get_logger().debug(f'labels outside the categories: {result.unknown_labels}')
        self._outputs.publish_frame(frame.header, frame.rgb, result)
        if frame.locate is not None and self._outputs.detections_3d is not None:
            height, width = frame.rgb.shape[:2]
            located = frame.locate(result.detections, (width, height),
                                   self._stream.depth_box_fraction)
            if located is not None:  # else counted: published 2D-only
                self._outputs.publish_3d(frame.header, located)

    # ------------------------------------------------------------------------------ outputs
    def _publish_label_info(self, settings=None) -> None:
        outputs = self._outputs
        if outputs is None or self._state != 'active':
            return  # published on activation
        settings = settings or self._detector.settings
        outputs.publish_label_info(settings.categories, settings.score_threshold)

    def _publish_diagnostics(self) -> None:
        worker, dispatcher = self._worker, self._dispatcher
        level, message = node_status(self._failure, self._state,
                                     worker is not None and worker.is_alive(),
                                     self._last_inference_failed, self._stream.enabled,
                                     dispatcher.status() if dispatcher else None)
        self._diagnostics_pub.publish(diagnostic_array(
            f'{self.get_name()}: detection', self.counters, self.get_clock().now().to_msg(),
            level, message, lifecycle_state=self._state, frames_dropped=self.frames_dropped,
            last_goal_rejection=self._action.last_rejection if self._action else '',
            **(dispatcher.values() if dispatcher else {})))

    @property
    def detector(self) -> Optional[Detector]:
        """The node's :class:`Detector` (its current settings, its engine) while configured,
        else None; read-only."""
        return self._detector

    @property
    def lifecycle_state(self) -> str:
        """'unconfigured', 'inactive', 'active' or 'finalized'."""
        return self._state

    @property
    def inference_thread(self) -> Optional[threading.Thread]:
        """The inference thread while configured, else None."""
        return self._worker

    @property
    def frame_slots(self) -> Optional[LatestFrameSlots]:
        """The cameras' frame hand-over while configured (its counts), else None."""
        return self._slots

    @property
    def frames_dropped(self) -> int:
        slots = self._slots
        return slots.dropped if slots is not None else 0

    def shutdown(self) -> None:
        """Go to finalized: stop the worker (after the token in flight) and free the model."""
        if self._state != 'finalized' and self.context.ok():
            self.trigger_shutdown()
        self._release()

    def destroy_node(self):
        """Stop the worker first: it must not publish through handles being destroyed."""
        if self._action is not None:
            self._action.destroy()
            self._action = None
        self._release()
        return super().destroy_node()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(args: Optional[list] = None) -> int:
    quiet_library_logs()
    # No "Loading weights" bars: under ros2 launch they come out as empty
    # '[perception_node-1]' lines; the node logs what it loads instead.
    quiet_progress_bars()
    # rclpy's own SIGINT/SIGTERM handlers shut the context down from a thread of theirs, at
    # once, while the worker may be publishing (and run no on_shutdown callback). Here a
    # signal stops the spin in this thread instead, and shutdown goes in order: the frame
    # slots close (after a publish in progress), the worker stops, the node goes, then the
    # context. A second signal during that ends the process the default way.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    node: Optional[PerceptionNode] = None
    try:
        node = PerceptionNode()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.1)  # a signal is handled within 0.1 s
    except StartupError as error:
        rclpy.logging.get_logger('qwen_vl_perception').fatal(f'cannot start: {error}')
        return 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        if node is not None:
            node.shutdown()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
