"""Samples from any OpenAI-compatible server: /v1/completions or /v1/chat/completions (vLLM, SGLang, TGI,
llama.cpp's server, Ollama, hosted APIs).

Requests run `max_concurrency` at a time, each asking for all K samples of its prompts (`n`). A request that
times out, cannot connect or gets HTTP 408/429/5xx is retried after `retry_backoff_s`, doubled at each retry;
other HTTP errors mean the request itself is wrong and stop the run at once. The API key is sent in the
Authorization header only: it is never part of a sample's settings, a message or a log line.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from raft.errors import RaftError
from raft.generators.sampling import SamplingSettings, chat_messages, seed_of
from raft.interface import Generator, Sample

RETRIED_STATUS = {408, 429}  # and every 5xx: the server is busy or broken now, perhaps not in a moment


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

    def __repr__(self) -> str:  # no key in reprs, tracebacks' locals or debuggers
        return f"OpenAICompatibleSampler(url={self.url!r}, model={self.model!r}, name={self.name!r})"

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
                settings = {"url": self.base_url, "endpoint": self.endpoint, "model": self.model,
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
                    meta={"generator": self.name, "prompt_sent": prompt,
                          "finished": reason != "length",  # ended on its own rather than running out of tokens
                          "settings": {**settings, **self.request_params}},
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
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(body).encode()
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as error:
                problem = f"HTTP {error.code}{self._detail(error)}"
                if error.code not in RETRIED_STATUS and error.code < 500:  # the request itself is wrong: retrying cannot help
                    raise RaftError(f"generator '{self.name}': {self.url} answered {problem}") from None
            except TimeoutError:
                problem = f"no answer within timeout_s ({self.timeout_s:g} s)"
            except urllib.error.URLError as error:
                if isinstance(error.reason, TimeoutError):
                    problem = f"no answer within timeout_s ({self.timeout_s:g} s)"
                else:
                    problem = f"cannot connect ({self._redact(str(error.reason))})"
            except (ConnectionError, http.client.HTTPException) as error:  # reset or closed mid-answer
                problem = f"connection lost ({type(error).__name__})"
            else:
                try:
                    return json.loads(raw)
                except ValueError:
                    raise RaftError(f"generator '{self.name}': {self.url} answered something that is not JSON: "
                                    f"{self._redact(raw[:80].decode(errors='replace'))!r}") from None
            if attempt + 1 < attempts:
                time.sleep(self.retry_backoff_s * 2**attempt)
        raise RaftError(f"generator '{self.name}': {self.url} failed {attempts} time{'s' * (attempts > 1)} "
                        f"(timeout_s {self.timeout_s:g}, max_retries {self.max_retries}); last: {problem}")

    def _detail(self, error: urllib.error.HTTPError) -> str:
        """The server's own error message, shortened to part of one line."""
        try:
            text = error.read().decode(errors="replace")
        except Exception:
            return ""
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
            raise RaftError(f"generator '{self.name}': {self.url} answered {got} choices for {prompts} prompt(s) x "
                            f"n={n} (does the server support n?)")
        try:
            choices = sorted(choices, key=lambda c: c.get("index", 0))  # `index` is prompt * n + sample
            pairs = [((c["message"]["content"] if self.endpoint == "chat" else c["text"]) or "", c.get("finish_reason"))
                     for c in choices]
        except (AttributeError, KeyError, TypeError):
            raise RaftError(f"generator '{self.name}': {self.url} answered choices without "
                            f"{'message.content' if self.endpoint == 'chat' else 'text'}") from None
        pairs = [(text.strip(), reason) for text, reason in pairs]
        return [pairs[i * n : (i + 1) * n] for i in range(prompts)]
