"""A real vLLM server for the tests: its venv (``tools/setup_vllm.sh``), a process on
127.0.0.1 serving a model folder, stopped or killed by the test.

Run alone to serve the default model by hand (float32, as the tests do)::

    .venv/bin/python test/support/vllm_server.py [PORT]
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / 'tools' / 'setup_vllm.sh'
VENV = Path(os.environ.get('QVP_VLLM_VENV', ROOT / '.venv-vllm'))
SETUP_TIMEOUT_S = 3600
START_TIMEOUT_S = 1200
"""A loaded 2-core machine: start-up took about 1 minute idle (with ``--enforce-eager``)."""
SERVED_NAME = 'default'


def build_venv():
    """(ok, seconds, log tail): runs the idempotent setup script."""
    started = time.monotonic()
    try:
        result = subprocess.run(['bash', str(SETUP)], capture_output=True, text=True,
                                timeout=SETUP_TIMEOUT_S,
                                env=dict(os.environ, QVP_VLLM_VENV=str(VENV)))
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - started, f'no result within {SETUP_TIMEOUT_S} s'
    tail = '\n'.join((result.stdout + result.stderr).strip().splitlines()[-15:])
    return result.returncode == 0, time.monotonic() - started, tail


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` on ``port``, in a session of its own
    (so that its engine processes go with it)."""

    def __init__(self, model_dir: Path, port: int, log_path: Path, *extra: str):
        self.model_dir, self.port, self.log_path = Path(model_dir), port, Path(log_path)
        self.extra = extra
        self.url = f'http://127.0.0.1:{port}/v1'
        self.process = None
        self.start_seconds = None

    def command(self):
        return [str(VENV / 'bin' / 'python'), '-m', 'vllm.entrypoints.openai.api_server',
                '--model', str(self.model_dir), '--served-model-name', SERVED_NAME,
                '--host', '127.0.0.1', '--port', str(self.port), '--dtype', 'float32',
                '--max-model-len', '2048', '--enforce-eager', *self.extra]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Start and wait until ``GET /v1/models`` answers; returns the seconds it took.
        RuntimeError with the log's end if it exits or does not answer in time."""
        env = dict(os.environ, VLLM_TARGET_DEVICE='cpu', VLLM_CPU_KVCACHE_SPACE='1',
                   HF_HUB_OFFLINE='1', VLLM_NO_USAGE_STATS='1', DO_NOT_TRACK='1')
        env.pop('PYTHONPATH', None)  # the server's venv, not the project's modules
        started = time.monotonic()
        with open(self.log_path, 'a') as log:
            self.process = subprocess.Popen(self.command(), env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f'vLLM exited with {self.process.returncode}:\n'
                                   f'{self.log_tail()}')
            if self.answers():
                self.start_seconds = time.monotonic() - started
                return self.start_seconds
            time.sleep(1.0)
        self.kill()
        raise RuntimeError(f'vLLM did not answer within {timeout_s:.0f} s:\n{self.log_tail()}')

    def answers(self) -> bool:
        import urllib.request
        try:
            with urllib.request.urlopen(self.url + '/models', timeout=5) as reply:
                return reply.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server and its engine processes (its session), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=60)

    def stop(self) -> None:
        """SIGTERM (vLLM shuts its engine down), SIGKILL after 60 s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
        try:  # engine processes left behind by the API server
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 30) -> str:
        try:
            return '\n'.join(self.log_path.read_text(errors='replace').splitlines()[-lines:])
        except OSError:
            return '(no log)'


if __name__ == '__main__':
    sys.path.insert(0, str(ROOT))
    from qwen_vl_perception.model.default_model import ensure_default_model
    ok, seconds, tail = build_venv()
    if not ok:
        sys.exit(f'the vLLM venv could not be built:\n{tail}')
    import tempfile
    log = Path(tempfile.mkstemp(prefix='vllm-server-', suffix='.log')[1])
    server = VllmServer(ensure_default_model('none'), int(sys.argv[1]) if sys.argv[1:] else 8000,
                        log)
    print(f'starting {" ".join(server.command())} (log: {log})', flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stops the server as Ctrl-C does
    try:
        print(f'serving at {server.url} after {server.start():.0f} s; Ctrl-C stops it',
              flush=True)
        server.process.wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.stop()
