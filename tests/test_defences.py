"""The collapse defences: KL-regularized ranking, diversity-aware selection, the collapse guard, reference replay."""

import json
import math

import pytest
import torch

import raft
from raft.config import DiversityConfig, SelectionConfig
from raft.errors import ConfigError
from raft.interface import Sample
from raft.modalities.text.diversity import ngram_features, opening_of
from raft.rundir import RunDirectory
from raft.selection import select

from conftest import CORPUS, tiny_overrides


# ---- KL-regularized ranking


def hand_log_ratio(policy_model, reference_model, prompt_ids, response_ids, temperature):
    """sum_t log pi(y_t | x, y_<t) - log pi_0(y_t | x, y_<t), one unpadded forward per token."""
    total = 0.0
    for t, token in enumerate(response_ids):
        ids = torch.tensor([prompt_ids + response_ids[:t]])
        with torch.no_grad():
            mine = torch.log_softmax(policy_model(input_ids=ids).logits[0, -1] / temperature, -1)[token]
            theirs = torch.log_softmax(reference_model(input_ids=ids).logits[0, -1] / temperature, -1)[token]
        total += float(mine - theirs)
    return total


def hand_logprob(model, prompt_ids, response_ids, temperature):
    """sum_t log pi(y_t | x, y_<t), one unpadded forward per token."""
    total = 0.0
    for t, token in enumerate(response_ids):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + response_ids[:t]])).logits[0, -1]
        total += float(torch.log_softmax(logits / temperature, -1)[token])
    return total


def perturbed(model, seed=0, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.mark.parametrize("lora", [False, True])
def test_kl_term_matches_a_hand_computation(tiny_model_dir, lora, one_thread):
    import copy

    from raft.modalities.text.config import LoraConfig, TextGenerationConfig, TextModelConfig
    from raft.modalities.text.model import load_policy
    from raft.modalities.text.reference import TextReference, starting_model_loader
    from raft.modalities.text.sampler import TextSampler

    policy = load_policy(TextModelConfig(name_or_path=str(tiny_model_dir)), LoraConfig(enabled=lora, r=4), None)
    start = copy.deepcopy(policy.model)
    start_loader = starting_model_loader(TextModelConfig(name_or_path=str(tiny_model_dir)))
    reference = TextReference(policy, start_loader, temperature=0.7, max_length=512)
    samples = TextSampler(policy, TextGenerationConfig(max_new_tokens=8, temperature=0.7), progress=False).generate(
        ["the film was", "a dull plot"], 3, seed=1)
    assert reference.log_ratios(samples) == pytest.approx([0.0] * 6, abs=1e-5)  # the policy is still the start

    if lora:  # move the adapter only: the reference is the same model with it disabled
        with torch.no_grad():
            for name, parameter in policy.model.named_parameters():
                if "lora_" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.3)
        base = policy.model
        start_model = lambda ids: _disabled(base, ids)
    else:
        perturbed(policy.model)
        start_model = start
    ratios, kls = reference.measure(samples)
    for sample, ratio, kl in zip(samples, ratios, kls):
        prompt_ids = policy.encode_prompt(sample.prompt)
        expected = hand_log_ratio(policy.model, _Callable(start_model), prompt_ids, sample.meta["token_ids"], 0.7)
        assert ratio == pytest.approx(expected, abs=1e-4)
        assert abs(expected) > 1e-4  # the policy moved, so the test can fail
        assert kl >= 0
    # exact KL is the expectation of the log-ratio: across many samples their means agree roughly
    assert sum(kls) > 0
    # the held-out KL of samples the moved policy drew: exact per sample, or (eval.kl sampled) the log-ratio
    fresh = TextSampler(policy, TextGenerationConfig(max_new_tokens=8, temperature=0.7), progress=False).generate(
        ["the film was", "a dull plot"], 3, seed=2)
    ratios, kls = reference.measure(fresh)
    assert reference.kl_to_start(fresh) == pytest.approx(kls, abs=1e-5)
    reference.exact_eval_kl = False
    assert reference.kl_to_start(fresh) == pytest.approx(ratios, abs=1e-4)
    assert reference.kl_to_start(fresh) != pytest.approx(kls, abs=1e-3)


def test_sampled_logprobs_are_the_policys_and_spare_its_forward_pass(tiny_model_dir, one_thread):
    """The sampler records log pi(y|x) of the tokens it drew, at the sampling temperature; ranking's log-ratio
    then runs only the reference, and still equals the hand computation."""
    from raft.modalities.text.config import LoraConfig, TextGenerationConfig, TextModelConfig
    from raft.modalities.text.model import load_policy
    from raft.modalities.text.reference import TextReference, starting_model_loader
    from raft.modalities.text.sampler import TextSampler

    model_config = TextModelConfig(name_or_path=str(tiny_model_dir))
    policy = load_policy(model_config, LoraConfig(), None)
    start = starting_model_loader(model_config)().eval()
    reference = TextReference(policy, starting_model_loader(model_config), temperature=0.7, max_length=512)
    reference._unchanged()  # fingerprints the start
    perturbed(policy.model)
    sampler = TextSampler(policy, TextGenerationConfig(max_new_tokens=8, temperature=0.7), progress=False)
    samples = sampler.generate(["the film was", "a dull plot"], 3, seed=1)
    for sample in samples:
        prompt_ids = policy.encode_prompt(sample.prompt)
        expected_logprob = hand_logprob(policy.model, prompt_ids, sample.meta["token_ids"], 0.7)
        assert sample.meta["logprob"] == pytest.approx(expected_logprob, abs=1e-4)
        assert sample.meta["logprob"] < -1e-3  # a real log-probability, so the test can fail

    calls = []
    policy.model.register_forward_hook(lambda *args: calls.append(1))
    ratios = reference.log_ratios(samples)
    assert not calls  # the policy's side came from the sampler
    for sample, ratio in zip(samples, ratios):
        expected = hand_log_ratio(policy.model, start, policy.encode_prompt(sample.prompt), sample.meta["token_ids"], 0.7)
        assert ratio == pytest.approx(expected, abs=1e-4)
        assert abs(expected) > 1e-4
    sample = samples[0]
    sample.meta["prompt_sent"] = "a magic prompt: " + sample.prompt  # sampled elsewhere: the policy is run again
    assert reference.log_ratios([sample])[0] == pytest.approx(ratios[0], abs=1e-4) and calls

    # a generation config that penalises repeats changes the scores before a recorder sees them: nothing is recorded,
    # and the log-ratio is computed by running the policy, as for text from elsewhere
    policy.model.generation_config.repetition_penalty = 1.3
    penalised = sampler.generate(["the film was"], 2, seed=1)
    assert all("logprob" not in s.meta for s in penalised)
    for sample, ratio in zip(penalised, reference.log_ratios(penalised)):
        expected = hand_log_ratio(policy.model, start, policy.encode_prompt(sample.prompt), sample.meta["token_ids"], 0.7)
        assert ratio == pytest.approx(expected, abs=1e-4)


class _Callable(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, input_ids):
        return self.fn(input_ids=input_ids) if isinstance(self.fn, torch.nn.Module) else self.fn(input_ids)


def _disabled(model, ids):
    with model.disable_adapter():
        return model(input_ids=ids)


def test_kl_regularized_ranking_prefers_samples_close_to_the_start():
    from raft.loop import regularize

    class Reference:
        def log_ratios(self, samples):
            return [0.0, 5.0, 1.0]

    class Parts:
        reference = Reference()

    samples = [Sample(0, "p", "a", reward=0.5), Sample(0, "p", "b", reward=0.9), Sample(0, "p", "c", reward=0.6)]
    metrics = regularize(samples, Parts(), beta=0.1, policy_name="policy")
    assert [s.score for s in samples] == pytest.approx([0.5, 0.4, 0.5])
    assert metrics["kl/beta"] == 0.1 and metrics["kl/policy_mean"] == pytest.approx(2.0)
    kept = select(samples, SelectionConfig(strategy="local", keep_per_prompt=1))
    assert [s.output for s in kept] == ["a"]  # 0.9 - 0.1 * 5 loses to 0.5; ties keep the earlier
    assert kept[0].reward == 0.5  # the reward itself is left as the ranker gave it


def test_adaptive_beta_follows_the_controller():
    from raft.loop import kl_beta

    config = raft.load_config("text", overrides=["kl.beta=0.1", "kl.adaptive=true", "kl.target=4", "kl.horizon=100"])
    rows = [{"iteration": 0}, {"iteration": 1, "samples": 50, "kl/beta": 0.1, "kl/policy_mean": 8.0}]
    assert kl_beta(config, rows[:1]) == 0.1
    assert kl_beta(config, rows) == pytest.approx(0.1 * (1 + 0.2 * 50 / 100))  # error clipped at +0.2
    rows.append({"iteration": 2, "samples": 50, "kl/beta": kl_beta(config, rows), "kl/policy_mean": 3.6})
    assert kl_beta(config, rows) == pytest.approx(rows[2]["kl/beta"] * (1 - 0.1 * 50 / 100))


# ---- diversity-aware selection


def sample(prompt, text, reward):
    return Sample(prompt_index=prompt, prompt=f"p{prompt}", output=text, reward=reward)


def test_ngram_similarity_is_overlap():
    rows = ngram_features([sample(0, "the movie was great fun", 0), sample(0, "The movie was great fun!", 0),
                           sample(0, "dull plot and bad acting", 0)])
    similarity = rows @ rows.T
    assert similarity[0, 1] == pytest.approx(1.0) and similarity[0, 2] == pytest.approx(0.0)


def test_diversity_keeps_the_next_best_distinct_candidate():
    samples = [
        sample(0, "the movie was great fun from start to end", 0.9),
        sample(0, "a dull plot with some bad acting", 0.5),
        sample(0, "a dull plot with some bad acting", 0.4),
        sample(1, "the movie was great fun from start to end", 0.95),
        sample(1, "i loved the music and the ending", 0.3),
    ]
    plain = select(samples, SelectionConfig(strategy="local", keep_per_prompt=1))
    assert [s.output for s in plain] == [samples[0].output, samples[3].output]  # one reply twice

    for s in samples:
        s.selected = False
    config = SelectionConfig(strategy="local", keep_per_prompt=1, diversity=DiversityConfig(max_similarity=0.8))
    kept = select(samples, config, features=ngram_features)
    assert kept == [samples[1], samples[3]]  # prompt 0's best is a copy of prompt 1's: its next-best is kept
    assert "similarity 1.00 to a kept sample of prompt 1" in samples[0].meta["not_kept"]


def test_diversity_in_global_selection_fills_the_quota_with_distinct_samples():
    texts = ["great great film"] * 4 + ["a fine cast", "the music was lovely", "dull"]
    samples = [sample(i, t, 1.0 - 0.1 * i) for i, t in enumerate(texts)]
    config = SelectionConfig(strategy="global", top_fraction=3 / 7, diversity=DiversityConfig(max_similarity=0.9))
    kept = select(samples, config, features=ngram_features)
    assert [s.output for s in kept] == ["great great film", "a fine cast", "the music was lovely"]


def test_opening_cap_limits_shared_openings():
    texts = ["The movie was great, really", "the movie was great fun", "The movie was great indeed",
             "A fine cast and a story", "the movie was great again"]
    samples = [sample(i, t, 1.0) for i, t in enumerate(texts)]
    samples += [sample(i, f"other reply number {i} here", 0.1) for i in range(len(texts))]
    config = SelectionConfig(strategy="local", keep_per_prompt=1, diversity=DiversityConfig(max_opening_share=0.4))
    kept = select(samples, config, opening=lambda s: opening_of(s.output, 4))
    openings = [opening_of(s.output, 4) for s in kept]
    assert len(kept) == 5 and openings.count("the movie was great") == 2  # cap: floor(0.4 x 5 kept)
    assert sorted(s.prompt_index for s in kept) == [0, 1, 2, 3, 4]  # prompts 2 and 4 keep their next-best
    assert {s.output for s in kept if s.prompt_index in (2, 4)} == {"other reply number 2 here", "other reply number 4 here"}


# ---- collapse guard and the run-level wiring


def collapsing_overrides(tiny_model_dir, prompt_file, run_dir, reference_file):
    return tiny_overrides(tiny_model_dir, prompt_file, run_dir, reference_file) + [
        "iterations=4", "finetune.learning_rate=3e-2", "finetune.epochs=4"]


def test_guard_stops_a_collapsing_run(tiny_model_dir, prompt_file, reference_file, tmp_path, capsys, one_thread):
    run_dir = tmp_path / "run"
    config = raft.load_config("text", overrides=collapsing_overrides(tiny_model_dir, prompt_file, run_dir, reference_file)
                              + ["guard.max_kl=0.5"])
    raft.run(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["eval/kl_to_start"] > 0.5  # learning rate 3e-2: far from the start at once
    assert json.loads((run_dir / "state.json").read_text()) == {"completed_iteration": 1}
    assert (run_dir / "checkpoints/iter-0001").is_dir()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("guard:")]
    assert len(lines) == 1 and "eval/kl_to_start rose to" in lines[0] and "guard.max_kl 0.5" in lines[0]

    raft.run(raft.load_config("text", run_dir / "config.yaml", overrides=["iterations=5"]), resume=True)
    assert "guard: stopping after iteration 1" in capsys.readouterr().out  # resuming does not pass the bound
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_guard_rollback_keeps_the_last_good_checkpoint(tiny_model_dir, prompt_file, reference_file, tmp_path, capsys,
                                                       one_thread):
    run_dir = tmp_path / "run"
    overrides = collapsing_overrides(tiny_model_dir, prompt_file, run_dir, reference_file)
    raft.run(raft.load_config("text", overrides=overrides + ["iterations=1", "finetune.learning_rate=1e-4"]))
    first_kl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1]["eval/kl_to_start"]
    # continue at a learning rate that moves far from the start, with a bound just above iteration 1's KL (which the
    # default sampled estimate can put a little below 0 after so small a move)
    bound = max(first_kl, 0.0) * 1.01 + 1e-4
    raft.run(raft.load_config("text", run_dir / "config.yaml", overrides=[
        "iterations=4", "finetune.learning_rate=3e-2", f"guard.max_kl={bound}", "guard.action=rollback"]), resume=True,
        allow_changed_settings=True)  # a new learning rate changes what the run means: allowed explicitly
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[2]["eval/kl_to_start"] > bound  # stopped after iteration 2
    assert json.loads((run_dir / "state.json").read_text()) == {"completed_iteration": 2, "checkpoint_iteration": 1}
    assert (run_dir / "checkpoints/iter-0001").is_dir() and not (run_dir / "checkpoints/iter-0002").exists()
    assert RunDirectory(run_dir).latest_checkpoint() == run_dir / "checkpoints/iter-0001"
    out = capsys.readouterr().out
    assert "guard: stopping after iteration 2: eval/kl_to_start rose to" in out
    assert "the run's model is checkpoints/iter-0001" in out


def test_every_text_run_records_the_collapse_metrics(tiny_model_dir, prompt_file, reference_file, tmp_path, one_thread):
    run_dir = tmp_path / "run"
    raft.run(raft.load_config("text", overrides=tiny_overrides(tiny_model_dir, prompt_file, run_dir, reference_file)
                              + ["kl.beta=0.05", "selection.diversity.max_similarity=0.6", "eval.best_of_n=4"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key in ["eval/kl_to_start", "eval/distinct_2", "eval/top_opening_share", "eval/perplexity"]:
            assert isinstance(row[key], float), key
    assert rows[0]["eval/kl_to_start"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["eval/best_of_n"] == 4 and isinstance(rows[0]["eval/best_of_n_reward"], float)
    best = {}
    candidates = (run_dir / "iterations/iter-0000/best_of_n_samples.jsonl").read_text().splitlines()
    for record in map(json.loads, candidates):
        best[record["prompt"]] = max(best.get(record["prompt"], -1), record["reward"])
    assert len(candidates) == 4 * len(best) == 4 * 4  # 4 held-out prompts x n
    assert rows[0]["eval/best_of_n_reward"] == pytest.approx(sum(best.values()) / len(best))
    assert rows[1]["kl/beta"] == 0.05 and isinstance(rows[2]["kl/policy_mean"], float)
    records = [json.loads(line) for line in (run_dir / "iterations/iter-0002/samples.jsonl").read_text().splitlines()]
    assert all(r["score"] == pytest.approx(r["reward"] - 0.05 * r["kl"]) for r in records)


# ---- reference replay


def test_replay_adds_the_lm_loss_on_reference_tokens_only(tiny_model_dir, one_thread):
    from raft.modalities.text.config import LoraConfig, ReplayConfig, TextFinetuneConfig, TextModelConfig
    from raft.modalities.text.model import load_policy
    from raft.modalities.text.sft import IGNORE, TextFineTuner

    def trained(replay: ReplayConfig, texts=()):
        policy = load_policy(TextModelConfig(name_or_path=str(tiny_model_dir)), LoraConfig(), None)
        finetuner = TextFineTuner(policy, TextFinetuneConfig(learning_rate=1e-2, batch_size=2, epochs=1, replay=replay),
                                  None, progress=False, replay_texts=texts)
        kept = [Sample(0, "the film", "was wonderful", reward=1.0), Sample(1, "a dull", "plot indeed", reward=1.0)]
        metrics = finetuner.finetune(kept, seed=3)
        return finetuner, metrics, torch.cat([p.detach().flatten() for p in policy.model.parameters()])

    text = CORPUS[0]
    finetuner, metrics, with_replay = trained(ReplayConfig(share=0.5, weight=1.0), [text])
    ids, labels = finetuner.replay[0]
    assert ids == finetuner.policy.tokenizer(text)["input_ids"]  # the text alone: no prompt, no chat template
    assert labels == [IGNORE] + ids[1:]  # every token of the text but the first carries the LM loss

    _, plain_metrics, plain = trained(ReplayConfig(share=0.0))
    _, _, weightless = trained(ReplayConfig(share=0.5, weight=0.0), [text])
    assert "train/replay_loss" in metrics and "train/replay_loss" not in plain_metrics
    assert torch.equal(weightless, plain)  # replay adds nothing but its own loss term
    assert not torch.allclose(with_replay, plain)


def test_replay_loss_is_the_mean_nll_of_the_text(tiny_model_dir):
    from raft.modalities.text.config import LoraConfig, ReplayConfig, TextFinetuneConfig, TextModelConfig
    from raft.modalities.text.model import load_policy
    from raft.modalities.text.sft import TextFineTuner

    policy = load_policy(TextModelConfig(name_or_path=str(tiny_model_dir)), LoraConfig(), None)
    finetuner = TextFineTuner(policy, TextFinetuneConfig(replay=ReplayConfig(share=1.0)), None, progress=False,
                              replay_texts=[CORPUS[1]])
    ids = finetuner.replay[0][0]
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([ids])).logits[0]
    expected = -torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).mean().item()
    assert finetuner.replay_loss(finetuner.replay, micro=1) == pytest.approx(expected, rel=1e-5)


# ---- bad values stop before anything loads


@pytest.mark.parametrize("modality, override, expected", [
    ("text", "kl.beta=-0.1", "kl.beta must be >= 0"),
    ("diffusion", "kl.adaptive=true", "kl.beta must be > 0 when kl.adaptive"),
    ("text", "selection.diversity.max_similarity=1.5", "selection.diversity.max_similarity must be in [0, 1]"),
    ("text", "selection.diversity.max_opening_share=0", "selection.diversity.max_opening_share must be in (0, 1]"),
    ("text", "selection.diversity.features=clip", "selection.diversity.features must be one of auto, ngram, embedding"),
    ("text", "guard.min_distinct_2_ratio=1.5", "guard.min_distinct_2_ratio must be in (0, 1]"),
    ("text", "guard.max_kl=-1", "guard.max_kl must be > 0"),
    ("text", "guard.min_diversity_ratio=0.8", "guard.min_diversity_ratio must be null: the text modality does not produce"),
    ("text", "finetune.replay.share=2", "finetune.replay.share must be in [0, 1]"),
    ("diffusion", "kl.beta=0.1", "kl.beta must be 0: the diffusion modality cannot compute reference log-likelihoods"),
    ("diffusion", "guard.max_kl=5", "guard.max_kl must be null: the diffusion modality does not produce eval/kl_to_start"),
    ("diffusion", "selection.diversity.max_opening_share=0.1", "max_opening_share must be null"),
])
def test_bad_defence_values_are_one_line(modality, override, expected):
    with pytest.raises(ConfigError) as error:
        raft.load_config(modality, overrides=[override])
    assert expected in str(error.value) and "\n" not in str(error.value)


# ---- diffusion: diversity through CLIP image embeddings, and the diversity guard


def test_diffusion_diversity_selection_and_guard(tiny_sd_dir, tiny_clip_dir, tmp_path, capsys, one_thread):
    from tiny_diffusion import tiny_diffusion_overrides

    run_dir = tmp_path / "run"
    overrides = tiny_diffusion_overrides(tiny_sd_dir, tiny_clip_dir, run_dir)[2:]  # past "--modality diffusion"
    # every pair of tiny-CLIP image embeddings is more alike than -1, so a bound of -1 passes every candidate over
    # but the first; the guard bound of 1.0 trips unless diversity rises
    config = raft.load_config("diffusion", overrides=overrides + [
        "selection.diversity.max_similarity=0.0", "guard.min_diversity_ratio=1.0", "iterations=3"])
    raft.run(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (run_dir / "iterations/iter-0001/samples.jsonl").read_text().splitlines()]
    kept = [r for r in records if r["selected"]]
    passed = [r for r in records if r.get("not_kept")]
    assert rows[1]["selection/passed_over"] == len(passed) >= 1
    assert all("similarity" in r["not_kept"] for r in passed)
    assert len(kept) + len(passed) <= len(records)
    assert "eval/diversity_within_prompt" in rows[0] and "eval/kl_to_start" not in rows[0]
    out = capsys.readouterr().out
    fell = [r for r in rows[1:] if r["eval/diversity_within_prompt"] < rows[0]["eval/diversity_within_prompt"]]
    if fell:  # the first iteration whose diversity fell is the last one run
        assert rows[-1] == fell[0] and "eval/diversity_within_prompt fell to" in out
    else:
        assert len(rows) == 4 and "guard:" not in out
