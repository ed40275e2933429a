"""perception_node: camera images in, Detection2DArray, attributes and an annotated image out.

A thin rclpy shell over the core (:mod:`qwen_vl_perception.detector`). Camera callbacks only
validate and convert the image and hand it to a worker thread (newest frame wins); the worker
decodes compressed images, runs the model and publishes. Parameter services stay responsive
during decoding and inference.

With ``backend: openai`` the model is served elsewhere (:mod:`qwen_vl_perception.backends`):
the worker hands each camera's newest frame to a request thread as soon as that camera has
none in flight and fewer than ``server_max_in_flight`` are; a request thread decodes, asks the
server and publishes, so each camera's results leave in the order of its frames. While the
server is unreachable no frame is sent (the engine asks again with a back-off) and
/diagnostics says WARN; a failed request drops its frame, is counted and logged once per run
of failures.
"""
import functools
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterType, SetParametersResult
from rclpy.exceptions import InvalidParameterTypeException, ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data,
                       qos_profile_system_default)
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String
from vision_msgs.msg import Detection2DArray, LabelInfo

from ..backends.http_client import (AuthenticationError, BadAnswer, HttpStatusError,
                                    RequestTimedOut, ServerError)
from ..backends.openai_engine import OpenAIEngine, ServerModelError
from ..detector import Detector, FrameDetections, prepare_settings
from ..drawing import draw_detections
from ..frame_slot import LatestFrameSlots
from ..image_conversion import ImageFormatError, compressed_msg_decoder, image_msg_to_rgb
from ..library_logs import quiet_library_logs, quiet_progress_bars
from ..model.default_model import DEFAULT_MODEL_NAME, ensure_default_model
from . import messages
from .parameters import (PARAMETERS, SETTINGS_PARAMETERS, check_value, declare_parameters,
                         settings_from_values, startup_problems, trained_pixel_budget,
                         unset_model_values)

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


class StartupError(RuntimeError):
    """The node cannot start (bad parameters, model missing); the message says why."""


@dataclass
class Frame:
    header: Header
    rgb: Optional[np.ndarray]
    received: float
    decode: Optional[Callable[[], np.ndarray]] = None
    """Set for a compressed image, checked but not decoded yet: the worker decodes it."""


@dataclass
class Counters:
    received: int = 0
    processed: int = 0
    invalid_images: int = 0
    unknown_labels: int = 0
    invalid_objects: int = 0
    excess_objects: int = 0
    truncated_answers: int = 0
    inference_errors: int = 0
    publish_errors: int = 0
    batches: int = 0
    largest_batch: int = 0
    requests_timed_out: int = 0
    """backend openai: failed requests (in ``inference_errors``) that got no answer in time."""
    largest_in_flight: int = 0
    last_latency_s: float = 0.0
    last_inference_s: float = 0.0
    last_inference_start: float = 0.0
    """When the last inference began (``time.monotonic``): the rate limit's decision."""


class PerceptionNode(Node):
    """Open-vocabulary detection with a Qwen3-VL model."""

    def __init__(self, engine: Any = None, **node_kwargs):
        """``engine``: an already loaded engine (tools, tests); by default the node loads one
        from its ``model_path``/``device``/``quantization`` parameters."""
        super().__init__('qwen_vl_perception', **node_kwargs)
        try:
            declare_parameters(self, names=('model_path', 'quantization', 'backend'))
            budget = trained_pixel_budget(self._model_dir())
            declare_parameters(self, defaults=budget)
        except ParameterException as error:  # a wrong type or range in a params file
            double = any(spec.type == ParameterType.PARAMETER_DOUBLE and spec.name in str(error)
                         for spec in PARAMETERS)
            hint = (' (a double needs a decimal point, e.g. 2.0)'
                    if isinstance(error, InvalidParameterTypeException) and double else '')
            raise StartupError(f'invalid parameter: {error}{hint}') from error
        value = self._value
        problem = startup_problems({spec.name: self.get_parameter_or(spec.name).value
                                    for spec in PARAMETERS})
        if problem:
            raise StartupError(problem)
        if budget and all(self._value(name) == pixels for name, pixels in budget.items()):
            self.get_logger().info(
                f"the model's training resolution: min_pixels {budget['min_pixels']}, "
                f"max_pixels {budget['max_pixels']}")
        self._fill_unset_prompt_parameters()
        try:
            settings = settings_from_values({name: value(name) for name in SETTINGS_PARAMETERS})
            prepare_settings(settings)
        except ValueError as error:
            raise StartupError(f'invalid parameters: {error}') from error
        self._owns_engine = engine is None
        if engine is None:
            engine = (self._connect_server() if value('backend') == 'openai'
                      else self._load_engine())
        self._remote = isinstance(engine, OpenAIEngine)
        self._detector = Detector(engine, settings)
        self._enabled = bool(value('enabled'))
        self._max_rate_hz = float(value('max_rate_hz'))
        self._max_image_pixels = int(value('max_image_pixels'))
        self.counters = Counters()
        self._slots = LatestFrameSlots()
        self._last_inference_failed = False
        self._count_lock = threading.Lock()  # counters written by several threads
        self._failure_burst = 0  # failed requests since the last answer (backend openai)
        self._last_failure = ''

        self._detections_pub = self.create_publisher(Detection2DArray, 'detections',
                                                     qos_profile_system_default)
        self._annotated_pub = self.create_publisher(Image, 'annotated_image',
                                                    qos_profile_system_default)
        self._descriptions_pub = self.create_publisher(String, 'descriptions',
                                                       qos_profile_system_default)
        self._label_info_pub = self.create_publisher(LabelInfo, 'label_info', LATCHED)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._publish_label_info()

        camera_qos = QoSProfile(**_qos_fields(qos_profile_sensor_data))
        if value('input_reliability') == 'reliable':
            camera_qos.reliability = ReliabilityPolicy.RELIABLE
        compressed = value('input_transport') == 'compressed'
        convert_raw = functools.partial(image_msg_to_rgb,
                                        use_cv_bridge=bool(value('use_cv_bridge')))
        self._image_topics = list(value('image_topics'))
        for topic in self._image_topics:
            if compressed:
                self.create_subscription(
                    CompressedImage, topic + '/compressed',
                    lambda m, t=topic: self._accept(m, compressed_msg_decoder, t), camera_qos)
            else:
                self.create_subscription(Image, topic,
                                         lambda m, t=topic: self._accept(m, convert_raw, t),
                                         camera_qos)

        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.create_timer(1.0, self._publish_diagnostics)
        # The slots close when the context shuts down (rclpy destroys the node first where it
        # tracks nodes, which closes them too); a publish already failing then is not counted.
        self.context.on_shutdown(self._slots.close)
        self._requests = None
        if self._remote:
            self._max_in_flight = int(value('server_max_in_flight'))
            self._requests = ThreadPoolExecutor(self._max_in_flight,
                                                thread_name_prefix='qwen_vl_request')
            self._worker = threading.Thread(target=self._dispatch, name='qwen_vl_dispatch',
                                            daemon=True)
            where = f'{engine.description}, up to {self._max_in_flight} requests in flight'
        else:
            self._worker = threading.Thread(target=self._work, name='qwen_vl_inference',
                                            daemon=True)
            where = f'model on {engine.device}'
        self._worker.start()
        count = len(settings.categories)
        self.get_logger().info(
            f"ready: {count} {'category' if count == 1 else 'categories'}, {where}, "
            f"subscribed to {', '.join(self.resolve_topic_name(t) for t in self._image_topics)}"
            f"{' (compressed)' if compressed else ''}")

    # ----------------------------------------------------------------------------- start-up
    def _value(self, name: str):
        return self.get_parameter(name).value

    def _fill_unset_prompt_parameters(self) -> None:
        """Unset categories/describe/attributes/prompt_template/min_pixels/max_pixels: what
        the model was trained with (its detection_prompt.json), else the defaults. Values
        given by the user stay."""
        unset = [spec.name for spec in PARAMETERS if spec.from_model
                 and self.get_parameter_or(spec.name).type_ == Parameter.Type.NOT_SET]
        if not unset:
            return
        try:
            values, from_model = unset_model_values(self._model_dir(), unset)
        except ValueError as error:
            raise StartupError(str(error)) from error
        if from_model:
            self.get_logger().info(f"from the model's training prompt: {', '.join(unset)}")
        results = self.set_parameters([Parameter(name, value=v) for name, v in values.items()])
        for name, result in zip(values, results):
            if not result.successful:
                raise StartupError(f'{name}: {result.reason}')

    def _model_dir(self) -> str:
        """``model_path``, with 'default' resolved to the embedded model's NF4 checkpoint
        (unpacked and quantized into the cache on first use)."""
        if getattr(self, '_resolved_model_dir', None) is None:
            path = self._value('model_path')
            if path == DEFAULT_MODEL_NAME:
                # a served model's folder is only read (prompt, pixel budget): no NF4 needed
                form = ('none' if self._value('quantization') == 'none'
                        or self._value('backend') == 'openai' else 'nf4')
                try:
                    path = str(ensure_default_model(form, log=self.get_logger().info))
                except Exception as error:  # any failure to unpack/quantize stops start-up
                    raise StartupError(f'default model: {type(error).__name__}: {error}') \
                        from error
            self._resolved_model_dir = path
        return self._resolved_model_dir

    def _load_engine(self):
        from ..model.engine import VisionLanguageEngine
        from ..model.loading import ModelLoadError
        from ..model.torch_support import MissingDependencyError, triton_missing_reason
        path = self._model_dir()
        if not path:
            raise StartupError("model_path is required (a Qwen3-VL checkpoint directory, or "
                               "'default' for the project's synthetic-scenes model)")
        self.get_logger().info(f"loading the model {path} (device {self._value('device')}, "
                               f"quantization {self._value('quantization')})")
        try:
            engine = VisionLanguageEngine(path, device=self._value('device'),
                                          quantization=self._value('quantization'),
                                          decoder=self._value('decoder'),
                                          min_pixels=self._value('min_pixels'),
                                          max_pixels=self._value('max_pixels'))
        except (ModelLoadError, MissingDependencyError, OSError, ValueError) as error:
            raise StartupError(str(error)) from error
        missing = triton_missing_reason() if engine.device.type == 'cuda' else None
        if missing:  # e.g. a JetPack torch: everything runs, the fused kernels stay off
            self.get_logger().info(f'{missing}: decoding without the fused kernels '
                                   "(torch.compile, the NF4 decode kernel); bitsandbytes' path")
        return engine

    def _connect_server(self) -> OpenAIEngine:
        """The served model's engine. A server that answers but refuses the key, does not
        serve ``server_model`` or is no OpenAI API stops start-up; one that cannot be reached
        (or answers 5xx) does not: the node starts and retries."""
        value = self._value
        try:
            engine = OpenAIEngine.for_model(
                value('server_url'), self._model_dir() or None,
                min_pixels=value('min_pixels'), max_pixels=value('max_pixels'),
                model=value('server_model'), api_key_env=value('server_api_key_env'),
                timeout_s=value('server_timeout_s'),
                max_in_flight=value('server_max_in_flight'))
        except ValueError as error:
            raise StartupError(str(error)) from error
        try:
            served = engine.connect()
        except (AuthenticationError, ServerModelError, BadAnswer) as error:
            hint = ''
            if isinstance(error, AuthenticationError):
                key_env = value('server_api_key_env')
                hint = (f' (the key comes from the environment variable {key_env})' if key_env
                        else ' (no key sent: set server_api_key_env to the name of an '
                        'environment variable holding it)')
            raise StartupError(f'{error}{hint}') from error
        except HttpStatusError as error:
            if error.status < 500:
                raise StartupError(str(error)) from error
            self._warn_unreachable(engine, error)
        except ServerError as error:
            self._warn_unreachable(engine, error)
        else:
            self.get_logger().info(f"{engine.server_url} serves {', '.join(served)}; using "
                                   f'{engine.model_name!r}')
        return engine

    def _warn_unreachable(self, engine: OpenAIEngine, error: ServerError) -> None:
        self.get_logger().warning(
            f'the server is not answering yet: {error}; starting anyway, retrying every '
            f'{engine.status.retry_in_s:.0f}-10 s (/diagnostics: WARN until it answers)')

    # ---------------------------------------------------------------------------- callbacks
    def _accept(self, message, convert, source: str) -> None:
        """``convert`` gives the RGB array, or (compressed images) a function decoding it."""
        self.counters.received += 1
        if not self._enabled:
            return
        try:
            converted = convert(message, max_pixels=self._max_image_pixels)
        except ImageFormatError as error:
            self._skip_image(error)
            return
        frame = Frame(header=message.header, rgb=None, received=time.monotonic())
        if callable(converted):
            frame.decode = converted
        else:
            frame.rgb = converted
        self._slots.put(frame, source)

    def _skip_image(self, error: ImageFormatError) -> None:
        with self._count_lock:
            self.counters.invalid_images += 1
        self.get_logger().warning(f'skipped an image: {error}', throttle_duration_sec=5.0)

    def _decoded(self, frame: Frame) -> bool:
        """Decode a compressed frame (in the worker); False, counted and logged, if it fails."""
        if frame.decode is not None:
            try:
                frame.rgb = frame.decode()
            except ImageFormatError as error:
                self._skip_image(error)
                return False
            frame.decode = None
        return True

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        changes = {p.name: p.value for p in parameters}
        for name, value in changes.items():
            reason = check_value(name, value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        settings_changes = {k: v for k, v in changes.items() if k in SETTINGS_PARAMETERS}
        if settings_changes:
            current = {name: self._value(name) for name in SETTINGS_PARAMETERS}
            try:
                settings = settings_from_values({**current, **settings_changes})
                old_categories = self._detector.settings.categories
                prepared = self._detector.update(settings)
            except ValueError as error:
                return SetParametersResult(successful=False, reason=str(error))
            if (prepared.settings.categories != old_categories
                    or 'score_threshold' in settings_changes):
                self._publish_label_info(prepared.settings)
            self.get_logger().info(f'parameters changed: {", ".join(sorted(settings_changes))}')
        if 'enabled' in changes:
            self._enabled = bool(changes['enabled'])
        if 'max_rate_hz' in changes:
            self._max_rate_hz = float(changes['max_rate_hz'])
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------------------- worker
    def _work(self) -> None:
        next_start = 0.0
        while not self._slots.closed:
            # Rate limit: wait before taking frames, so the newest one is taken after the wait.
            while self._max_rate_hz > 0.0 and not self._slots.closed:
                wait = next_start - time.monotonic()
                if wait <= 0.0:
                    break
                time.sleep(min(wait, 0.1))
            frames = [frame for frame in self._slots.take_all(timeout=0.5)
                      if self._decoded(frame)]
            if not frames:
                continue
            self.counters.last_inference_start = time.monotonic()
            if self._max_rate_hz > 0.0:
                next_start = self.counters.last_inference_start + 1.0 / self._max_rate_hz
            try:
                results = self._detector.detect([frame.rgb for frame in frames])
            except Exception as error:  # noqa: BLE001 - the node must survive any model error
                self.counters.inference_errors += 1
                self._last_inference_failed = True
                self.get_logger().error(f'inference failed: {error!r}',
                                        throttle_duration_sec=5.0)
                continue
            self._last_inference_failed = False
            self.counters.batches += 1
            self.counters.largest_batch = max(self.counters.largest_batch, len(frames))
            for frame, result in zip(frames, results):
                if not self._publish_safely(frame, result):
                    return

    def _dispatch(self) -> None:
        """backend openai: hand each camera's newest frame to a request thread while the
        server is reachable (module docstring)."""
        engine = self._detector.engine
        next_start = 0.0
        while not self._slots.closed:
            while self._max_rate_hz > 0.0 and not self._slots.closed:
                wait = next_start - time.monotonic()
                if wait <= 0.0:
                    break
                time.sleep(min(wait, 0.1))
            if not engine.ready():  # frames wait in their slots (the newest wins)
                time.sleep(min(0.1, max(engine.status.retry_in_s, 0.01)))
                continue
            taken = self._slots.take_free(self._max_in_flight, timeout=0.5)
            if not taken:
                continue
            now = time.monotonic()
            self.counters.last_inference_start = now
            if self._max_rate_hz > 0.0:
                next_start = now + len(taken) / self._max_rate_hz
            with self._count_lock:
                self.counters.largest_in_flight = max(self.counters.largest_in_flight,
                                                      self._slots.out)
            for source, frame in taken:
                self._requests.submit(self._serve_frame, source, frame)

    def _serve_frame(self, source, frame: Frame) -> None:
        """One frame through the server, published; its camera may then send the next."""
        try:
            if not self._decoded(frame):
                return
            try:
                result = self._detector.detect([frame.rgb])[0]
            except Exception as error:  # noqa: BLE001 - the node must survive any failure
                self._request_failed(error)
                return
            self._request_answered()
            self._publish_safely(frame, result)
        finally:
            self._slots.release(source)

    def _request_failed(self, error: Exception) -> None:
        if self._slots.closed:
            return  # shutting down: requests in flight are cut off, no failure of the server
        reason = str(error) if isinstance(error, ServerError) else repr(error)
        with self._count_lock:
            self.counters.inference_errors += 1
            self.counters.requests_timed_out += int(isinstance(error, RequestTimedOut))
            self._failure_burst += 1
            first = self._failure_burst == 1
            self._last_failure = reason
            self._last_inference_failed = True
        if first:
            self.get_logger().error(f'a request failed, its frame is dropped: {reason} (further '
                                    'failures are counted in inference_errors, not logged, '
                                    'until the server answers again)')

    def _request_answered(self) -> None:
        with self._count_lock:
            failed, self._failure_burst = self._failure_burst, 0
            self._last_inference_failed = False
            self.counters.batches += 1
            self.counters.largest_batch = 1
        if failed:
            self.get_logger().info(f'the server answers again ({failed} request'
                                   f"{'s' if failed != 1 else ''} failed before)")

    def _publish_safely(self, frame: Frame, result: FrameDetections) -> bool:
        """Publish one frame's results unless shutting down; False once shutting down."""
        with self._slots.held_open() as still_open:  # shutdown waits for this frame
            if not still_open:
                return False  # shutting down: the publishers may be gone
            try:
                self._publish(frame, result)
            except Exception as error:  # noqa: BLE001 - one bad frame must not stop
                if not self.context.ok():  # shut down under the node by its host
                    return False
                with self._count_lock:
                    self.counters.publish_errors += 1
                self.get_logger().error(f'publishing failed: {error!r}',
                                        throttle_duration_sec=5.0)
        return True

    def _publish(self, frame: Frame, result: FrameDetections) -> None:
        counters = self.counters
        with self._count_lock:
            counters.processed += 1
            counters.unknown_labels += len(result.unknown_labels)
            counters.invalid_objects += result.invalid
            counters.excess_objects += result.excess
            counters.truncated_answers += int(result.truncated)
            counters.last_inference_s = result.seconds
            counters.last_latency_s = time.monotonic() - frame.received
        if result.unknown_labels:
            self.get_logger().debug(f'labels outside the categories: {result.unknown_labels}')
        self._detections_pub.publish(messages.detection_array_msg(frame.header,
                                                                  result.detections))
        if result.describe:
            self._descriptions_pub.publish(messages.descriptions_msg(frame.header,
                                                                     result.detections))
        if self._annotated_pub.get_subscription_count() > 0:
            annotated = draw_detections(frame.rgb, result.detections)
            self._annotated_pub.publish(messages.image_msg(frame.header, annotated))

    # ------------------------------------------------------------------------------ outputs
    def _publish_label_info(self, settings=None) -> None:
        settings = settings or self._detector.settings
        header = Header(stamp=self.get_clock().now().to_msg())
        self._label_info_pub.publish(messages.label_info_msg(header, settings.categories,
                                                             settings.score_threshold))

    def _publish_diagnostics(self) -> None:
        counters = self.counters
        values = {
            'frames_received': counters.received,
            'frames_processed': counters.processed,
            'frames_dropped': self._slots.dropped,
            'invalid_images': counters.invalid_images,
            'unknown_labels': counters.unknown_labels,
            'invalid_objects': counters.invalid_objects,
            'excess_objects': counters.excess_objects,
            'truncated_answers': counters.truncated_answers,
            'inference_errors': counters.inference_errors,
            'publish_errors': counters.publish_errors,
            'batches': counters.batches,
            'largest_batch': counters.largest_batch,
            'last_inference_ms': round(counters.last_inference_s * 1000.0, 1),
            'last_latency_ms': round(counters.last_latency_s * 1000.0, 1),
        }
        server = self._detector.engine.status if self._remote else None
        if self._remote:
            engine = self._detector.engine
            values.update({
                'backend': 'openai', 'server_url': engine.server_url,
                'server_model': engine.model_name or '', 'server_reachable': server.reachable,
                'requests_in_flight': self._slots.out,
                'largest_in_flight': counters.largest_in_flight,
                'requests_timed_out': counters.requests_timed_out,
                'answers_without_logprobs': engine.answers_without_logprobs,
            })
        if not self._worker.is_alive():
            level, message = DiagnosticStatus.ERROR, 'inference worker stopped'
        elif server is not None and not server.reachable:
            level = DiagnosticStatus.WARN
            message = (f'server unreachable: {server.reason} (next try in '
                       f'{server.retry_in_s:.0f} s)')
        elif self._remote and self._last_inference_failed:
            level, message = DiagnosticStatus.WARN, f'the last request failed: ' \
                f'{self._last_failure}'
        elif self._remote and self._detector.engine.last_logprob_problem:
            level = DiagnosticStatus.WARN
            message = f'{self._detector.engine.last_logprob_problem}: every score is 1.0'
        elif self._last_inference_failed:
            level, message = DiagnosticStatus.WARN, 'the last inference failed'
        elif not self._enabled:
            level, message = DiagnosticStatus.OK, 'disabled'
        else:
            level, message = DiagnosticStatus.OK, 'running'
        status = DiagnosticStatus(level=level, name=f'{self.get_name()}: detection',
                                  hardware_id='qwen_vl_perception', message=message,
                                  values=[KeyValue(key=k, value=str(v))
                                          for k, v in values.items()])
        self._diagnostics_pub.publish(DiagnosticArray(
            header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))

    @property
    def detector(self) -> Detector:
        """The node's :class:`Detector` (its current settings, its engine); read-only."""
        return self._detector

    @property
    def frames_dropped(self) -> int:
        return self._slots.dropped

    def shutdown(self) -> None:
        """Stop the worker (it finishes the frame in flight) and join it; backend openai:
        requests in flight are cut off (an engine the node was given is left open and its
        requests finish)."""
        self._slots.close()
        if self._worker.is_alive():
            self._worker.join(timeout=60.0)
        if self._worker.is_alive():
            self.get_logger().warning('the inference in flight did not finish within 60 s')
        if self._requests is not None:
            if self._owns_engine:
                self._detector.engine.close()
            self._requests.shutdown(wait=True)

    def destroy_node(self):
        """Stop the worker first: it must not publish through handles being destroyed."""
        if getattr(self, '_worker', None) is not None:
            self.shutdown()
        return super().destroy_node()


def _qos_fields(profile: QoSProfile) -> dict:
    return {'history': profile.history, 'depth': profile.depth,
            'reliability': profile.reliability, 'durability': profile.durability}


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
