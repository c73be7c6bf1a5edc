"""`raft export`: a run's samples as Hugging Face datasets (samples, sft, West-of-N preferences), loaded back,
and the preferences training TRL's DPOTrainer for a step."""

import json

import pytest

import raft
from raft.errors import RaftError
from raft.export import export_run

from conftest import tiny_overrides
from test_loop import run_cli


@pytest.fixture(scope="module")
def text_run(tiny_model_dir, prompt_file, tmp_path_factory):
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path_factory.mktemp("export") / "run")
    return raft.run(raft.load_config("text", overrides=overrides))


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_samples_export_holds_every_sample_and_loads_both_ways(text_run, tmp_path):
    import datasets

    out = export_run(text_run, "samples", tmp_path / "samples")
    on_disk = jsonl(text_run / "iterations/iter-0001/samples.jsonl") + jsonl(text_run / "iterations/iter-0002/samples.jsonl")
    loaded = datasets.load_dataset(str(out), split="train")
    from_disk = datasets.load_from_disk(str(out / "arrow"))
    assert len(loaded) == len(from_disk) == len(on_disk) == 18
    assert loaded["output"] == [r["output"] for r in on_disk] == from_disk["output"]
    assert loaded["reward"] == pytest.approx([r["reward"] for r in on_disk])
    assert loaded["kept"] == [r["selected"] for r in on_disk] and sum(loaded["kept"]) == 6
    assert loaded["iteration"] == [1] * 9 + [2] * 9
    assert "README.md" in {p.name for p in out.iterdir()}


def test_sft_export_is_the_kept_set_as_prompt_completion_and_messages(text_run, tmp_path):
    import datasets

    kept = jsonl(text_run / "iterations/iter-0001/selected.jsonl") + jsonl(text_run / "iterations/iter-0002/selected.jsonl")
    sft = datasets.load_dataset(str(export_run(text_run, "sft", tmp_path / "sft")), split="train")
    assert sft["prompt"] == [r["prompt"] for r in kept] and sft["completion"] == [r["output"] for r in kept]
    assert sft[0]["messages"] == [{"role": "user", "content": kept[0]["prompt"]},
                                  {"role": "assistant", "content": kept[0]["output"]}]
    chat = datasets.load_from_disk(str(export_run(text_run, "sft", tmp_path / "chat", conversational=True) / "arrow"))
    assert chat[0]["prompt"] == [{"role": "user", "content": kept[0]["prompt"]}]
    assert chat[0]["completion"] == [{"role": "assistant", "content": kept[0]["output"]}]


def test_preferences_are_the_best_and_worst_of_each_prompt(text_run, tmp_path):
    import datasets

    pairs = datasets.load_dataset(str(export_run(text_run, "preferences", tmp_path / "prefs")), split="train")
    samples = jsonl(text_run / "iterations/iter-0001/samples.jsonl") + jsonl(text_run / "iterations/iter-0002/samples.jsonl")
    assert len(pairs) >= 1
    for pair in pairs:
        group = [s for s in samples if (s["iteration"], s["prompt_index"]) == (pair["iteration"], pair["prompt_index"])]
        rewards = [s["reward"] for s in group]
        assert pair["chosen_reward"] == pytest.approx(max(rewards)) and pair["rejected_reward"] == pytest.approx(min(rewards))
        assert pair["margin"] == pytest.approx(max(rewards) - min(rewards)) and pair["margin"] > 0
        assert pair["chosen"] in [s["output"] for s in group if s["reward"] == max(rewards)]
        assert pair["rejected"] in [s["output"] for s in group if s["reward"] == min(rewards)]
        assert pair["candidates"] == 3
    cut = sorted(pairs["margin"])[len(pairs) // 2]
    fewer = datasets.load_from_disk(str(export_run(text_run, "preferences", tmp_path / "cut", min_margin=cut) / "arrow"))
    assert sorted(fewer["margin"]) == sorted(m for m in pairs["margin"] if m >= cut)
    with pytest.raises(RaftError, match="no preference pair .* margin >= 1000"):
        export_run(text_run, "preferences", tmp_path / "none", min_margin=1000)


def test_exported_preferences_train_trl_dpo_for_a_step(text_run, tiny_model_dir, tmp_path, one_thread):
    trl = pytest.importorskip("trl")
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs = datasets.load_dataset(str(export_run(text_run, "preferences", tmp_path / "prefs")), split="train")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=1,
                         learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_exported_preferences_train_a_warm_reward_model(text_run, tiny_model_dir, tmp_path, one_thread):
    """`raft export --format preferences` (chat messages) -> `raft train-rm` -> a classifier ranker's folder."""
    from raft.cli import main

    prefs = export_run(text_run, "preferences", tmp_path / "prefs", conversational=True)
    out = tmp_path / "rm"
    assert main(["train-rm", f"data={prefs}", f"eval_data={prefs}", f"base={tiny_model_dir}", f"out={out}",
                 "members=2", "batch_size=2", "max_length=64"]) == 0
    report = json.loads((out / "warm.json").read_text())
    assert report["train_pairs"] == report["eval_pairs"] >= 1 and len(report["members"]) == 2
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_diffusion_images_export_as_datasets_image(tmp_path):
    import datasets
    from PIL import Image

    run = tmp_path / "run"
    folder = run / "iterations/iter-0001"
    (folder / "images").mkdir(parents=True)
    (run / "config.yaml").write_text("modality: diffusion\n")
    (run / "state.json").write_text('{"completed_iteration": 1}\n')
    rows = []
    for i, shade in enumerate([0, 120, 250, 30]):
        Image.new("RGB", (8, 8), (shade, 0, 0)).save(folder / f"images/samples-{i:05d}.png")
        rows.append({"iteration": 1, "prompt_index": i // 2, "prompt": f"p{i // 2}", "output": f"images/samples-{i:05d}.png",
                     "reward": shade / 255, "rewards": None, "discard_reason": None, "selected": shade in (120, 250)})
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "selected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["selected"]))
    pairs = datasets.load_dataset(str(export_run(run, "preferences", tmp_path / "prefs")), split="train")
    assert isinstance(pairs.features["chosen"], datasets.Image) and len(pairs) == 2
    assert pairs[0]["chosen"].getpixel((0, 0)) == (120, 0, 0) and pairs[0]["rejected"].getpixel((0, 0)) == (0, 0, 0)
    assert pairs[1]["chosen"].getpixel((0, 0)) == (250, 0, 0)
    samples = datasets.load_from_disk(str(export_run(run, "samples", tmp_path / "samples") / "arrow"))
    assert isinstance(samples.features["output"], datasets.Image) and samples[3]["output"].getpixel((0, 0)) == (30, 0, 0)
    sft = datasets.load_dataset(str(export_run(run, "sft", tmp_path / "sft")), split="train")
    assert [im.getpixel((0, 0))[0] for im in sft["completion"]] == [120, 250]
    import shutil

    shutil.rmtree(run)  # the images are in the dataset, not links to the run
    assert datasets.load_from_disk(str(tmp_path / "samples/arrow"))[1]["output"].size == (8, 8)


def test_bad_input_is_one_line_each(text_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text("modality: text\n")
    (empty / "state.json").write_text('{"completed_iteration": 0}\n')
    cases = [
        ([str(text_run), "--format", "parquet", "--out", str(tmp_path / "a")], "unknown export format 'parquet'"),
        ([str(empty), "--format", "samples", "--out", str(tmp_path / "b")], "has no samples"),
        ([str(tmp_path / "missing"), "--format", "sft", "--out", str(tmp_path / "c")], "does not exist"),
        ([str(tmp_path), "--format", "sft", "--out", str(tmp_path / "d")], "is not a run directory"),
        ([str(text_run), "--format", "preferences", "--min-margin", "x", "--out", str(tmp_path / "e")], "--min-margin"),
        ([str(text_run), "--format", "sft", "--out", str(text_run)], "already exists and is not empty"),
    ]
    for args, message in cases:
        result = run_cli("export", *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr
    ok = run_cli("export", str(text_run), "--format", "preferences", "--out", str(tmp_path / "ok"))
    assert ok.returncode == 0 and "(preferences)" in ok.stdout and (tmp_path / "ok/data").is_dir()
