"""backend openai: the node's dispatcher thread and request threads.

The dispatcher hands each camera's newest frame to a request thread as soon as that camera
has none in flight and fewer than ``server_max_in_flight`` are; a request thread decodes, asks
the server and publishes, so each camera's results leave in the order of its frames. On-demand
goals go to a request thread first. While the server is unreachable no frame is sent (the
engine asks again with a back-off) and /diagnostics says WARN; a failed request drops its
frame, is counted and logged once per run of failures.
"""
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Tuple

from diagnostic_msgs.msg import DiagnosticStatus

from ..backends.http_client import RequestTimedOut, ServerError
from ..frame_slot import LatestFrameSlots
from .camera_input import Frame, decoded


class RemoteDispatcher:
    def __init__(self, node, slots: LatestFrameSlots, detector, max_in_flight: int,
                 max_rate_hz: Callable[[], float], publish: Callable, run_goal: Callable,
                 counters):
        self._node = node
        self._slots = slots
        self._detector = detector
        self._max_in_flight = max_in_flight
        self._max_rate_hz = max_rate_hz
        self._publish = publish  # (frame, result) -> False once shutting down
        self._run_goal = run_goal
        self._counters = counters
        self._lock = threading.Lock()
        self._failure_burst = 0  # failed requests since the last answer
        self.last_failure = ''
        self.last_failed = False
        self._requests = ThreadPoolExecutor(max_in_flight, thread_name_prefix='qwen_vl_request')
        self.thread = threading.Thread(target=self._dispatch, name='qwen_vl_dispatch',
                                       daemon=True)

    def _dispatch(self) -> None:
        engine = self._detector.engine
        next_start = 0.0
        while not self._slots.closed:
            for job in self._slots.take_all(timeout=0.0, frames=False):
                self._requests.submit(self._run_goal, job, self._detector)
            rate = self._max_rate_hz()
            wait = next_start - time.monotonic() if rate > 0.0 else 0.0
            if wait > 0.0:
                time.sleep(min(wait, 0.1))
                continue
            if not engine.ready():  # frames wait in their slots (the newest wins)
                time.sleep(min(0.1, max(engine.status.retry_in_s, 0.01)))
                continue
            taken = self._slots.take_free(self._max_in_flight, timeout=0.1)  # goals: 0.1 s
            if not taken:
                continue
            now = time.monotonic()
            self._counters.last_inference_start = now
            if rate > 0.0:
                next_start = now + len(taken) / rate
            with self._counters.lock:
                self._counters.largest_in_flight = max(self._counters.largest_in_flight,
                                                       self._slots.out)
            for source, frame in taken:
                self._requests.submit(self._serve_frame, source, frame)

    def _serve_frame(self, source, frame: Frame) -> None:
        """One frame through the server, published; its camera may then send the next."""
        try:
            if not decoded(self._node, self._counters, frame):
                return
            try:
                result = self._detector.detect([frame.rgb])[0]
            except Exception as error:  # noqa: BLE001 - the node must survive any failure
                self._failed(error)
                return
            self._answered()
            self._publish(frame, result)
        finally:
            self._slots.release(source)

    def _failed(self, error: Exception) -> None:
        if self._slots.closed:
            return  # shutting down: requests in flight are cut off, no failure of the server
        reason = str(error) if isinstance(error, ServerError) else repr(error)
        with self._lock:
            self._failure_burst += 1
            first = self._failure_burst == 1
            self.last_failure, self.last_failed = reason, True
        self._counters.add('inference_errors')
        self._counters.add('requests_timed_out', int(isinstance(error, RequestTimedOut)))
        if first:
            self._node.get_logger().error(
                f'a request failed, its frame is dropped: {reason} (further failures are '
                'counted in inference_errors, not logged, until the server answers again)')

    def _answered(self) -> None:
        with self._lock:
            failed, self._failure_burst = self._failure_burst, 0
            self.last_failed = False
        self._counters.add('batches')
        self._counters.largest_batch = 1
        if failed:
            self._node.get_logger().info(f'the server answers again ({failed} request'
                                         f"{'s' if failed != 1 else ''} failed before)")

    def status(self) -> Optional[Tuple[int, str]]:
        """A WARN about the server, or None."""
        engine = self._detector.engine
        server = engine.status
        if not server.reachable:
            return DiagnosticStatus.WARN, (f'server unreachable: {server.reason} (next try in '
                                           f'{server.retry_in_s:.0f} s)')
        if self.last_failed:
            return DiagnosticStatus.WARN, f'the last request failed: {self.last_failure}'
        if engine.last_logprob_problem:
            return DiagnosticStatus.WARN, f'{engine.last_logprob_problem}: every score is 1.0'
        return None

    def values(self) -> dict:
        engine = self._detector.engine
        return {'backend': 'openai', 'server_url': engine.server_url,
                'server_model': engine.model_name or '',
                'server_reachable': engine.status.reachable,
                'requests_in_flight': self._slots.out,
                'largest_in_flight': self._counters.largest_in_flight,
                'requests_timed_out': self._counters.requests_timed_out,
                'answers_without_logprobs': engine.answers_without_logprobs}

    def stop(self, close_engine: bool) -> None:
        """After the slots closed and the thread ended: cut requests in flight off (closing
        the engine, when the node owns it) and wait for the request threads."""
        if close_engine:
            self._detector.engine.close()
        self._requests.shutdown(wait=True)
