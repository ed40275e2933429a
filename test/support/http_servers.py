"""Real server processes for the remote backend's tests: the configurable answer server
(``answer_server.py``), a free port, a self-signed certificate for HTTPS, and the frame and
answer the tests send and serve."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ANSWER_SERVER = Path(__file__).with_name('answer_server.py')
IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
"""The camera frame the tests send (64 x 48, random)."""
ANSWER = '```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "cup"}]\n```'
"""A Qwen3-VL answer with one cup (``AnswerServer(content=ANSWER)`` serves it)."""


def free_port() -> int:
    """A port nobody listens on now (bound and closed again; nothing else binds it here)."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


class AnswerServer:
    """``answer_server.py`` in its own process, configured as its docstring says."""

    def __init__(self, **config):
        self.config = config
        self.process = subprocess.Popen([sys.executable, str(ANSWER_SERVER), json.dumps(config)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        line = self.process.stdout.readline()
        if not line.strip():
            self.process.kill()
            raise RuntimeError(f'the answer server did not start (exit {self.process.wait()})')
        self.port = int(line)
        scheme = 'https' if config.get('certfile') else 'http'
        self.url = f'{scheme}://127.0.0.1:{self.port}/v1'

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def requests(self):
        """What the server recorded (``record=...`` given)."""
        path = Path(self.config['record'])
        return [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def self_signed_certificate(folder: Path):
    """(certificate, key) for 127.0.0.1 made by the openssl command, or None without it."""
    cert, key = folder / 'cert.pem', folder / 'key.pem'
    try:
        subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
                        '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1',
                        '-keyout', str(key), '-out', str(cert)],
                       check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.CalledProcessError):
        return None
    return cert, key
