"""Samples from any OpenAI-compatible server: /v1/completions or /v1/chat/completions (vLLM, SGLang, TGI,
llama.cpp's server, Ollama, hosted APIs).

Requests run `max_concurrency` at a time, each asking for all K samples of its prompts (`n`). A request that
times out (timeout_s bounds the whole exchange, not each read), cannot connect or gets HTTP 408/429/5xx is retried
after `retry_backoff_s`, doubled at each retry; other HTTP errors mean the request itself is wrong and stop the run
at once. The API key is sent in the Authorization header only, and only to the configured scheme, host and port
(a redirect elsewhere stops the run); it is never part of a sample's settings, a message or a log line, and URLs
are written without credentials. Answers are bounded in size and must be JSON with each choice index once.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import re
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from raft.errors import RaftError
from raft.generators.sampling import SamplingSettings, chat_messages, seed_of
from raft.interface import META_FINISHED, META_GENERATOR, META_PROMPT_SENT, META_SETTINGS, Generator, Sample

RETRIED_STATUS = {408, 429}  # and every 5xx: the server is busy or broken now, perhaps not in a moment
REDIRECT_STATUS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 3
MAX_RESPONSE_BYTES = 64 * 2**20  # an answer of K samples of a few prompts is kilobytes; this bounds a broken server
SECRET_QUERY = re.compile(r"key|token|secret|password|passwd|auth|signature|sig$|credential", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` without credentials: the password of user:password@ and secret-looking query values become ***."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = "&".join(
        f"{name}=***" if SECRET_QUERY.search(name) else (f"{name}={value}" if sep else name)
        for name, sep, value in (pair.partition("=") for pair in parts.query.split("&") if pair))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_credentials(url: str) -> str | None:
    """What in `url` is a credential (for the config check), or None."""
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:
        return "user:password@"
    names = [pair.partition("=")[0] for pair in parts.query.split("&") if pair]
    secret = [name for name in names if SECRET_QUERY.search(name)]
    return f"query parameter {secret[0]!r}" if secret else None


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def _proxy_for(parts: urllib.parse.SplitResult) -> urllib.parse.SplitResult | None:
    """The proxy the environment names for this URL (HTTP_PROXY, HTTPS_PROXY, NO_PROXY), or None."""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.netloc.rsplit("@", 1)[-1]):
        return None
    return urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")


def _proxy_headers(proxy: urllib.parse.SplitResult) -> dict[str, str]:
    if proxy.username is None:
        return {}
    import base64

    login = f"{urllib.parse.unquote(proxy.username)}:{urllib.parse.unquote(proxy.password or '')}"
    return {"Proxy-Authorization": "Basic " + base64.b64encode(login.encode()).decode()}


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


class OpenAICompatibleSampler(Generator):
    def __init__(
        self,
        url: str,
        model: str,
        sampling: SamplingSettings,
        endpoint: str = "chat",
        name: str = "http",
        api_key: str | None = None,
        system_prompt: str | None = None,
        prompts_per_request: int = 8,
        max_concurrency: int = 4,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        retry_backoff_s: float = 1.0,
        request_params: dict[str, Any] | None = None,
        progress: bool = True,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ):
        if endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be chat or completions, got {endpoint!r}")
        if endpoint == "completions" and system_prompt:
            raise ValueError("a system prompt needs the chat endpoint")
        self.base_url = url.rstrip("/")
        self.url = f"{self.base_url}/{'chat/completions' if endpoint == 'chat' else 'completions'}"
        self.model, self.sampling, self.endpoint, self.name = model, sampling, endpoint, name
        self._api_key = api_key
        self.system_prompt = system_prompt
        self.prompts_per_request = prompts_per_request if endpoint == "completions" else 1
        self.max_concurrency, self.timeout_s = max_concurrency, timeout_s
        self.max_retries, self.retry_backoff_s = max_retries, retry_backoff_s
        self.request_params = dict(request_params or {})
        self.progress = progress
        self.max_response_bytes = max_response_bytes
        self.shown_url = redact_url(self.url)  # what messages and samples show: no credentials
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be an http:// or https:// address, got {self.shown_url!r}")
        if api_key and parts.scheme == "http" and not is_loopback(parts.hostname):
            print(f"raft: warning: generator '{name}' sends its API key over plain http to {parts.hostname}, where "
                  f"anyone on the way can read it; use https", file=sys.stderr, flush=True)

    def __repr__(self) -> str:  # no key in reprs, tracebacks' locals or debuggers
        return f"OpenAICompatibleSampler(url={self.shown_url!r}, model={self.model!r}, name={self.name!r})"

    def generate(self, prompts: list[str], samples_per_prompt: int, seed: int) -> list[Sample]:
        budgets = self.sampling.budgets(len(prompts), np.random.default_rng(seed))
        # prompts with the same budget share a request (max_tokens is per request), in their original order
        requests: list[list[int]] = []
        for budget in dict.fromkeys(budgets):
            same = [i for i, b in enumerate(budgets) if b == budget]
            requests += [same[i : i + self.prompts_per_request] for i in range(0, len(same), self.prompts_per_request)]
        bodies = [self._body([prompts[i] for i in request], samples_per_prompt, budgets[request[0]],
                             seed_of(seed, number)) for number, request in enumerate(requests)]
        answers = self._post_all(bodies)

        samples = []
        choices: dict[int, list[tuple[str, str | None, int]]] = {}  # (text, finish_reason, request seed)
        for request, body, answer in zip(requests, bodies, answers):
            per_prompt = self._choices(answer, len(request), samples_per_prompt)
            for position, index in enumerate(request):
                choices[index] = [(text, reason, body["seed"]) for text, reason in per_prompt[position]]
        for index, prompt in enumerate(prompts):
            for text, reason, request_seed in choices[index]:
                settings = {"url": redact_url(self.base_url), "endpoint": self.endpoint, "model": self.model,
                            "temperature": self.sampling.temperature, "top_p": self.sampling.top_p,
                            "max_new_tokens": budgets[index], "seed": request_seed}
                if self.sampling.top_k:
                    settings["top_k"] = self.sampling.top_k
                if self.system_prompt:
                    settings["system_prompt"] = self.system_prompt
                samples.append(Sample(
                    prompt_index=index,
                    prompt=prompt,
                    output=text,
                    meta={META_GENERATOR: self.name, META_PROMPT_SENT: prompt,
                          META_FINISHED: reason != "length",  # ended on its own rather than running out of tokens
                          META_SETTINGS: {**settings, **self.request_params}},
                ))
        return samples

    # ---- requests

    def _body(self, prompts: list[str], n: int, max_tokens: int, seed: int) -> dict[str, Any]:
        s = self.sampling
        body: dict[str, Any] = {"model": self.model, "n": n, "max_tokens": max_tokens, "seed": seed,
                                "temperature": s.temperature, "top_p": s.top_p}
        if s.top_k:
            body["top_k"] = s.top_k  # not in OpenAI's API; servers that run open models (vLLM, SGLang) take it
        if self.endpoint == "chat":
            body["messages"] = chat_messages(prompts[0], self.system_prompt)
        else:
            body["prompt"] = prompts
        return {**body, **self.request_params}

    def _post_all(self, bodies: list[dict]) -> list[dict]:
        """Answers in request order; the first request that fails for good stops the rest."""
        answers: list[dict | None] = [None] * len(bodies)
        bar = tqdm(total=len(bodies), desc=f"{self.name}: requests", disable=not self.progress, leave=False)
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = {pool.submit(self._post, body): number for number, body in enumerate(bodies)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        bar.close()
                        raise future.exception()
                    answers[futures[future]] = future.result()
                    bar.update(1)
        bar.close()
        return answers

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                status, content_type, raw = self._exchange(data)
            except TimeoutError:
                problem = f"no answer within timeout_s ({self.timeout_s:g} s)"
            except (ConnectionError, http.client.HTTPException) as error:  # refused, reset or closed mid-answer
                refused = isinstance(error, ConnectionRefusedError)
                problem = f"cannot connect ({error.strerror or error})" if refused else \
                    f"connection lost ({type(error).__name__})"
            except OSError as error:  # no such host, no route, a TLS failure
                problem = f"cannot connect ({self._redact(str(getattr(error, 'strerror', None) or error))})"
            else:
                if status == 200:
                    return self._json(content_type, raw)
                problem = f"HTTP {status}{self._detail(raw)}"
                if status not in RETRIED_STATUS and status < 500:  # the request itself is wrong: retrying cannot help
                    raise RaftError(f"generator '{self.name}': {self.shown_url} answered {problem}")
            if attempt + 1 < attempts:
                time.sleep(self.retry_backoff_s * 2**attempt)
        raise RaftError(f"generator '{self.name}': {self.shown_url} failed {attempts} time{'s' * (attempts > 1)} "
                        f"(timeout_s {self.timeout_s:g}, max_retries {self.max_retries}); last: {problem}")

    def _exchange(self, data: bytes) -> tuple[int, str | None, bytes]:
        """One POST, within timeout_s from the first byte sent to the last one read (not per read: a server that
        drips its answer times out too), following at most MAX_REDIRECTS redirects on the same scheme, host and port
        (the key never goes anywhere else); the answer is read up to max_response_bytes."""
        deadline = time.monotonic() + self.timeout_s
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            proxy = _proxy_for(parts)  # HTTP(S)_PROXY / NO_PROXY, as urllib reads them
            if proxy is None:
                connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
                connection = connection_class(parts.hostname, parts.port, timeout=_remaining(deadline))
            elif parts.scheme == "https":  # a CONNECT tunnel through the proxy, TLS to the server itself
                connection = http.client.HTTPSConnection(proxy.hostname, proxy.port or 80, timeout=_remaining(deadline))
                connection.set_tunnel(parts.hostname, parts.port, headers=_proxy_headers(proxy))
            else:  # plain http: the proxy gets the absolute URL
                connection = http.client.HTTPConnection(proxy.hostname, proxy.port or 80, timeout=_remaining(deadline))
                target = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path or "/",
                                                  parts.query, ""))
                headers.update(_proxy_headers(proxy))
            try:
                connection.request("POST", target, body=data, headers=headers)
                sock = connection.sock  # http.client drops it once the answer is known to end the connection
                sock.settimeout(_remaining(deadline))
                response = connection.getresponse()
                if response.status in REDIRECT_STATUS:
                    target = urllib.parse.urljoin(url, response.getheader("Location") or "")
                    if _origin(target) != _origin(self.url):
                        raise RaftError(f"generator '{self.name}': {self.shown_url} answered HTTP {response.status}, a "
                                        f"redirect to another host ({redact_url(target)}); not followed, the API key is "
                                        f"not sent there: set url to the server's own address")
                    url = target
                    continue
                limit = self.max_response_bytes if response.status == 200 else 65536
                return response.status, response.getheader("Content-Type"), self._read(response, sock, deadline,
                                                                                      limit)
            finally:
                connection.close()
        raise RaftError(f"generator '{self.name}': {self.shown_url} redirected more than {MAX_REDIRECTS} times")

    def _read(self, response: http.client.HTTPResponse, sock, deadline: float, limit: int) -> bytes:
        length = response.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > limit:
            raise RaftError(f"generator '{self.name}': {self.shown_url} answered {int(length):,} bytes, more than "
                            f"the {limit:,} allowed")
        chunks, total = [], 0
        while True:
            sock.settimeout(_remaining(deadline))
            chunk = response.read1(65536)  # at most one read from the socket, so the deadline is checked often
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > limit:
                raise RaftError(f"generator '{self.name}': {self.shown_url} answered more than the {limit:,} bytes "
                                f"allowed")
            chunks.append(chunk)

    def _json(self, content_type: str | None, raw: bytes) -> Any:
        media = (content_type or "application/json").split(";")[0].strip().lower()
        if not (media == "application/json" or media.endswith("+json")):
            raise RaftError(f"generator '{self.name}': {self.shown_url} answered Content-Type {media[:60]!r}, not JSON")
        try:
            return json.loads(raw)
        except ValueError:
            raise RaftError(f"generator '{self.name}': {self.shown_url} answered something that is not JSON: "
                            f"{self._redact(raw[:80].decode(errors='replace'))!r}") from None

    def _detail(self, raw: bytes) -> str:
        """The server's own error message, shortened to part of one line."""
        text = raw.decode(errors="replace")
        try:
            parsed = json.loads(text)
            message = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
            text = str(message.get("message", message) if isinstance(message, dict) else message)
        except ValueError:
            pass
        text = " ".join(self._redact(text).split())
        return f" ({text[:150]})" if text else ""

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _choices(self, answer: Any, prompts: int, n: int) -> list[list[tuple[str, str | None]]]:
        """The answer's choices as `prompts` groups of `n` (text, finish_reason) pairs."""
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != prompts * n:
            got = len(choices) if isinstance(choices, list) else "no"
            raise RaftError(f"generator '{self.name}': {self.shown_url} answered {got} choices for {prompts} prompt(s) x "
                            f"n={n} (does the server support n?)")
        indices = [c.get("index") if isinstance(c, dict) else None for c in choices]
        if any(i is not None for i in indices):  # `index` is prompt * n + sample: each exactly once
            if sorted(i for i in indices if isinstance(i, int) and not isinstance(i, bool)) != list(range(len(choices))):
                shown = indices if len(indices) <= 8 else indices[:8] + ["..."]
                raise RaftError(f"generator '{self.name}': {self.shown_url} answered choice indices {shown}, not each "
                                f"of 0..{len(choices) - 1} once")
            choices = sorted(choices, key=lambda c: c["index"])
        try:
            pairs = [((c["message"]["content"] if self.endpoint == "chat" else c["text"]) or "", c.get("finish_reason"))
                     for c in choices]
        except (AttributeError, KeyError, TypeError):
            raise RaftError(f"generator '{self.name}': {self.shown_url} answered choices without "
                            f"{'message.content' if self.endpoint == 'chat' else 'text'}") from None
        pairs = [(text.strip(), reason) for text, reason in pairs]
        return [pairs[i * n : (i + 1) * n] for i in range(prompts)]
