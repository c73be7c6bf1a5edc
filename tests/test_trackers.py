"""Trackers: a run writes tensorboard event files in RUN/tensorboard (read back with tensorboard's own reader):
every metrics row at its iteration and a table of each iteration's samples; bad tracker settings are one line."""

import importlib.util
import json

import pytest

import raft
from raft.errors import RaftError

from conftest import tiny_overrides
from test_loop import run_cli


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_a_run_logs_every_metrics_row_and_a_sample_table_to_tensorboard(tiny_model_dir, prompt_file, tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = raft.run(raft.load_config("text", overrides=tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run")))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = events(run_dir)
    for key in ["eval/reward_mean", "reward/policy_mean", "reward/selected_mean", "train/loss", "time/finetune"]:
        points = logged.Scalars(key)
        expected = [(r["iteration"], r[key]) for r in rows if key in r]
        assert [p.step for p in points] == [step for step, _ in expected], key
        assert [p.value for p in points] == pytest.approx([value for _, value in expected], rel=1e-6), key
    assert len(expected) == 2 and [p.step for p in logged.Scalars("eval/reward_mean")] == [0, 1, 2]

    tags = logged.Tags()["tensors"]
    assert "samples/text_summary" in tags and "eval_samples/text_summary" in tags
    tables = {t.step: t.tensor_proto.string_val[0].decode() for t in logged.Tensors("samples/text_summary")}
    assert sorted(tables) == [1, 2]
    samples = [json.loads(line) for line in (run_dir / "iterations/iter-0002/samples.jsonl").read_text().splitlines()]
    lines = tables[2].split("\n")
    assert lines[0] == "| prompt | output | reward | kept |" and len(lines) == 2 + len(samples)
    for line, sample in zip(lines[2:], samples):
        assert line.endswith(f" | {sample['reward']:.4f} | {sample['selected']} |")
        assert line.startswith(f"| {sample['prompt']} | {' '.join(sample['output'].splitlines())[:10]}")


def test_resuming_logs_only_the_iterations_after_the_last_completed_one(tiny_model_dir, prompt_file, tmp_path):
    pytest.importorskip("tensorboard")
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run")
    run_dir = raft.run(raft.load_config("text", overrides=overrides + ["iterations=1"]))
    raft.run(raft.load_config("text", run_dir / "config.yaml", overrides=["iterations=2"]), resume=True)
    assert [p.step for p in events(run_dir).Scalars("eval/reward_mean")] == [0, 1, 2]


def test_no_trackers_writes_no_tensorboard_folder(tiny_model_dir, prompt_file, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run") + ["iterations=1", "trackers=[]"]
    run_dir = raft.run(raft.load_config("text", overrides=overrides))
    assert (run_dir / "state.json").is_file() and not (run_dir / "tensorboard").exists()


def test_bad_trackers_are_one_line_before_anything_runs(tiny_model_dir, prompt_file, tmp_path):
    base = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run")
    with pytest.raises(RaftError, match="unknown tracker 'tensorbord'"):
        raft.load_config("text", overrides=base + ["trackers=[tensorbord]"])
    missing = [name for name in ("wandb", "trackio", "mlflow") if importlib.util.find_spec(name) is None]
    if not missing:
        pytest.skip("wandb, trackio and mlflow are all installed")
    result = run_cli("run", *base, f"trackers=[tensorboard, {missing[0]}]")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"raft: error: trackers: '{missing[0]}' needs the {missing[0]} package "
                                     f"(pip install 'raft-align[{missing[0]}]')")
    assert not (tmp_path / "run").exists()


def test_trackio_gets_the_rows_and_a_table(tiny_model_dir, prompt_file, tmp_path):
    pytest.importorskip("trackio")
    import subprocess
    import sys

    env = {"TRACKIO_DIR": str(tmp_path / "trackio")}
    base = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run")
    result = run_cli("run", *base, "iterations=1", "trackers=[trackio]", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "run/tensorboard").exists()
    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
            "print(json.dumps(SQLiteStorage.get_logs('raft', 'run')))")
    import os

    logs = json.loads(subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, check=True,
                                     env={**os.environ, **env}).stdout.splitlines()[-1])
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [log["step"] for log in logs] == [0, 1]
    assert [log["eval/reward_mean"] for log in logs] == pytest.approx([r["eval/reward_mean"] for r in rows])
    table = logs[1]["samples"]["_value"]
    samples = [json.loads(line) for line in (tmp_path / "run/iterations/iter-0001/samples.jsonl").read_text().splitlines()]
    assert [(t["prompt"], t["output"], t["kept"]) for t in table] == [(s["prompt"], s["output"], s["selected"]) for s in samples]


def test_diffusion_runs_show_their_kept_images_in_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from PIL import Image

    from raft.rundir import RunDirectory
    from raft.trackers import Trackers

    run = tmp_path / "run"
    folder = run / "iterations/iter-0001"
    (folder / "images").mkdir(parents=True)
    (run / "config.yaml").write_text("modality: diffusion\n")
    (run / "state.json").write_text('{"completed_iteration": 1}\n')
    (run / "metrics.jsonl").write_text('{"iteration": 1, "reward/policy_mean": 0.5}\n')
    records = []
    for i, shade in enumerate([10, 200, 90]):
        Image.new("RGB", (6, 4), (0, shade, 0)).save(folder / f"images/samples-{i:05d}.png")
        records.append({"iteration": 1, "prompt_index": 0, "prompt": "a square", "output": f"images/samples-{i:05d}.png",
                        "reward": shade / 255, "selected": shade > 50})
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    trackers = Trackers(["tensorboard"], RunDirectory(run))
    trackers.logged = 0
    trackers.sync()
    trackers.finish()
    logged = events(run)
    assert [p.value for p in logged.Scalars("reward/policy_mean")] == [0.5]
    [grid] = logged.Images("samples/kept")  # the kept images side by side
    import io

    image = Image.open(io.BytesIO(grid.encoded_image_string)).convert("RGB")
    assert (grid.width, grid.height) == (12, 4) and grid.step == 1
    assert [image.getpixel((x, 0))[1] for x in (0, 5, 6, 11)] == [200, 200, 90, 90]
