"""A real HTTP server process for the remote backend's fault tests: answers as configured.

Run as ``python test/support/answer_server.py CONFIG_JSON``; it prints its port on the first
line of standard output and serves on 127.0.0.1 until its standard input closes (or it is
killed).
CONFIG keys (all optional):

- ``port``: the port to bind (default: a free one);
- ``models``: names ``GET /v1/models`` lists (default ``["default"]``);
- ``status``, ``body``: what ``POST /v1/chat/completions`` answers (default 200 and a chat
  completion without log-probabilities, whose text is ``content``); ``body`` is sent as it
  is, so it can be anything, bad JSON included;
- ``models_status``, ``models_body``: the same for ``GET /v1/models``;
- ``fail_first``: only the first this many chat completions answer ``status`` and ``body``,
  later ones 200 and the chat completion (a server that fails for a while);
- ``delay_s``: seconds to wait before answering a chat completion;
- ``record``: a file each request's method, path and Authorization header are appended to
  (as JSON lines);
- ``certfile``, ``keyfile``: serve HTTPS with this certificate.
"""
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(config: dict) -> None:
    models = config.get('models', ['default'])
    content = config.get('content', '[]')
    default_chat = json.dumps({
        'id': 'chat-1', 'object': 'chat.completion', 'model': models[0] if models else '',
        'choices': [{'index': 0, 'finish_reason': 'stop',
                     'message': {'role': 'assistant', 'content': content}}],
        'usage': {'prompt_tokens': 10, 'completion_tokens': 3, 'total_tokens': 13}})
    chats = iter(range(1 << 62))  # next() is atomic under the GIL: requests' order
    models_body = config.get('models_body', json.dumps(
        {'object': 'list', 'data': [{'id': name, 'object': 'model'} for name in models]}))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args):
            pass

        def _record(self):
            if config.get('record'):
                with open(config['record'], 'a') as stream:
                    stream.write(json.dumps({
                        'method': self.command, 'path': self.path,
                        'authorization': self.headers.get('Authorization')}) + '\n')

        def _send(self, status, body):
            data = body.encode('utf-8')
            self.send_response(status)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._record()
            if self.path == '/v1/models':
                self._send(config.get('models_status', 200), models_body)
            else:
                self._send(404, json.dumps({'detail': 'Not Found'}))

        def do_POST(self):
            length = int(self.headers.get('Content-Length', 0))
            self.rfile.read(length)
            self._record()
            if self.path != '/v1/chat/completions':
                self._send(404, json.dumps({'detail': 'Not Found'}))
                return
            time.sleep(config.get('delay_s', 0))
            if next(chats) >= config.get('fail_first', float('inf')):
                self._send(200, default_chat)
                return
            self._send(config.get('status', 200), config.get('body', default_chat))

    server = ThreadingHTTPServer(('127.0.0.1', config.get('port', 0)), Handler)
    server.daemon_threads = True
    if config.get('certfile'):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(config['certfile'], config['keyfile'])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sys.stdin.read()
    server.shutdown()


if __name__ == '__main__':
    main(json.loads(sys.argv[1]))
