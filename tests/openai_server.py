"""A real OpenAI-compatible HTTP server for the tests: /v1/completions and /v1/chat/completions served by the
tiny test model on 127.0.0.1 (an ephemeral port), with knobs to make it slow, failing or picky about keys."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class TinyOpenAIServer:
    def __init__(self, model_dir: Path, model_name: str = "tiny", api_key: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.model_name, self.api_key = model_name, api_key
        self.failures: list[int] = []  # status codes answered to the next requests, one each, before serving
        self.delay_s = 0.0  # seconds to wait before answering
        self.received: list[dict] = []  # {"path", "authorization", "body"} of every request, in arrival order
        # a misbehaving server: redirect (to `redirect_to`), drip (one byte at a time), huge (an endless body),
        # indices (every choice index 0), html (the answer labelled text/html)
        self.evil: str | None = None
        self.redirect_to = ""
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._http.daemon_threads = True  # a handler still sleeping for a timed-out client does not block close
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def __enter__(self) -> "TinyOpenAIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._http.shutdown()
        self._http.server_close()

    def reset(self) -> None:
        self.failures, self.delay_s, self.received, self.evil, self.redirect_to = [], 0.0, [], None, ""

    # ---- serving

    def answer(self, path: str, authorization: str | None, body: dict) -> tuple[int, dict]:
        with self._lock:
            self.received.append({"path": path, "authorization": authorization, "body": body})
            failure = self.failures.pop(0) if self.failures else None
        # like some real servers, the errors echo the credentials they got: the client must redact them
        if self.api_key and authorization != f"Bearer {self.api_key}":
            return 401, {"error": {"message": f"invalid API key (got {authorization})"}}
        if failure is not None:
            return failure, {"error": {"message": f"injected failure {failure} (got {authorization})"}}
        if self.delay_s:
            time.sleep(self.delay_s)
        if body.get("model") != self.model_name:
            return 404, {"error": {"message": f"model '{body.get('model')}' does not exist"}}
        n, max_tokens = int(body.get("n", 1)), int(body.get("max_tokens", 16))
        if path == "/v1/completions":
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            texts = prompts
            key = "text"
        elif path == "/v1/chat/completions":
            texts = [self.tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)]
            key = "message"
        else:
            return 404, {"error": {"message": f"no route {path}"}}
        choices = []
        for p, text in enumerate(texts):
            for j, (output, reason) in enumerate(self._sample(text, n, max_tokens, body)):
                content = output if key == "text" else {"role": "assistant", "content": output}
                choices.append({"index": p * n + j, key: content, "finish_reason": reason})
        return 200, {"object": "chat.completion" if key == "message" else "text_completion",
                     "model": self.model_name, "choices": choices}

    def _sample(self, text: str, n: int, max_tokens: int, body: dict) -> list[tuple[str, str]]:
        torch = self.torch
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        temperature = float(body.get("temperature", 1.0))
        with self._lock, torch.no_grad():  # one generation at a time: the model is shared by handler threads
            torch.manual_seed(int(body.get("seed", 0)))
            out = self.model.generate(ids.repeat(n, 1), attention_mask=torch.ones_like(ids).repeat(n, 1),
                                      do_sample=temperature > 0, temperature=temperature or None,
                                      top_p=float(body.get("top_p", 1.0)) if temperature > 0 else None,
                                      max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id)
        results = []
        for row in out[:, ids.shape[1]:].tolist():
            end = row.index(self.tokenizer.eos_token_id) if self.tokenizer.eos_token_id in row else None
            results.append((self.tokenizer.decode(row[:end], skip_special_tokens=True),
                            "stop" if end is not None else "length"))
        return results

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if server.evil in ("redirect", "drip", "huge"):
                    server.received.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                            "body": body})
                    try:
                        self.misbehave(server.evil)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                status, answer = server.answer(self.path, self.headers.get("Authorization"), body)
                if server.evil == "indices" and status == 200:
                    for choice in answer["choices"]:
                        choice["index"] = 0
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/html" if server.evil == "html" else "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout under test)

            def misbehave(self, how: str) -> None:
                if how == "redirect":
                    self.send_response(302)
                    self.send_header("Location", server.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if how == "drip":  # a valid length, then a byte every 0.1 s: each read is quick, the whole is not
                    self.send_header("Content-Length", "200")
                    self.end_headers()
                    for _ in range(200):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.1)
                else:  # no length, and more than any answer needs
                    self.end_headers()
                    for _ in range(64):
                        self.wfile.write(b" " * 2**20)

            def log_message(self, *args):
                pass

        return Handler
