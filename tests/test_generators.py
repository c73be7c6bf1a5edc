"""Decoupled generation: magic prompts, pre-generated samples from files, mixtures of generators."""

import json

import pytest

import raft
from raft.errors import ConfigError, RaftError
from raft.generators import FileSampler, Mixture, SamplingPrompt, split_counts
from raft.interface import Generator, Sample

from conftest import CORPUS, tiny_overrides


class Echo(Generator):
    """Answers each prompt with '<name>:<prompt>:<j>' and records what it was asked."""

    def __init__(self, name):
        self.name, self.calls = name, []

    def generate(self, prompts, samples_per_prompt, seed):
        self.calls.append((list(prompts), samples_per_prompt, seed))
        return [Sample(i, p, f"{self.name}:{p}:{j}", meta={"generator": self.name, "prompt_sent": p})
                for i, p in enumerate(prompts) for j in range(samples_per_prompt)]


# ---- mixtures and magic prompts, without a model


@pytest.mark.parametrize("shares, total, expected", [
    ([1.0], 8, [8]), ([1, 1], 8, [4, 4]), ([1, 1], 3, [2, 1]), ([3, 1], 4, [3, 1]), ([0.9, 0.1], 4, [4, 0]),
    ([1, 1, 1], 8, [3, 3, 2]), ([0.25, 0.75], 8, [2, 6]),
])
def test_split_counts_follow_the_shares_and_sum_to_k(shares, total, expected):
    assert split_counts(shares, total) == expected


def test_mixture_gives_each_generator_its_share_of_every_prompt():
    policy, teacher = Echo("policy"), Echo("teacher")
    samples = Mixture([policy, teacher], [1, 3]).generate(["a", "b"], 4, seed=7)
    assert [s.prompt_index for s in samples] == [0] * 4 + [1] * 4  # grouped by prompt, as the loop expects
    assert [s.meta["generator"] for s in samples[:4]] == ["policy", "teacher", "teacher", "teacher"]
    assert [s.output for s in samples[4:]] == ["policy:b:0", "teacher:b:0", "teacher:b:1", "teacher:b:2"]
    assert policy.calls[0][:2] == (["a", "b"], 1) and teacher.calls[0][:2] == (["a", "b"], 3)
    assert policy.calls[0][2] != teacher.calls[0][2]  # each part has its own random stream
    with pytest.raises(ValueError, match="distinct"):
        Mixture([Echo("x"), Echo("x")], [1, 1])


def test_sampling_prompt_is_sent_but_not_kept():
    inner = Echo("policy")
    wrapped = SamplingPrompt(inner, "{prompt} Answer warmly.")
    samples = wrapped.generate(["a film", "a plot"], 2, seed=0)
    assert inner.calls[0][0] == ["a film Answer warmly.", "a plot Answer warmly."]
    assert [s.prompt for s in samples] == ["a film", "a film", "a plot", "a plot"]
    assert [s.meta["prompt_sent"] for s in samples[::2]] == ["a film Answer warmly.", "a plot Answer warmly."]
    assert samples[0].meta["settings"]["sampling_template"] == "{prompt} Answer warmly."
    assert wrapped.name == "policy"  # provenance names the generator that sampled


# ---- config


def load(*overrides, yaml_text=None, tmp_path=None):
    path = None
    if yaml_text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml_text)
    return raft.load_config("text", path, list(overrides))


def test_default_is_the_policy_alone():
    config = load()
    assert [(g.kind, g.share, g.sampling_template) for g in config.generators] == [("policy", 1.0, "{prompt}")]


def test_a_mixture_from_yaml_and_overrides(tmp_path):
    config = load("generators.1.request_params={stop: [y], top_k: 5}",
                  yaml_text="generators:\n  - {kind: policy, sampling_template: '{prompt} !'}\n"
                            "  - {kind: http, url: 'http://127.0.0.1:1/v1', model: m, share: 3}\n",
                  tmp_path=tmp_path)
    assert [g.kind for g in config.generators] == ["policy", "http"]
    assert config.generators[1].share == 3.0 and config.generators[1].request_params == {"stop": ["y"], "top_k": 5}
    assert load("generators.0.request_params.stop=[x]").generators[0].request_params == {"stop": ["x"]}


@pytest.mark.parametrize("yaml_text, message", [
    ("generators: []", "generators must list at least one generator"),
    ("generators: [{kind: policy, share: 0}]", "generators.0.share must be > 0"),
    ("generators: [{kind: file}]", "generators.0.path is required by kind file"),
    ("generators: [{kind: http, model: m}]", "generators.0.url is required by kind http"),
    ("generators: [{kind: http, url: 'http://h/v1'}]", "generators.0.model is required by kind http"),
    ("generators: [{kind: http, url: 'http://h/v1', model: m, timeout_s: 0}]", "generators.0.timeout_s must be > 0"),
    ("generators: [{kind: http, url: 'http://h/v1', model: m, endpoint: completions, sampling_system_prompt: s}]",
     "generators.0.sampling_system_prompt needs endpoint chat"),
    ("generators: [{kind: vllm}]", "generators.0.model is required by kind vllm"),
    ("generators: [{kind: policy, name: student}]", "generators.0.name of kind policy is always 'policy'"),
    ("generators: [{kind: policy}, {kind: policy}]", "generators.1.name 'policy' is also generators.0's"),
    ("generators: [{kind: file, path: a.jsonl}, {kind: file, path: b.jsonl}]", "generators.1.name 'file' is also"),
    ("generators: [{kind: policy, sampling_template: 'be nice'}]", "generators.0.sampling_template must contain {prompt}"),
    ("generators: [{kind: file, path: a.jsonl, sampling_template: '{prompt}!'}]", "do not apply to kind file"),
    ("samples_per_prompt: 4\ngenerators: [{kind: policy, share: 0.9}, {kind: file, path: a.jsonl, share: 0.1}]",
     "generators.1.share gives it 0 of the samples_per_prompt (4) samples"),
    ("generators: [{kind: mystery}]", "generators.0.kind must be one of policy, file, http, vllm"),
])
def test_bad_generator_settings_name_the_field(tmp_path, yaml_text, message):
    with pytest.raises(ConfigError) as caught:
        load(yaml_text=yaml_text, tmp_path=tmp_path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# ---- pre-generated samples


def write_samples(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_file_sampler_draws_k_distinct_rows_per_prompt(tmp_path):
    rows = [{"prompt": p, "response": f"{p} answer {j}"} for p in ["a", "b"] for j in range(3)]
    sampler = FileSampler(str(write_samples(tmp_path / "s.jsonl", rows)), name="teacher",
                          prompt_key=lambda p: f"Q: {p}")
    assert sampler.prompts == ["Q: a", "Q: b"]
    samples = sampler.generate(["Q: b", "Q: a"], 2, seed=3)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    assert all(s.output.startswith(s.prompt.removeprefix("Q: ") + " answer") for s in samples)
    assert len({s.output for s in samples}) == 4  # without replacement
    assert samples[0].meta["generator"] == "teacher" and rows[samples[0].meta["settings"]["row"]]["response"] == samples[0].output
    assert [s.output for s in sampler.generate(["Q: b", "Q: a"], 2, seed=3)] == [s.output for s in samples]
    assert sorted(s.output for s in sampler.generate(["Q: a"], 3, seed=0)) == ["a answer 0", "a answer 1", "a answer 2"]


def test_file_sampler_reads_parquet_and_saved_datasets(tmp_path):
    import datasets

    table = datasets.Dataset.from_dict({"question": ["a", "a", "b"], "completion": ["x", "y", "z"]})
    table.to_parquet(str(tmp_path / "s.parquet"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    for source in [tmp_path / "s.parquet", tmp_path / "saved"]:
        sampler = FileSampler(str(source), prompt_field="question", response_field="completion")
        assert sampler.prompts == ["a", "b"]
        assert sampler.generate(["b"], 1, seed=0)[0].output == "z"
        assert sorted(s.output for s in sampler.generate(["a"], 2, seed=0)) == ["x", "y"]


def test_file_sampler_errors_are_one_line(tmp_path):
    good = write_samples(tmp_path / "s.jsonl", [{"prompt": "a", "response": "x"}, {"prompt": "a", "response": "y"}])
    cases = [
        (lambda: FileSampler(str(tmp_path / "missing.jsonl"), what="generators.1.path"),
         f"generators.1.path: file '{tmp_path / 'missing.jsonl'}' does not exist"),
        (lambda: FileSampler(str(good), response_field="output"), "has no column 'output' (columns: prompt, response)"),
        (lambda: FileSampler(str(good)).generate(["b"], 1, 0), "has no samples for the prompt 'b'"),
        (lambda: FileSampler(str(good)).generate(["a"], 3, 0), "has 2 samples for the prompt 'a', fewer than the 3"),
    ]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    cases.append((lambda: FileSampler(str(tmp_path / "bad.jsonl")), "bad.jsonl' line 1 is not valid JSON"))  # names the line
    for make, message in cases:
        with pytest.raises(RaftError) as caught:
            make()
        assert message in str(caught.value) and "\n" not in str(caught.value)


# ---- end to end on the tiny model


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_magic_prompt_is_sampled_with_and_never_trained_on(tiny_model_dir, prompt_file, tmp_path, monkeypatch):
    """Done-when 1: the magic words and the sampling-only system prompt reach the sampler's model input,
    while the fine-tuner tokenises the original prompt and selected.jsonl records it."""
    from raft.modalities.text.sampler import TextSampler
    from raft.modalities.text.sft import TextFineTuner

    sampled, trained = [], []
    sample_batch, example = TextSampler._sample_batch, TextFineTuner.example

    def spy_sample_batch(self, model, prompt_ids, k, max_new_tokens):
        sampled.extend(self.policy.tokenizer.decode(ids) for ids in prompt_ids)
        return sample_batch(self, model, prompt_ids, k, max_new_tokens)

    def spy_example(self, sample):
        ids, labels = example(self, sample)
        trained.append((sample.prompt, self.policy.tokenizer.decode(ids)))
        return ids, labels

    monkeypatch.setattr(TextSampler, "_sample_batch", spy_sample_batch)
    monkeypatch.setattr(TextFineTuner, "example", spy_example)
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run") + [
        "iterations=1", "generators.0.sampling_template=Be MAGICAL. {prompt} (MAGIC)",
        "generators.0.sampling_system_prompt=You write SPARKLY reviews."]
    run_dir = raft.run(raft.load_config("text", overrides=overrides))

    samples = read_jsonl(run_dir / "iterations/iter-0001/samples.jsonl")
    selected = read_jsonl(run_dir / "iterations/iter-0001/selected.jsonl")
    drawn = sorted({s["prompt"] for s in samples})
    assert len(drawn) == 3 and not any("MAGIC" in p for p in drawn)
    assert all(s["prompt_sent"] == f"Be MAGICAL. {s['prompt']} (MAGIC)" and s["generator"] == "policy" for s in samples)
    assert all(s["settings"]["system_prompt"] == "You write SPARKLY reviews." for s in samples)

    # what the model was fed when sampling the training prompts: system prompt, magic words and the prompt
    training_inputs = [text for text in sampled if "MAGIC" in text]
    assert len(training_inputs) == 3
    for prompt in drawn:
        assert any(f"SPARKLY reviews.<|im_end|>\n<|im_start|>user\nBe MAGICAL. {prompt} (MAGIC)<|im_end|>" in text
                   for text in training_inputs)
    # the held-out evaluation samples the policy without them
    assert len(sampled) > 3 and all("SPARKLY" not in text for text in sampled if "MAGIC" not in text)
    eval_samples = read_jsonl(run_dir / "iterations/iter-0001/eval_samples.jsonl")
    assert all(s["prompt_sent"] == s["prompt"] and "MAGIC" not in s["prompt"] for s in eval_samples)

    # what the fine-tuner tokenised: the original prompt, the response, nothing sampling-only
    assert len(trained) == len(selected) == 3
    assert sorted(prompt for prompt, _ in trained) == sorted(s["prompt"] for s in selected)
    for prompt, text in trained:
        assert f"<|im_start|>user\n{prompt}<|im_end|>" in text
        assert "MAGIC" not in text and "SPARKLY" not in text
    assert all("MAGIC" not in s["prompt"] for s in selected)


def test_a_run_on_pre_generated_samples_alone_fine_tunes_the_policy(tiny_model_dir, tmp_path):
    """Done-when 3: the policy never samples for training; it is fine-tuned on the best external samples."""
    import torch
    from safetensors.torch import load_file

    prompts = [f"review {i}: {CORPUS[i % len(CORPUS)]}" for i in range(12)]
    answers = ["bad bad bad", "an awful plot", "a wonderful, beautiful movie", "terrible"]
    rows = [{"prompt": p, "response": a, "source": "teacher-v1"} for p in prompts for a in answers]
    samples_file = write_samples(tmp_path / "teacher.jsonl", rows)
    # every prompt has the same 4 answers: diversity-aware selection would (rightly) keep the best one only once, and
    # KL-regularized ranking would (rightly) pass over the answer the policy learned in iteration 1; this test is
    # about where samples come from, so both are off
    overrides = tiny_overrides(tiny_model_dir, samples_file, tmp_path / "run") + [
        "samples_per_prompt=4", "generators=[{kind: file, path: '" + str(samples_file) + "', name: teacher}]",
        "selection.diversity.max_similarity=null", "selection.diversity.max_opening_share=null",
        "kl.beta=0"]
    config = raft.load_config("text", overrides=overrides)
    assert config.data.prompts == str(samples_file)  # the prompt pool comes from the same file, once each
    run_dir = raft.run(config)

    for iteration in (1, 2):
        folder = run_dir / f"iterations/iter-{iteration:04d}"
        samples, selected = read_jsonl(folder / "samples.jsonl"), read_jsonl(folder / "selected.jsonl")
        assert len(samples) == 12 and {s["generator"] for s in samples} == {"teacher"}
        assert all(s["settings"]["source"] == str(samples_file) for s in samples)
        assert sorted(s["output"] for s in samples[:4]) == sorted(answers)  # all 4 rows of the prompt
        assert [s["output"] for s in selected] == ["a wonderful, beautiful movie"] * 3  # the most vowels wins
        assert {s["generator"] for s in read_jsonl(folder / "eval_samples.jsonl")} == {"policy"}
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert metrics[1]["reward/policy_mean"] is None  # no policy samples in training: nothing to average
    assert isinstance(metrics[1]["reward/selected_mean"], float) and metrics[2]["train/loss"] > 0

    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run_dir / "checkpoints/iter-0002/model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_vllm_without_the_package_is_one_clear_line():
    import importlib.util

    from raft.generators import SamplingSettings
    from raft.generators.vllm_sampler import VLLMSampler

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(RaftError) as caught:
        VLLMSampler("some/model", SamplingSettings())
    assert str(caught.value) == ("kind vllm needs the vllm package, which is not installed "
                                 "(on a CUDA machine: pip install 'raft-align[vllm]')")
