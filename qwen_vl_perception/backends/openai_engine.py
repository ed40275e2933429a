"""The ``openai`` backend: the model served by an OpenAI-compatible server (vLLM, SGLang,
llama.cpp's server, ...) behind the local engine's interface.

:class:`OpenAIEngine` answers ``generate(images, instruction, max_new_tokens)`` with one
:class:`~qwen_vl_perception.model.generation.Generation` per image, as
:class:`~qwen_vl_perception.model.engine.VisionLanguageEngine` does, so the Detector, parser,
scores and messages are the same. Each image is one ``POST /chat/completions``: the Detector's
instruction, then the image at the model's pixel budget as a PNG data URL (:mod:`.images`),
greedy (``temperature: 0``), ``max_tokens``, ``logprobs: true``; the answer's token
log-probabilities give the scores (:mod:`.answers`). Requests for the images of one call run
at once, at most ``max_in_flight``; ``generate`` may be called from several threads.

Server state: :meth:`connect` asks ``GET /models`` which models are served and picks
``model`` (or the only one); :meth:`ready` says whether the server is believed reachable and,
when it is not, asks again with a growing back-off (1 s doubling to 10 s). A request that
finds the server gone marks it unreachable. Nothing here imports torch.
"""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

from ..model.generation import Generation
from ..model.pixel_budget import (DEFAULT_IMAGE_FACTOR, NODE_MAX_PIXELS, NODE_MIN_PIXELS,
                                  image_factor, model_pixel_budget)
from ..prompt import build_messages
from .answers import Answer, parse_answer
from .http_client import (AuthenticationError, BadAnswer, HttpStatusError, JsonHttpClient,
                          ServerError, ServerUnreachable)
from .images import image_for_server

PathLike = Union[str, Path]

RETRY_FIRST_S = 1.0
RETRY_MAX_S = 10.0
PROBE_TIMEOUT_S = 10.0
"""``GET /models`` waits at most this long (or the request time-out, if shorter)."""


class ServerModelError(ServerError):
    """The server does not serve the model asked for (or serves several and none was named);
    the message lists what it serves."""


@dataclass(frozen=True)
class ServerStatus:
    """What the engine knows of its server: ``reachable``, and when not, why and in how many
    seconds it asks again."""

    reachable: bool
    reason: str = ''
    retry_in_s: float = 0.0


class OpenAIEngine:
    """A served Qwen3-VL behind the local engine's ``generate`` (see the module docstring).

    ``server_url``: the API base, e.g. ``http://gpu-box:8000/v1`` (a URL without a path gets
    ``/v1``). ``model``: the served model's name ('' = the server's only model).
    ``api_key_env``: the *name* of an environment variable holding the API key (sent as
    ``Authorization: Bearer``), '' for none. ``min_pixels``/``max_pixels``/``factor``: the
    model's pixel budget and side multiple (:meth:`for_model` reads them from a model folder).
    """

    concurrent = True
    """``generate`` may run in several threads at once (the Detector does not serialise it)."""

    def __init__(self, server_url: str, model: str = '', api_key_env: str = '',
                 timeout_s: float = 30.0, max_in_flight: int = 4,
                 min_pixels: int = NODE_MIN_PIXELS, max_pixels: int = NODE_MAX_PIXELS,
                 factor: int = DEFAULT_IMAGE_FACTOR,
                 environ: Optional[Mapping[str, str]] = None):
        if max_in_flight < 1:
            raise ValueError('max_in_flight must be at least 1')
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f'need 0 < min_pixels <= max_pixels, got {min_pixels}, '
                             f'{max_pixels}')
        headers = {}
        if api_key_env:
            key = (os.environ if environ is None else environ).get(api_key_env, '')
            if not key.strip():
                raise ValueError(f'server_api_key_env names {api_key_env}, which is not set '
                                 '(or empty) in the environment')
            headers['Authorization'] = f'Bearer {key.strip()}'
        url = server_url.strip()
        if url.rstrip('/').count('/') == 2:  # scheme://host[:port] without a path
            url = url.rstrip('/') + '/v1'
        self._client = JsonHttpClient(url, timeout_s, headers)
        self.server_url = self._client.base_url
        self.requested_model = model
        self.model_name: Optional[str] = model or None
        self.served_models: List[str] = []
        self.min_pixels, self.max_pixels, self.factor = int(min_pixels), int(max_pixels), \
            int(factor)
        self.max_in_flight = int(max_in_flight)
        self.answers_without_logprobs = 0
        self.last_logprob_problem: Optional[str] = None
        self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix='qvp_request')
        self._state_lock = threading.Lock()
        self._reachable = False
        self._reason = 'not contacted yet'
        self._backoff = 0.0
        self._next_probe = 0.0
        self._closed = False

    @classmethod
    def for_model(cls, server_url: str, model_dir: Optional[PathLike] = None,
                  min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                  **kwargs) -> 'OpenAIEngine':
        """An engine at the pixel budget of the served model's folder ``model_dir``
        (what it was fine-tuned at, see :func:`~.pixel_budget.model_pixel_budget`) or of the
        values given; without either, the node's defaults and Qwen3-VL's factor."""
        if model_dir:
            min_pixels, max_pixels = model_pixel_budget(model_dir, min_pixels, max_pixels)
        return cls(server_url, min_pixels=min_pixels or NODE_MIN_PIXELS,
                   max_pixels=max_pixels or NODE_MAX_PIXELS,
                   factor=image_factor(model_dir), **kwargs)

    def __repr__(self) -> str:
        return f'OpenAIEngine({self.server_url!r}, model={self.model_name!r})'

    @property
    def description(self) -> str:
        """Where the model runs, for logs: ``model 'NAME' at URL``."""
        name = repr(self.model_name) if self.model_name else "(the server's only)"
        return f'model {name} at {self.server_url}'

    # -- the server's state -------------------------------------------------------------
    def connect(self) -> List[str]:
        """Ask the server which models it serves and pick the one to use; returns them.

        :class:`ServerModelError` if ``model`` is not among them (or it serves several and
        none was named), :class:`AuthenticationError` for a refused key, another
        :class:`ServerError` if it cannot be asked. The state is updated either way.
        """
        try:
            answer = self._client.get('/models', timeout_s=PROBE_TIMEOUT_S)
            served = _model_names(answer, self._client.url('/models'))
            name = self._pick_model(served)
        except ServerError as error:
            self._mark_unreachable(str(error))
            raise
        with self._state_lock:
            self.served_models = served
            self.model_name = name
            self._reachable, self._reason, self._backoff = True, '', 0.0
        return served

    def ready(self) -> bool:
        """True when the server is believed reachable; otherwise, once its back-off has
        passed, :meth:`connect` is tried (no exception: :attr:`status` says why not)."""
        with self._state_lock:
            if self._reachable:
                return True
            if self._closed or time.monotonic() < self._next_probe:
                return False
        try:
            self.connect()
        except ServerError:
            return False
        return True

    @property
    def status(self) -> ServerStatus:
        with self._state_lock:
            if self._reachable:
                return ServerStatus(True)
            return ServerStatus(False, self._reason,
                                max(0.0, self._next_probe - time.monotonic()))

    def _mark_unreachable(self, reason: str) -> None:
        with self._state_lock:
            self._backoff = (RETRY_FIRST_S if self._reachable or not self._backoff
                             else min(self._backoff * 2.0, RETRY_MAX_S))
            self._reachable, self._reason = False, reason
            self._next_probe = time.monotonic() + self._backoff

    def _pick_model(self, served: List[str]) -> str:
        offered = ', '.join(repr(name) for name in served) or 'none'
        if self.requested_model:
            if self.requested_model not in served:
                raise ServerModelError(
                    f"server_model {self.requested_model!r} is not served by "
                    f'{self.server_url}; it serves: {offered}')
            return self.requested_model
        if len(served) != 1:
            raise ServerModelError(
                f'{self.server_url} serves {len(served)} models ({offered}): name one in '
                'server_model')
        return served[0]

    # -- generation ---------------------------------------------------------------------
    def generate(self, images: Sequence, instruction: str, max_new_tokens: int = 512,
                 on_step=None) -> List[Generation]:
        """Greedy answers for RGB ``images`` (HxWx3 uint8), one request each, at once.

        ``on_step`` (the local engine's per-token hook) is not called: a served answer comes
        whole, so there is no progress to tell and a cancel takes effect when it has come.
        """
        return [answer.generation for answer in self.answers(images, instruction,
                                                             max_new_tokens)]

    def answers(self, images: Sequence, instruction: str,
                max_new_tokens: int = 512) -> List[Answer]:
        """As :meth:`generate`, with what the server said beside each generation (whether
        it gave log-probabilities, its prompt token count)."""
        if max_new_tokens < 1:
            raise ValueError('max_new_tokens must be at least 1')
        images = list(images)
        if not images:
            raise ValueError('images is empty')
        if self._closed:
            raise RuntimeError('the engine is closed')
        if self.model_name is None:
            self.connect()
        if len(images) == 1:
            return [self.answer(images[0], instruction, max_new_tokens)]
        futures = [self._pool.submit(self.answer, image, instruction, max_new_tokens)
                   for image in images]
        errors = [future.exception() for future in futures]
        for error in errors:
            if error is not None:
                raise error
        return [future.result() for future in futures]

    def answer(self, image, instruction: str, max_new_tokens: int) -> Answer:
        """One image's request and its parsed answer."""
        data_url, size = image_for_server(image, self.min_pixels, self.max_pixels,
                                          self.factor)
        body = {
            'model': self.model_name,
            'messages': _with_image_url(build_messages(instruction), data_url),
            'temperature': 0,
            'max_tokens': int(max_new_tokens),
            'logprobs': True,
            'n': 1,
            'stream': False,
        }
        try:
            reply = self._client.post('/chat/completions', body)
        except ServerUnreachable as error:
            self._mark_unreachable(str(error))
            raise
        except HttpStatusError as error:
            if error.status == 404 and not isinstance(error, AuthenticationError):
                self._mark_unreachable(str(error))  # e.g. the model is no longer served
            raise
        try:
            answer = parse_answer(reply, size)
        except ValueError as error:
            raise BadAnswer(f'the answer from {self._client.url("/chat/completions")} is '
                            f'not a chat completion: {error}') from None
        with self._state_lock:
            self.answers_without_logprobs += int(answer.logprob_problem is not None)
            self.last_logprob_problem = answer.logprob_problem
        return answer

    def close(self) -> None:
        """Stop: requests in flight fail at once, later calls fail."""
        with self._state_lock:
            self._closed = True
            self._reachable, self._reason = False, 'closed'
        self._client.close()
        self._pool.shutdown(wait=False)


def _model_names(answer, url: str) -> List[str]:
    """The ``id`` of every entry of an OpenAI ``/models`` answer."""
    data = answer.get('data') if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise BadAnswer(f'the answer from {url} is not a model list (no "data" list)')
    return [str(entry['id']) for entry in data if isinstance(entry, dict) and 'id' in entry]


def _with_image_url(messages, data_url: str):
    """The prompt builder's messages (the local engine's, in its order) with the image part
    as an OpenAI ``image_url`` carrying ``data_url``."""
    image = {'type': 'image_url', 'image_url': {'url': data_url}}
    return [dict(message, content=[image if part.get('type') == 'image' else part
                                   for part in message['content']]) for message in messages]
