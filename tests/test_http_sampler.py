"""The OpenAI-compatible sampler against a real HTTP server on loopback (tests/openai_server.py) serving the
tiny model: batching, chat messages, API keys, retries, timeouts and failures, and a mixture run end to end.
Every test bounds its requests (counted by the server) and its time."""

import json
import os
import subprocess
import sys
import time

import pytest

import raft
from raft.errors import RaftError
from raft.generators import OpenAICompatibleSampler, SamplingSettings

from conftest import tiny_overrides
from openai_server import TinyOpenAIServer

KEY = "sk-test-0123456789abcdef"
PROMPTS = ["the film was", "a dull plot", "i loved the music"]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with TinyOpenAIServer(tiny_model_dir, model_name="tiny", api_key=KEY) as running:
        yield running


@pytest.fixture
def fresh(server):
    server.reset()
    return server


def sampler(server, **kwargs):
    settings = dict(url=server.url, model="tiny", sampling=SamplingSettings(max_new_tokens=5), api_key=KEY,
                    max_retries=2, retry_backoff_s=0.01, timeout_s=120, progress=False)
    return OpenAICompatibleSampler(**{**settings, **kwargs})


def test_completions_are_batched_and_grouped_by_prompt(fresh):
    samples = sampler(fresh, endpoint="completions", prompts_per_request=2).generate(PROMPTS, 2, seed=0)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2]
    assert [s.prompt for s in samples[::2]] == PROMPTS
    assert all(isinstance(s.output, str) for s in samples) and len({s.output for s in samples}) > 1
    # 2 prompts per request; requests run concurrently, so they may arrive in either order
    assert sorted(r["body"]["prompt"] for r in fresh.received) == sorted([PROMPTS[:2], PROMPTS[2:]])
    assert all(r["path"] == "/v1/completions" and r["body"]["n"] == 2 and r["body"]["max_tokens"] == 5
               for r in fresh.received)
    assert all(r["authorization"] == f"Bearer {KEY}" for r in fresh.received)
    meta = samples[0].meta
    assert meta["generator"] == "http" and meta["prompt_sent"] == PROMPTS[0]
    assert meta["settings"]["url"] == fresh.url and meta["settings"]["max_new_tokens"] == 5
    assert KEY not in json.dumps([s.meta for s in samples])
    # the server honours the seed, so the same seed gives the same samples
    again = sampler(fresh, endpoint="completions", prompts_per_request=2).generate(PROMPTS, 2, seed=0)
    assert [s.output for s in again] == [s.output for s in samples]


def test_chat_sends_messages_with_the_system_prompt_and_per_prompt_budgets(fresh):
    chat = sampler(fresh, endpoint="chat", system_prompt="be kind", max_concurrency=2, name="teacher",
                   sampling=SamplingSettings(max_new_tokens_range=[2, 9]), request_params={"stop": ["zz"]})
    samples = chat.generate(PROMPTS, 3, seed=1)
    assert len(samples) == 9 and len(fresh.received) == 3  # one prompt per chat request
    by_prompt = {r["body"]["messages"][-1]["content"]: r["body"] for r in fresh.received}
    assert set(by_prompt) == set(PROMPTS)
    assert all(b["messages"][0] == {"role": "system", "content": "be kind"} and b["stop"] == ["zz"]
               for b in by_prompt.values())
    for s in samples:
        assert s.meta["settings"]["max_new_tokens"] == by_prompt[s.prompt]["max_tokens"]
        assert s.meta["settings"]["system_prompt"] == "be kind" and s.meta["generator"] == "teacher"
    assert all(2 <= b["max_tokens"] < 9 for b in by_prompt.values())


def test_server_errors_are_retried_with_backoff(fresh):
    fresh.failures = [500, 503]
    started = time.perf_counter()
    samples = sampler(fresh, endpoint="completions", retry_backoff_s=0.1).generate(PROMPTS[:1], 2, seed=0)
    assert len(samples) == 2 and len(fresh.received) == 3
    assert time.perf_counter() - started >= 0.1 + 0.2  # waited 0.1 s, then 0.2 s
    assert fresh.received[0]["body"] == fresh.received[2]["body"]  # the same request again


def test_a_server_that_keeps_failing_is_reported_in_one_line(fresh):
    fresh.failures = [500] * 10
    with pytest.raises(RaftError) as caught:
        sampler(fresh, endpoint="completions", max_retries=2).generate(PROMPTS[:1], 2, seed=0)
    message = str(caught.value)
    assert len(fresh.received) == 3  # 1 try + 2 retries, then it stops
    assert message.startswith(f"generator 'http': {fresh.url}/completions failed 3 times")
    assert "HTTP 500 (injected failure 500 (got Bearer ***))" in message and "\n" not in message
    assert KEY not in message  # the server echoed it


def test_a_slow_server_times_out(fresh):
    fresh.delay_s = 3.0
    started = time.perf_counter()
    with pytest.raises(RaftError) as caught:
        sampler(fresh, endpoint="completions", timeout_s=0.3, max_retries=1).generate(PROMPTS[:1], 1, seed=0)
    assert time.perf_counter() - started < 2.5  # two attempts of 0.3 s each, not the server's 3 s
    assert len(fresh.received) == 2
    assert "failed 2 times" in str(caught.value) and "no answer within timeout_s (0.3 s)" in str(caught.value)


def test_client_errors_are_not_retried(fresh):
    with pytest.raises(RaftError) as caught:
        sampler(fresh, model="no-such-model").generate(PROMPTS[:1], 1, seed=0)
    assert len(fresh.received) == 1
    assert "answered HTTP 404 (model 'no-such-model' does not exist)" in str(caught.value)
    fresh.reset()
    with pytest.raises(RaftError, match="answered HTTP 401 \\(invalid API key \\(got Bearer \\*\\*\\*\\)\\)"):
        sampler(fresh, api_key="wrong").generate(PROMPTS[:1], 1, seed=0)
    assert len(fresh.received) == 1


def test_nothing_listening_is_reported(fresh):
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    closed = sampler(fresh, url=f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(RaftError, match="failed 2 times .* last: cannot connect"):
        closed.generate(PROMPTS[:1], 1, seed=0)


def test_a_mixture_run_with_a_server_keeps_the_key_out_of_the_run_directory(tiny_model_dir, prompt_file, tmp_path,
                                                                            fresh, monkeypatch):
    """Half the samples of every prompt from the policy, half from the server; evaluation stays the policy's."""
    monkeypatch.setenv("RAFT_TEST_API_KEY", KEY)
    generators = ("generators=[{kind: policy}, {kind: http, name: teacher, url: '" + fresh.url + "', model: tiny, "
                  "api_key_env: RAFT_TEST_API_KEY, retry_backoff_s: 0.01, sampling_template: '{prompt}, warmly'}]")
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run") + [
        "iterations=1", "samples_per_prompt=4", generators]
    run_dir = raft.run(raft.load_config("text", overrides=overrides))

    samples = [json.loads(line) for line in (run_dir / "iterations/iter-0001/samples.jsonl").read_text().splitlines()]
    assert [s["generator"] for s in samples[:4]] == ["policy", "policy", "teacher", "teacher"]
    assert len(samples) == 12 and all(s["prompt_index"] == i // 4 for i, s in enumerate(samples))
    teacher = [s for s in samples if s["generator"] == "teacher"]
    assert all(s["prompt_sent"] == s["prompt"] + ", warmly" for s in teacher)
    assert {r["body"]["messages"][-1]["content"] for r in fresh.received} == {s["prompt_sent"] for s in teacher}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    policy_rewards = [s["reward"] for s in samples if s["generator"] == "policy"]
    assert metrics[1]["reward/policy_mean"] == pytest.approx(sum(policy_rewards) / len(policy_rewards))
    evaluated = [json.loads(line) for line in (run_dir / "iterations/iter-0001/eval_samples.jsonl").read_text().splitlines()]
    assert {s["generator"] for s in evaluated} == {"policy"}
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_an_unset_api_key_variable_stops_the_run_before_any_model_loads(tiny_model_dir, prompt_file, tmp_path,
                                                                        monkeypatch):
    monkeypatch.delenv("RAFT_TEST_NO_KEY", raising=False)
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run") + [
        "generators=[{kind: http, url: 'http://127.0.0.1:9/v1', model: m, api_key_env: RAFT_TEST_NO_KEY}]"]
    with pytest.raises(RaftError, match="generators.0.api_key_env: the environment variable 'RAFT_TEST_NO_KEY' is not set"):
        raft.run(raft.load_config("text", overrides=overrides))



def test_the_cli_reports_a_dead_server_in_one_line_after_the_retries(tiny_model_dir, prompt_file, tmp_path, fresh):
    fresh.failures = [502] * 10
    generators = ("generators=[{kind: http, url: '" + fresh.url + "', model: tiny, max_retries: 1, "
                  "retry_backoff_s: 0.01, api_key_env: RAFT_TEST_API_KEY}]")
    result = subprocess.run([sys.executable, "-m", "raft", "run", *tiny_overrides(tiny_model_dir, prompt_file,
                                                                                  tmp_path / "run"), generators],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RAFT_TEST_API_KEY": KEY})
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("raft: error:")]
    assert errors == [f"raft: error: generator 'http': {fresh.url}/chat/completions failed 2 times (timeout_s 60, "
                      "max_retries 1); last: HTTP 502 (injected failure 502 (got Bearer ***))"], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and KEY not in result.stderr + result.stdout
    assert len(fresh.received) == 6  # 3 prompts, each tried twice; nothing more
