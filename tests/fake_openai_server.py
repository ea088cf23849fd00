"""An OpenAI-compatible /v1/completions server over a tiny local model, for tests. Loopback only."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class FakeCompletionsServer:
    def __init__(self, handle, accept_token_ids: bool = True):
        self.handle = handle
        self.accept_token_ids = accept_token_ids
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                status, reply = server.complete(body)
                payload = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/v1"

    def complete(self, body: dict) -> tuple[int, dict]:
        prompt = body["prompt"]
        if isinstance(prompt, list):
            if not self.accept_token_ids:
                return 400, {"error": "prompt must be a string"}
            ids = prompt
        else:
            ids = self.handle.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        stops = self.handle.chat.end_of_turn_ids
        bias = [[[int(token)], value] for token, value in body.get("logit_bias", {}).items()] or None
        with self.lock, torch.no_grad():
            output = self.handle.model.generate(torch.tensor([ids]), max_new_tokens=body["max_tokens"],
                                                do_sample=False, eos_token_id=stops, pad_token_id=0,
                                                sequence_bias=bias)
        new = output[0, len(ids):].tolist()
        finish = "stop" if new and new[-1] in stops else "length"
        new = [token for token in new if token not in stops]
        return 200, {"choices": [{"text": self.handle.tokenizer.decode(new), "token_ids": new,
                                  "finish_reason": finish}]}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
