"""Hardening (issue 15): inputs that must not corrupt a run directory, leak a key or run code unasked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_cli_exits_quietly_on_a_closed_pipe():
    """`raft run --help | head`: the reader is gone before the help is written; no BrokenPipeError traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "raft", "run", "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    process.stdout.close()  # closed before the child (still importing) writes anything
    stderr = process.stderr.read().decode()
    process.wait(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert process.returncode == 141


# ---- item 1: one process per run directory


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the run directory's lock and keeps it until killed."""
    code = ("import sys, time; from raft.rundir import RunDirectory; RunDirectory(sys.argv[1]).lock(); "
            "print('locked', flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_locked_run_directory_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(tmp_path):
    import signal
    import socket

    from raft.errors import RaftError
    from raft.rundir import RunDirectory

    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(RaftError, match=rf"in use by pid {holder.pid} on host {socket.gethostname()}"):
            RunDirectory(run_dir).lock()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / ".lock").exists()  # left behind by the killed holder: stale, it must not block
    RunDirectory(run_dir).lock()
    RunDirectory(run_dir).unlock()
    assert not run_dir.exists()  # a directory holding nothing but the lock is removed with it


def test_without_flock_a_lock_naming_a_dead_pid_on_this_host_is_stale(tmp_path, monkeypatch):
    import errno
    import fcntl
    import json
    import socket

    from raft.errors import RaftError
    from raft.rundir import RunDirectory

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for host, pid, refused in [(socket.gethostname(), os.getppid(), True), ("elsewhere", dead.pid, True),
                               (socket.gethostname(), dead.pid, False)]:
        (run_dir / ".lock").write_text(json.dumps({"pid": pid, "host": host, "started": "then"}))
        if refused:
            with pytest.raises(RaftError, match=rf"in use by pid {pid} on host {host}"):
                RunDirectory(run_dir).lock()
        else:
            RunDirectory(run_dir).lock()
            assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
            RunDirectory(run_dir).unlock()


def test_default_run_names_never_collide(tmp_path, monkeypatch):
    from datetime import datetime

    import raft.loop as loop

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 30, 12, 0, 0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "datetime", Frozen)
    names = [loop.default_run_dir("text") for _ in range(3)]
    assert len(set(names)) == 3 and all(Path(name).is_dir() for name in names)


def test_two_writers_of_one_folder_do_not_delete_each_others_files(tmp_path):
    from raft.rundir import RunDirectory

    run_dir = RunDirectory(tmp_path)
    final = tmp_path / "iterations" / "iter-0001"

    def second_writer(folder):
        (folder / "b.txt").write_text("b")

    def first_writer(folder):
        (folder / "a.txt").write_text("a")
        run_dir._write_folder(final, second_writer)  # another writer of the same folder, mid-way
        (folder / "a2.txt").write_text("a")

    run_dir._write_folder(final, first_writer)
    assert sorted(p.name for p in final.iterdir()) == ["a.txt", "a2.txt"]
    assert [p.name for p in final.parent.iterdir()] == ["iter-0001"]  # no temporary left


# ---- item 2: a resume may not change what the finished iterations mean


def _fake_run_dir(run_dir: Path, overrides: list[str]) -> str:
    import raft
    from raft.config import dump_yaml

    run_dir.mkdir(parents=True)
    text = dump_yaml(raft.load_config("text", overrides=[f"run_dir={run_dir}", *overrides]))
    (run_dir / "config.yaml").write_text(text)
    (run_dir / "state.json").write_text('{"completed_iteration": 0}\n')
    return text


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "raft", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def one_line_error(result, needle):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("change, shown", [
    (["seed=1"], "seed (0 -> 1)"),
    (["samples_per_prompt=4"], "samples_per_prompt (8 -> 4)"),
    (["model.name_or_path=other/model"], 'model.name_or_path ("HuggingFaceTB/SmolLM2-135M-Instruct" -> "other/model")'),
    (["finetune.lora.enabled=true"], "finetune.lora.enabled (false -> true)"),
    (["rankers.0.lexicon=afinn"], 'rankers.0.lexicon ("vader" -> "afinn")'),
])
def test_resume_refuses_settings_that_change_the_finished_iterations(tmp_path, change, shown):
    run_dir = tmp_path / "run"
    saved = _fake_run_dir(run_dir, ["model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct"])
    result = run_cli("run", "--resume", str(run_dir), "iterations=9", *change)
    line = one_line_error(result, "settings that change what its finished iterations mean")
    assert shown in line and "iterations (4 -> 9)" not in line  # allowed changes are not listed
    assert (run_dir / "config.yaml").read_text() == saved  # nothing overwritten
    assert not (run_dir / "resumes.jsonl").exists() and not (run_dir / ".lock").exists()


def test_resume_records_the_changes_it_allows(tmp_path):
    import json

    import raft
    from raft.rundir import RunDirectory
    from raft.config import to_dict

    run_dir = tmp_path / "run"
    _fake_run_dir(run_dir, ["rankers=[{kind: lexicon}, {kind: lexicon, lexicon: afinn}]"])
    config = raft.load_config("text", run_dir / "config.yaml", ["iterations=9", "guard.max_kl=5", "max_train_seconds=60"])
    changes = RunDirectory(run_dir).check_resume_changes(to_dict(config))
    assert set(changes) == {"iterations", "guard.max_kl", "max_train_seconds"}
    record = json.loads((run_dir / "resumes.jsonl").read_text())
    assert record["changes"]["iterations"] == {"from": 4, "to": 9} and record["after_iteration"] == 0
    fewer = raft.load_config("text", run_dir / "config.yaml", ["rankers=[{kind: lexicon}]"])
    with pytest.raises(Exception, match=r"rankers \(\"2 entries\" -> \"1 entries\"\)"):
        RunDirectory(run_dir).check_resume_changes(to_dict(fewer))
    forced = RunDirectory(run_dir).check_resume_changes(to_dict(fewer), allow_all=True)
    assert "rankers" in forced
    assert json.loads((run_dir / "resumes.jsonl").read_text().splitlines()[1])["forced"] == ["rankers"]


# ---- item 3: saved states are loaded without unpickling code, on every torch version


def test_every_torch_load_in_raft_passes_weights_only():
    import ast

    calls = []
    for path in (ROOT / "raft").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                flags = {k.arg: k.value for k in node.keywords}
                safe = isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", safe))
    assert calls and all(safe for _, safe in calls), [where for where, safe in calls if not safe]


class Evil:
    """Unpickling this runs code: it creates the file it names."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def old_torch_load(monkeypatch):
    """torch.load as torch < 2.6 has it (pyproject allows 2.3): unpickles anything unless weights_only=True.
    Returns the keyword arguments of every call."""
    import torch

    calls = []
    real = torch.load

    def load(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **{"weights_only": False, **kwargs})

    monkeypatch.setattr(torch, "load", load)
    return calls


def test_ppo_resume_never_unpickles_code(tiny_model_dir, prompt_file, tmp_path, monkeypatch, one_thread):
    import shutil

    import torch

    from raft.baselines.ppo import TextPPOConfig, run_ppo
    from raft.config import load_config
    from raft.errors import RaftError

    run_dir = tmp_path / "run"
    run_ppo(load_config(TextPPOConfig, None, tiny_overrides(tiny_model_dir, prompt_file, run_dir) + [
        "iterations=1", "finetune.lora.enabled=true", "finetune.lora.r=4"]))
    checkpoint = run_dir / "checkpoints/iter-0001"
    calls = old_torch_load(monkeypatch)
    run_ppo(load_config(TextPPOConfig, run_dir / "config.yaml"), resume=True)  # nothing left to run: loads only
    assert len(calls) == 2 and all(c.get("weights_only") is True for c in calls), calls

    shutil.copy(checkpoint / "value_head.pt", tmp_path / "good.pt")
    marker = tmp_path / "pwned"
    torch.save({"weight": Evil(marker)}, checkpoint / "value_head.pt")
    with pytest.raises(RaftError, match=r"cannot read '.*value_head.pt': not a plain saved state"):
        run_ppo(load_config(TextPPOConfig, run_dir / "config.yaml"), resume=True)
    assert not marker.exists()


def test_the_pickled_aesthetic_head_is_refused_on_any_torch(tiny_clip_dir, tmp_path, monkeypatch):
    import torch

    from raft.errors import RaftError
    from raft.modalities.diffusion.rankers import load_aesthetic_head

    marker = tmp_path / "pwned"
    torch.save({"layers.0.weight": Evil(marker)}, tmp_path / "head.pth")
    calls = old_torch_load(monkeypatch)
    with pytest.raises(RaftError, match="cannot read weights"):
        load_aesthetic_head(str(tmp_path / "head.pth"), "mlp", 16, "rankers.0.weights")
    assert not marker.exists() and calls[0]["weights_only"] is True


# ---- item 4: a run directory is data, not code


@pytest.mark.parametrize("saved, named", [
    (["rankers.0.kind=callable", "rankers.0.function=evil.py:score"], "rankers.0.function=evil.py:score"),
    (["model.trust_remote_code=true"], "model.trust_remote_code"),
    (["rankers.0.kind=classifier", "rankers.0.model=some/model", "rankers.0.trust_remote_code=true"],
     "rankers.0.trust_remote_code"),
])
def test_resume_and_demo_do_not_run_code_a_saved_config_names(tmp_path, saved, named):
    run_dir = tmp_path / "run"
    _fake_run_dir(run_dir, saved)
    needle = f"asks to run code ({named}); a run directory is not trusted like code: pass --trust-run-code"
    one_line_error(run_cli("run", "--resume", str(run_dir)), needle)
    one_line_error(run_cli("demo", "chat", "--run", str(run_dir)), needle)
    assert not (run_dir / ".lock").exists()


def test_resume_does_not_send_a_secret_a_saved_config_names_to_its_url(tmp_path):
    run_dir = tmp_path / "run"
    _fake_run_dir(run_dir, ["generators=[{kind: http, url: 'https://collector.example/v1', model: m, "
                            "api_key_env: AWS_SECRET_ACCESS_KEY}]"])
    one_line_error(run_cli("run", "--resume", str(run_dir)), "asks to run code or send a secret "
                   "(generators.0.api_key_env=AWS_SECRET_ACCESS_KEY); a run directory is not trusted like code")


def test_trust_run_code_or_a_setting_given_anew_lets_a_resume_through(tmp_path):
    import argparse

    from raft.cli import resolve

    run_dir = tmp_path / "run"
    _fake_run_dir(run_dir, ["rankers.0.kind=callable", "rankers.0.function=evil.py:score"])
    config, resume = resolve(argparse.Namespace(resume=str(run_dir), modality=None, config=None, trust_run_code=True), [])
    assert resume and config.rankers[0].function == "evil.py:score"
    config, _ = resolve(argparse.Namespace(resume=str(run_dir), modality=None, config=None, trust_run_code=False),
                        ["rankers.0.function=mine.py:score"])  # named on this command line: the user's own
    assert config.rankers[0].function == "mine.py:score"


# ---- item 6: diffusion trains at the model's (or generation.resolution's) size, whatever the kept images' size


def test_diffusion_trains_at_the_sampling_resolution_not_the_first_images_size(tiny_sd_dir):
    pytest.importorskip("diffusers")
    from PIL import Image

    from raft.interface import Sample
    from raft.modalities.diffusion.config import DiffusionFinetuneConfig, DiffusionLoraConfig, DiffusionModelConfig
    from raft.modalities.diffusion.finetune import DiffusionFineTuner
    from raft.modalities.diffusion.model import load_policy

    policy = load_policy(DiffusionModelConfig(name_or_path=str(tiny_sd_dir), device="cpu"), DiffusionLoraConfig(),
                         None, seed=0)
    size, scale = policy.default_resolution(), policy.pipeline.vae_scale_factor
    kept = [Sample(prompt_index=i, prompt="a red circle", output=Image.new("RGB", shape, (200, 10, 10)))
            for i, shape in enumerate([(4 * size, 4 * size), (size, size), (3 * size, size)])]  # file images
    for resolution, expected in [(None, size), (2 * size, 2 * size)]:
        tuner = DiffusionFineTuner(policy, DiffusionFinetuneConfig(epochs=1, batch_size=3), None, progress=False,
                                   resolution=resolution)
        moments, _ = tuner.encode(kept)
        assert tuple(moments.shape[-2:]) == (expected // scale, expected // scale)
    assert tuner.finetune(kept, seed=0)["train/steps"] == 1


# ---- item 7: the image demo serves the images it shows, nothing else


def _http_get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_image_demo_serves_no_file_of_the_run_directory(tiny_sd_dir, tiny_clip_dir, tmp_path):
    pytest.importorskip("gradio")
    from PIL import Image

    import raft
    from raft.config import dump_yaml
    from raft.demos.image import launch
    from tiny_diffusion import tiny_diffusion_overrides

    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_diffusion_overrides(tiny_sd_dir, tiny_clip_dir, run_dir) if o not in ("--modality", "diffusion")]
    (run_dir / "iterations/iter-0000").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(raft.load_config("diffusion", overrides=overrides)))
    Image.new("RGB", (40, 20), (0, 255, 0)).save(run_dir / "iterations/iter-0000/eval_grid.png")
    (run_dir / "checkpoints/iter-0001").mkdir(parents=True)
    (run_dir / "checkpoints/iter-0001/optimizer.pt").write_bytes(b"secret optimizer state")

    app = launch(str(run_dir), max_steps=3, block=False)
    try:
        assert app.share is False and app.analytics_enabled is False
        assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
        base = app.local_url.rstrip("/")
        status, config = _http_get(f"{base}/config")
        assert status == 200 and str(run_dir).encode() not in config  # the grid is gradio's own copy
        for name in ("config.yaml", "checkpoints/iter-0001/optimizer.pt", "iterations/iter-0000/eval_grid.png"):
            for route in ("gradio_api/file=", "file="):
                status, body = _http_get(f"{base}/{route}{run_dir / name}")
                assert status != 200 and b"secret" not in body, (route, name, status)
    finally:
        app.close()


def test_demos_launch_without_share_links_with_a_bounded_queue_and_warn_beyond_loopback(capsys, tmp_path):
    from raft.demos.common import parse_auth, serve
    from raft.errors import RaftError

    class App:
        def queue(self, **options):
            self.queued = options

        def launch(self, **options):
            self.launched = options

    app = serve(App(), "127.0.0.1", None, False, None, 5)
    assert app.launched["share"] is False and app.queued["max_size"] == 5 and app.queued["default_concurrency_limit"] == 1
    assert "warning" not in capsys.readouterr().err
    app = serve(App(), "0.0.0.0", None, False, ("u", "p"), 5)
    assert app.launched["auth"] == ("u", "p") and app.launched["server_name"] == "0.0.0.0"
    assert "the demo listens on 0.0.0.0" in capsys.readouterr().err

    secret = tmp_path / "auth"
    secret.write_text("alice:s3cret\n")
    assert parse_auth(f"@{secret}") == ("alice", "s3cret") and parse_auth("bob:pw") == ("bob", "pw")
    with pytest.raises(RaftError, match="--auth must be USER:PASSWORD"):
        parse_auth("nopassword")


# ---- Low: values that mean nothing are refused before anything loads


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "config: seed must be >= 0"),
    ("generators=[{kind: policy, share: .inf}]", "config: generators.0.share must be a finite number, got inf"),
    ("finetune.max_seq_length=0", "config: finetune.max_seq_length must be >= 2"),
    ("finetune.max_grad_norm=.nan", "config: finetune.max_grad_norm must be a finite number, got nan"),
    ("rankers.0.weight=.nan", "config: rankers.0.weight must be a finite number, got nan"),
    ("rankers.0.weight=0", "config: rankers weights are all 0"),
    ("eval.seed=-3", "config: eval.seed must be >= 0"),
])
def test_meaningless_values_are_refused_up_front(override, message):
    import raft
    from raft.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        raft.load_config("text", overrides=[override])


def test_history_turns_below_zero_is_refused(capsys):
    from raft.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "chat", "--run", ".", "--history-turns", "-1"])
    assert "--history-turns: must be >= 0, got '-1'" in capsys.readouterr().err


def test_max_new_tokens_beyond_the_models_context_is_refused_before_any_sampling(tiny_model_dir, prompt_file,
                                                                                 tmp_path):
    import raft
    from raft.errors import ConfigError

    run_dir = tmp_path / "run"
    config = raft.load_config("text", overrides=tiny_overrides(tiny_model_dir, prompt_file, run_dir) + [
        "generation.max_new_tokens=600"])  # the tiny model holds 512 positions
    with pytest.raises(ConfigError, match=r"generation.max_new_tokens \(600 tokens\) must be below the model's "
                                          r"context \(512 tokens\)"):
        raft.run(config)
    assert not run_dir.exists()  # nothing written


# ---- Low: ranker files and ranker output


def test_a_string_is_not_a_list_of_scores():
    from raft.errors import RaftError
    from raft.rankers import check_scores

    with pytest.raises(RaftError, match="ranker 'r' returned a str, not a list of numbers"):
        check_scores("r", "12", 2)  # two characters, two 'scores' before the fix
    assert check_scores("r", (1, 2.5), 2) == [1.0, 2.5]


def test_a_ranker_file_cannot_shadow_a_module_and_its_import_errors_are_one_line(tmp_path):
    import json

    from raft.errors import RaftError
    from raft.rankers import load_callable

    (tmp_path / "json.py").write_text("def score(prompts, outputs):\n    return [1.0] * len(outputs)\n")
    score = load_callable(f"{tmp_path / 'json.py'}:score", "ranker")
    assert score([], ["a"]) == [1.0]
    assert sys.modules["json"] is json and json.dumps([1]) == "[1]"

    for name, source, message in [
        ("syntax.py", "def score(:\n", r"importing '.*syntax.py' raised SyntaxError: "),
        ("raises.py", "raise RuntimeError('no GPU here')\n", r"importing '.*raises.py' raised RuntimeError: no GPU here"),
        ("missing.py", "import no_such_module_xyz\n", r"cannot import '.*missing.py' \(No module named 'no_such_module_xyz'\)"),
    ]:
        (tmp_path / name).write_text(source)
        with pytest.raises(RaftError, match=message) as caught:
            load_callable(f"{tmp_path / name}:score", "ranker")
        assert "\n" not in str(caught.value)


# ---- Low: malformed JSONL, durable renames


def test_malformed_jsonl_names_the_file_and_the_line(tmp_path):
    from raft.errors import RaftError
    from raft.generators import FileSampler
    from raft.modalities.text.data import read_column

    table = tmp_path / "samples.jsonl"
    table.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n')
    with pytest.raises(RaftError, match=rf"generators.0.path: '{table}' line 3 is not valid JSON \(Expecting value\)"):
        FileSampler(str(table), what="generators.0.path")
    table.write_text('{"prompt": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(RaftError, match=rf"data.prompts: '{table}' line 2 is not a JSON object"):
        read_column(str(table), "prompt", "data.prompts")


def test_renames_into_the_run_directory_are_made_durable(tmp_path, monkeypatch):
    import raft.rundir as rundir

    synced = []
    monkeypatch.setattr(rundir, "fsync_dir", lambda folder: synced.append(Path(folder)))
    rundir.atomic_write_text(tmp_path / "state.json", "{}")
    assert synced == [tmp_path]
    synced.clear()
    rundir.RunDirectory(tmp_path)._write_folder(tmp_path / "iterations" / "iter-0001",
                                                lambda folder: (folder / "a.jsonl").write_text("x"))
    assert tmp_path / "iterations" in synced  # the folder that received the rename


# ---- Low: a prompt longer than the budget is cut the same way in sampling and training, and counted


def test_long_prompts_are_cut_alike_in_sampling_and_training_and_counted(tiny_model_dir, prompt_file, tmp_path,
                                                                        one_thread):
    import json

    import raft
    from raft.modalities.text import TextModality
    from raft.modalities.text.sft import IGNORE, build_example

    prompts = tmp_path / "long.txt"
    prompts.write_text("".join(f"review {i}: " + "the film was a wonderful story " * 30 + "\n" for i in range(12)))
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, prompts, run_dir) + ["iterations=1", "finetune.max_seq_length=40"]
    config = raft.load_config("text", overrides=overrides)
    parts = TextModality().build(config, None)
    policy = parts.policy.policy
    assert policy.prompt_budget == 40 - 6  # max_new_tokens 6
    long_prompt = parts.prompts[0]
    samples = parts.generator.generate([long_prompt], 2, seed=0)
    kept, cut = policy.encode_prompt_cut(long_prompt)
    assert len(kept) == 34 and cut > 0 and samples[0].meta["prompt_tokens_cut"] == cut
    ids, labels = build_example(policy.encode_prompt(long_prompt), samples[0].meta["token_ids"], 40)
    assert ids[: labels.count(IGNORE)] == kept  # training sees the prompt sampling saw

    raft.run(config)
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert row["samples/prompt_cut"] == row["samples"] == 9

    with pytest.raises(Exception, match=r"finetune.max_seq_length \(6\) must be above generation.max_new_tokens \(6\)"):
        TextModality().build(raft.load_config("text", overrides=overrides[:-1] + ["finetune.max_seq_length=6",
                                                                                  f"run_dir={tmp_path / 'x'}"]), None)


# ---- item 5, continued: the sampler's own HTTP client still goes through the environment's proxy


def test_the_http_sampler_uses_the_environments_proxy(tiny_model_dir, monkeypatch):
    import http.client
    import threading
    import urllib.parse
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from openai_server import TinyOpenAIServer
    from raft.generators import OpenAICompatibleSampler, SamplingSettings

    seen = []

    class Proxy(BaseHTTPRequestHandler):  # a forwarding proxy for plain http: absolute URLs in, the server's answer out
        def do_POST(self):
            seen.append((self.path, self.headers.get("Proxy-Authorization")))
            url = urllib.parse.urlsplit(self.path)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            upstream = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
            upstream.request("POST", url.path, body=body, headers={k: v for k, v in self.headers.items()
                                                                 if k.lower() not in ("host", "proxy-authorization")})
            answer = upstream.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.getheader("Content-Type"))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with TinyOpenAIServer(tiny_model_dir, model_name="tiny") as server:
            for name in ("no_proxy", "NO_PROXY", "http_proxy"):
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("HTTP_PROXY", f"http://me:pw@127.0.0.1:{proxy.server_address[1]}")
            sampler = OpenAICompatibleSampler(server.url, "tiny", SamplingSettings(max_new_tokens=3), max_retries=0,
                                              progress=False)
            assert len(sampler.generate(["the film was"], 2, seed=0)) == 2
            assert seen == [(f"{server.url}/chat/completions", "Basic bWU6cHc=")]  # me:pw
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            sampler.generate(["the film was"], 1, seed=0)
            assert len(seen) == 1  # bypassed
    finally:
        proxy.shutdown()
        proxy.server_close()
