"""JSON over HTTP(S) with the standard library (``http.client``): no dependency to install.

Every failure is a :class:`ServerError` with a one-line message, of a kind the engine and the
node tell apart: the server cannot be reached (:class:`ServerUnreachable`), it did not answer
in time (:class:`RequestTimedOut`), it answered an HTTP error (:class:`HttpStatusError`,
:class:`AuthenticationError` for 401/403, with the server's own message), or its answer is not
the JSON expected (:class:`BadAnswer`). Headers (an API key) never appear in a message.

Connections are kept alive and reused, several at once (one per request in flight);
``https://`` verifies the server's certificate with the system's CAs (``SSL_CERT_FILE`` and
``SSL_CERT_DIR`` point OpenSSL at others, a private CA say).
"""
import http.client
import json
import re
import socket
import ssl
import threading
from typing import Dict, List, Optional
from urllib.parse import urlsplit

_MESSAGE_CHARS = 300
"""Most characters of a server's error message shown."""


class ServerError(RuntimeError):
    """A request to the server failed; ``str()`` is one line saying why."""


class ServerUnreachable(ServerError):
    """No connection (refused, unknown host, no route, connect time-out), or it was lost
    before the answer came (the server stopped)."""


class RequestTimedOut(ServerError):
    """Connected, but the answer did not come within the time-out."""


class HttpStatusError(ServerError):
    """The server answered with an HTTP error status."""

    def __init__(self, message: str, status: int, server_message: str):
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class AuthenticationError(HttpStatusError):
    """401 or 403: the API key is missing, wrong or not allowed."""


class BadAnswer(ServerError):
    """The answer is not JSON, or not of the shape expected."""


class JsonHttpClient:
    """GET and POST JSON to ``base_url`` (``http://host:port/path`` or ``https://...``).

    Thread-safe: each request takes an idle kept-alive connection or opens one. ``timeout_s``
    bounds connecting and each wait for the server (an answer comes in one piece, so in
    effect the whole request).
    """

    def __init__(self, base_url: str, timeout_s: float,
                 headers: Optional[Dict[str, str]] = None):
        parts = urlsplit(base_url)
        if parts.scheme not in ('http', 'https') or not parts.hostname:
            raise ValueError(f'a server URL must be http://HOST[:PORT]/PATH or https://..., '
                             f'not {base_url!r}')
        if parts.username or parts.password:
            raise ValueError('a server URL must not hold credentials (they would be logged); '
                             'give an API key through an environment variable')
        if parts.query or parts.fragment:
            raise ValueError(f'a server URL takes no query or fragment: {base_url!r}')
        try:
            port = parts.port
        except ValueError as error:
            raise ValueError(f'{base_url!r}: {error}') from None
        if not timeout_s > 0:
            raise ValueError(f'the time-out must be positive, not {timeout_s!r}')
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = port or (443 if parts.scheme == 'https' else 80)
        self.base_path = parts.path.rstrip('/')
        self.base_url = f'{self.scheme}://{parts.netloc}{self.base_path}'
        self.timeout_s = float(timeout_s)
        self._headers = {'Content-Type': 'application/json', 'Accept': 'application/json',
                         **(headers or {})}
        self._ssl = ssl.create_default_context() if self.scheme == 'https' else None
        self._lock = threading.Lock()
        self._idle: List[http.client.HTTPConnection] = []
        self._busy: set = set()
        self._closed = False

    def __repr__(self) -> str:  # never the headers: they may hold a key
        return f'JsonHttpClient({self.base_url!r})'

    def url(self, path: str) -> str:
        return self.base_url + path

    def get(self, path: str, timeout_s: Optional[float] = None):
        return self.request('GET', path, None, timeout_s)

    def post(self, path: str, body, timeout_s: Optional[float] = None):
        return self.request('POST', path, body, timeout_s)

    def request(self, method: str, path: str, body=None, timeout_s: Optional[float] = None):
        """The decoded JSON answer to ``method`` on ``base_url + path``."""
        data = None if body is None else json.dumps(body).encode('utf-8')
        url = self.url(path)
        timeout = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        for attempt in (0, 1):
            connection, reused = self._take(timeout)
            try:
                status, payload = self._exchange(connection, reused, method, path, data,
                                                 timeout, url)
            except _StaleConnection:
                # A kept-alive connection the server had closed meanwhile: once more, anew.
                self._discard(connection)
                if attempt == 0:
                    continue
                raise ServerUnreachable(f'{url}: the server closed the connection') from None
            except BaseException:
                self._discard(connection)
                raise
            self._give_back(connection)
            return _decoded(status, payload, url)
        raise AssertionError('unreachable')

    def close(self) -> None:
        """Close every connection, including those of requests in flight (they fail with
        :class:`ServerUnreachable`); later requests fail too."""
        with self._lock:
            self._closed = True
            connections = self._idle + list(self._busy)
            self._idle = []
        for connection in connections:
            sock = connection.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
                except OSError:
                    pass
            connection.close()

    # -- connections ---------------------------------------------------------------------
    def _take(self, timeout: float):
        with self._lock:
            if self._closed:
                raise ServerUnreachable(f'{self.base_url}: the client is closed')
            connection = self._idle.pop() if self._idle else None
            reused = connection is not None
            if connection is None:
                if self._ssl is not None:
                    connection = http.client.HTTPSConnection(self.host, self.port,
                                                             timeout=timeout,
                                                             context=self._ssl)
                else:
                    connection = http.client.HTTPConnection(self.host, self.port,
                                                            timeout=timeout)
            self._busy.add(connection)
        connection.timeout = timeout
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        return connection, reused

    def _give_back(self, connection) -> None:
        with self._lock:
            self._busy.discard(connection)
            if not self._closed and connection.sock is not None:
                self._idle.append(connection)
                return
        connection.close()

    def _discard(self, connection) -> None:
        with self._lock:
            self._busy.discard(connection)
        connection.close()

    def _exchange(self, connection, reused, method, path, data, timeout, url):
        if connection.sock is None:
            try:
                connection.connect()
            except ssl.SSLError as error:
                raise ServerUnreachable(f'{url}: TLS failed: {_one_line(str(error))}') from None
            except (socket.timeout, TimeoutError):
                raise ServerUnreachable(f'{url}: no connection within {timeout:g} s') from None
            except socket.gaierror as error:
                raise ServerUnreachable(f'{url}: unknown host {self.host!r} '
                                        f'({error.strerror or error})') from None
            except OSError as error:
                raise ServerUnreachable(f'{url}: cannot connect '
                                        f'({error.strerror or error})') from None
        try:
            connection.request(method, self.base_path + path, body=data,
                               headers=self._headers)
            response = connection.getresponse()
            payload = response.read()
        except (socket.timeout, TimeoutError):
            raise RequestTimedOut(f'{url}: no answer within {timeout:g} s') from None
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                ConnectionAbortedError) as error:
            if reused:
                raise _StaleConnection() from None
            raise ServerUnreachable(f'{url}: the server closed the connection before '
                                    f'answering ({type(error).__name__})') from None
        except (http.client.HTTPException, OSError) as error:
            raise ServerUnreachable(f'{url}: the connection failed '
                                    f'({_one_line(str(error)) or type(error).__name__})') \
                from None
        if response.will_close:
            connection.close()
        return response.status, payload


class _StaleConnection(Exception):
    pass


def _decoded(status: int, payload: bytes, url: str):
    if status >= 400:
        message = server_message(payload)
        text = f'HTTP {status} from {url}' + (f': {message}' if message else '')
        if status in (401, 403):
            raise AuthenticationError(f'authentication failed: {text}', status, message)
        raise HttpStatusError(text, status, message)
    try:
        return json.loads(payload.decode('utf-8'))
    except (UnicodeDecodeError, ValueError):
        raise BadAnswer(f'the answer from {url} (HTTP {status}) is not JSON: '
                        f'{_one_line(payload.decode("utf-8", "replace"))!r}') from None


def server_message(payload: bytes) -> str:
    """The message an error answer carries, in one line: OpenAI's ``{"error": {"message"}}``,
    ``{"message"}``, ``{"detail"}`` or ``{"error": "..."}``, else the body's text."""
    text = payload.decode('utf-8', 'replace')
    try:
        answer = json.loads(text)
    except ValueError:
        return _one_line(text)
    if isinstance(answer, dict):
        error = answer.get('error')
        if isinstance(error, dict) and error.get('message'):
            return _one_line(str(error['message']))
        for candidate in (error, answer.get('message'), answer.get('detail')):
            if candidate:
                return _one_line(candidate if isinstance(candidate, str)
                                 else json.dumps(candidate))
    return _one_line(text)


def _one_line(text: str) -> str:
    line = re.sub(r'\s+', ' ', text).strip()
    return line if len(line) <= _MESSAGE_CHARS else line[:_MESSAGE_CHARS - 3] + '...'
