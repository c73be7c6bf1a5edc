"""Fault injection (issue 15): concurrent launches on one run directory, a full disk during a commit, corrupt state
files, an evil HTTP server, bomb images and a hanging ranker. Each shows the failure is one line and nothing finished
is lost. (Kills during every stage: tests/test_resume.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from raft.errors import RaftError
from raft.generators import OpenAICompatibleSampler, SamplingSettings

from openai_server import TinyOpenAIServer

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-fault-0123456789abcdef"
PROMPTS = ["the film was", "a dull plot"]


# ---- an evil HTTP server


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with TinyOpenAIServer(tiny_model_dir, model_name="tiny", api_key=KEY) as running:
        yield running


@pytest.fixture
def evil(server):
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def elsewhere():
    """Another host (by name: localhost, not 127.0.0.1) that records the Authorization headers it gets."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"choices": []}')

        do_POST = do_GET

        def log_message(self, *args):
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield f"http://localhost:{http.server_address[1]}", seen
    http.shutdown()
    http.server_close()


def sampler(server, **kwargs):
    settings = dict(url=server.url, model="tiny", sampling=SamplingSettings(max_new_tokens=4), api_key=KEY,
                    max_retries=0, retry_backoff_s=0.01, timeout_s=60, progress=False)
    return OpenAICompatibleSampler(**{**settings, **kwargs})


def test_a_redirect_to_another_host_is_not_followed_with_the_key(evil, elsewhere):
    target, seen = elsewhere
    evil.evil, evil.redirect_to = "redirect", f"{target}/v1/chat/completions"
    with pytest.raises(RaftError, match=r"answered HTTP 302, a redirect to another host \(http://localhost:\d+/v1"):
        sampler(evil).generate(PROMPTS[:1], 1, seed=0)
    assert seen == []  # the other host got no request, so no key


def test_a_server_that_drips_its_answer_times_out_as_a_whole(evil):
    evil.evil = "drip"
    started = time.perf_counter()
    with pytest.raises(RaftError, match=r"no answer within timeout_s \(0.5 s\)"):
        sampler(evil, timeout_s=0.5).generate(PROMPTS[:1], 1, seed=0)
    assert time.perf_counter() - started < 3  # not the 20 s the drip lasts


def test_a_huge_answer_is_refused(evil):
    evil.evil = "huge"
    with pytest.raises(RaftError, match=r"answered more than the 1,048,576 bytes allowed"):
        sampler(evil, max_response_bytes=2**20).generate(PROMPTS[:1], 1, seed=0)


@pytest.mark.parametrize("how, message", [
    ("indices", r"answered choice indices \[0, 0\], not each of 0..1 once"),
    ("html", r"answered Content-Type 'text/html', not JSON"),
])
def test_wrong_choice_indices_and_content_types_are_refused(evil, how, message):
    evil.evil = how
    with pytest.raises(RaftError, match=message):
        sampler(evil).generate(PROMPTS[:1], 2, seed=0)


def test_a_key_over_plain_http_to_another_host_is_warned_about(evil, capsys):
    sampler(evil)  # loopback: no warning
    assert "warning" not in capsys.readouterr().err
    sampler(evil, url="http://api.example.com/v1")
    assert "sends its API key over plain http to api.example.com" in capsys.readouterr().err
    sampler(evil, url="https://api.example.com/v1")
    assert "warning" not in capsys.readouterr().err


def test_credentials_in_urls_are_never_written(evil):
    import raft

    port = evil.url.split(":")[2].split("/")[0]
    url = f"http://user:hunter2@127.0.0.1:{port}/v1?api_key=SECRET1&v=2"
    evil.failures = [400]
    with pytest.raises(RaftError) as caught:
        sampler(evil, url=url).generate(PROMPTS[:1], 1, seed=0)
    message = str(caught.value)
    assert "hunter2" not in message and "SECRET1" not in message and "user:***@" in message
    assert "hunter2" not in repr(sampler(evil, url=url))
    with pytest.raises(RaftError, match=r"generators.0.url must not hold credentials \(user:password@\)"):
        raft.load_config("text", overrides=[f"generators=[{{kind: http, url: '{url}', model: m}}]"])


# ---- the run directory: concurrent launches, a full disk, corrupt state files


def raft_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "raft", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def one_line_error(result, needle):
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("raft: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert needle in errors[0], errors[0]
    return errors[0]


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


WAITING_RANKER = '''
import os, pathlib, time

def score(prompts, outputs):
    pathlib.Path(os.environ["RAFT_TEST_STARTED"]).touch()
    while not pathlib.Path(os.environ["RAFT_TEST_GO"]).exists():
        time.sleep(0.05)
    return [sum(c in "aeiou" for c in o) / max(1, len(o)) for o in outputs]
'''


def test_a_second_launch_on_a_busy_run_directory_is_refused_and_the_first_finishes(tiny_model_dir, prompt_file,
                                                                                    tmp_path):
    from conftest import tiny_overrides

    ranker = tmp_path / "waiting.py"
    ranker.write_text(WAITING_RANKER)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, prompt_file, run_dir) + [f"rankers.0.function={ranker}:score"]
    env = {"RAFT_TEST_STARTED": str(tmp_path / "started"), "RAFT_TEST_GO": str(tmp_path / "go"),
           "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "raft", "run", *overrides], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "started").exists():  # the first run is ranking its starting evaluation
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:] if first.poll() else ""
            time.sleep(0.2)
        again = raft_cli("run", *overrides, env=env)  # a double launch
        one_line_error(again, f"run directory '{run_dir}' is in use by pid {first.pid} on host")
        resumed = raft_cli("run", "--resume", str(run_dir), "--trust-run-code", env=env)  # a requeue of the same job
        one_line_error(resumed, f"is in use by pid {first.pid}")
    finally:
        (tmp_path / "go").touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert json.loads((run_dir / "state.json").read_text()) == {"completed_iteration": 2}
    assert [r["iteration"] for r in rows_of(run_dir)] == [0, 1, 2]
    assert (run_dir / "checkpoints/iter-0002").is_dir() and not (run_dir / ".lock").exists()


def test_a_full_disk_during_a_commit_is_one_line_and_loses_nothing_finished(tiny_model_dir, prompt_file, tmp_path,
                                                                              monkeypatch, one_thread):
    import errno

    import raft
    import raft.rundir as rundir
    from conftest import tiny_overrides

    real = rundir._fsync_tree

    def full_at_iteration_2(root):
        if root.name.startswith("iter-0002"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(root)

    monkeypatch.setattr(rundir, "_fsync_tree", full_at_iteration_2)
    run_dir = tmp_path / "run"
    config = raft.load_config("text", overrides=tiny_overrides(tiny_model_dir, prompt_file, run_dir))
    with pytest.raises(RaftError, match=r"disk full while writing iteration 2 to .*; the completed iterations are "
                                        r"intact: free space, then --resume"):
        raft.run(config)
    assert json.loads((run_dir / "state.json").read_text()) == {"completed_iteration": 1}
    assert [r["iteration"] for r in rows_of(run_dir)] == [0, 1]
    assert (run_dir / "checkpoints/iter-0001/model.safetensors").is_file()
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name or p.name == "iter-0002"]
    assert not (run_dir / ".lock").exists()

    monkeypatch.setattr(rundir, "_fsync_tree", real)  # space freed
    raft.run(raft.load_config("text", run_dir / "config.yaml"), resume=True)
    assert [r["iteration"] for r in rows_of(run_dir)] == [0, 1, 2]


@pytest.mark.parametrize("damage, message", [
    ("state.json:garbage{", "state.json' is corrupt (Expecting value); it marks the last completed iteration"),
    ("state.json:{\"completed_iteration\": \"two\"}", "state.json' is corrupt (no completed_iteration >= 0)"),
    ("metrics.jsonl:TRUNCATE", "metrics.jsonl' line 2 is not valid JSON"),
    ("config.yaml:", "config.yaml' is corrupt: empty"),
    ("config.yaml:[1, 2]", "config.yaml' is corrupt: not a mapping of settings"),
])
def test_corrupt_state_files_are_one_line_and_left_as_they_are(tiny_model_dir, prompt_file, tmp_path, damage,
                                                               message):
    from conftest import tiny_overrides

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    import raft
    from raft.config import dump_yaml

    config = raft.load_config("text", overrides=tiny_overrides(tiny_model_dir, prompt_file, run_dir))
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    (run_dir / "state.json").write_text('{"completed_iteration": 1}\n')
    (run_dir / "metrics.jsonl").write_text('{"iteration": 0}\n{"iteration": 1}\n')
    (run_dir / "checkpoints/iter-0001").mkdir(parents=True)
    name, _, content = damage.partition(":")
    if content == "TRUNCATE":
        content = '{"iteration": 0}\n{"iterat'
    (run_dir / name).write_text(content)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    one_line_error(raft_cli("run", "--resume", str(run_dir), "--trust-run-code"), message)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing removed or rewritten


# ---- a ranker that hangs


def test_a_hanging_ranker_stops_the_run_in_one_line_and_resume_continues(tiny_model_dir, prompt_file, tmp_path):
    from conftest import REWARDS, tiny_overrides

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, prompt_file, run_dir) + [
        f"rankers.0.function={REWARDS}:broken_from_call", "ranker_timeout_s=3"]
    started = time.monotonic()
    # calls: 1 = starting evaluation, 2 = iteration 1 ranking, 3 = its evaluation, 4 = iteration 2 ranking: hangs
    result = raft_cli("run", *overrides, env={"RAFT_TEST_BREAK": "hang", "RAFT_TEST_BREAK_AT": "4"})
    one_line_error(result, f"ranker '{REWARDS}:broken_from_call' gave no scores for 9 samples within "
                           "ranker_timeout_s (3 s)")
    assert time.monotonic() - started < 280
    assert json.loads((run_dir / "state.json").read_text()) == {"completed_iteration": 1}
    assert (run_dir / "checkpoints/iter-0001/model.safetensors").is_file()
    resumed = raft_cli("run", "--resume", str(run_dir), "--trust-run-code")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["iteration"] for r in rows_of(run_dir)] == [0, 1, 2]


# ---- images: bombs, huge ones, paths outside the table's folder


def test_bomb_and_huge_images_and_paths_outside_the_folder_are_refused_in_one_line(tmp_path, monkeypatch):
    from PIL import Image

    from raft.generators import FileSampler
    from raft.modalities.diffusion import generators
    from raft.modalities.diffusion.generators import ImageFileSampler

    folder = tmp_path / "table"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    Image.new("L", (5000, 4000)).save(folder / "huge.png")  # 20 M pixels, a few kB on disk
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    rows = {"ok": "ok.png", "huge": "huge.png", "climbs": "../outside.png", "absolute": str(tmp_path / "outside.png")}
    (folder / "samples.jsonl").write_text("".join(json.dumps({"prompt": p, "output": o}) + "\n" for p, o in rows.items()))

    def sampler(allow=False):
        table = FileSampler(str(folder / "samples.jsonl"), "prompt", "output", what="generators.0.path")
        return ImageFileSampler(table, folder, allow_outside_paths=allow)

    assert sampler().generate(["ok"], 1, seed=0)[0].output.size == (8, 8)
    with pytest.raises(RaftError, match=r"huge.png' \(row 1\) is 5000 x 4000 pixels, more than the 16,777,216"):
        sampler().generate(["huge"], 1, seed=0)
    for prompt in ("climbs", "absolute"):
        with pytest.raises(RaftError, match=r"outside.png' \(row \d\) is outside the file's folder .*allow_outside_paths"):
            sampler().generate([prompt], 1, seed=0)
        assert sampler(allow=True).generate([prompt], 1, seed=0)[0].output.size == (8, 8)
    # PIL's own bomb check (a limit set lower here, to keep the test file small)
    monkeypatch.setattr(generators, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**6)
    with pytest.raises(RaftError, match=r"huge.png' \(row 1\) is refused as a decompression bomb"):
        sampler().generate(["huge"], 1, seed=0)
