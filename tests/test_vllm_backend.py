"""generation.backend vllm: the policy sampled by a vLLM engine, its weights synced into the engine each iteration.

vLLM needs a GPU, so these tests run against a fake `vllm` module put in sys.modules: its LLM holds a real tiny
causal LM, loads the weights raft pushes (or the LoRA adapter folder it names) and samples from what it holds. A
sync that pushed nothing, or pushed the wrong weights, shows up in what it samples and in its own weights."""

import copy
import json
import sys
import types

import pytest
import torch

import raft
from raft.errors import ConfigError, RaftError
from raft.modalities.text.config import TextFinetuneConfig, TextGenerationConfig
from raft.modalities.text.model import load_policy
from raft.modalities.text.sampler import TextSampler
from raft.modalities.text.sft import TextFineTuner
from raft.modalities.text.vllm_policy import PolicyEngine, VLLMPolicySampler, start_policy_engine, weights_checksum

from conftest import tiny_overrides

PROMPTS = ["the film", "a dull plot and bad acting all along", "i loved the music"]


# ---- the fake vllm module: LLM, SamplingParams, LoRARequest


class FakeModel(torch.nn.Module):
    """The engine's model as raft reaches it through apply_model: parameters, and load_weights taking
    (Hugging Face name, tensor) pairs, copied and cast into its own tensors as vLLM's loaders do."""

    def __init__(self, hf):
        super().__init__()
        self.hf, self.loads = hf, 0

    def load_weights(self, weights):
        self.loads += 1
        own = dict(self.hf.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                own[name].copy_(tensor)


class FakeLLM:
    def __init__(self, model, seed=0, dtype="float32", enable_lora=False, max_lora_rank=None, **kwargs):
        from transformers import AutoModelForCausalLM

        self.args = dict(model=model, seed=seed, dtype=dtype, enable_lora=enable_lora, max_lora_rank=max_lora_rank,
                         **kwargs)
        self.model = FakeModel(AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval())
        self.adapters, self.lora_requests, self.last_outputs = {}, [], []

    def apply_model(self, function):
        return [function(self.model)]  # one worker

    def _adapted(self, request):
        """The base model with the request's adapter, loaded once per id (vLLM caches adapters by id too)."""
        import peft

        if request.lora_int_id not in self.adapters:
            self.adapters[request.lora_int_id] = peft.PeftModel.from_pretrained(
                copy.deepcopy(self.model.hf), request.lora_path).eval()
        return self.adapters[request.lora_int_id]

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True, lora_request=None):
        if lora_request is not None:
            self.lora_requests.append(lora_request)
        model = self.model.hf if lora_request is None else self._adapted(lora_request)
        outputs = []
        for prompt, params in zip(prompts, sampling_params):
            ids = torch.tensor([prompt["prompt_token_ids"]]).repeat(params.n, 1)
            torch.manual_seed(params.seed)
            greedy = params.temperature == 0
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=not greedy,
                                 temperature=None if greedy else params.temperature, top_p=None, top_k=None,
                                 max_new_tokens=params.max_tokens, eos_token_id=params.stop_token_ids,
                                 pad_token_id=params.stop_token_ids[0])
            completions = []
            for row in out[:, ids.shape[1]:].tolist():
                end = next((j for j, t in enumerate(row) if t in params.stop_token_ids), None)
                completions.append(types.SimpleNamespace(
                    token_ids=row if end is None else row[: end + 1], text="<engine text>",
                    finish_reason="length" if end is None else "stop",
                    stop_reason=None if end is None else row[end]))
            outputs.append(types.SimpleNamespace(outputs=completions))
        self.last_outputs = outputs
        return outputs


class FakeSamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=16, seed=None, stop_token_ids=None,
                 **rest):
        self.n, self.temperature, self.top_p, self.top_k = n, temperature, top_p, top_k
        self.max_tokens, self.seed, self.stop_token_ids, self.rest = max_tokens, seed, stop_token_ids or [], rest


class FakeLoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.LoRARequest = FakeLLM, FakeSamplingParams, FakeLoRARequest
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def config_of(tiny_model_dir, *overrides):
    return raft.load_config("text", overrides=[f"model.name_or_path={tiny_model_dir}", "model.device=cpu",
                                               "model.chat_template=true", "generation.backend=vllm",
                                               "generation.max_new_tokens=8", *overrides])


def engine_and_policy(config):
    engine = start_policy_engine(config)
    policy = load_policy(config.model, config.finetune.lora, None, seed=config.seed)
    return engine, policy


def engine_weights(engine):
    return dict(engine.llm.model.hf.named_parameters())


def perturb(parameters, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


# ---- full fine-tuning: the state dict is pushed


def test_finetuned_weights_are_pushed_checked_and_recorded(fake_vllm, tiny_model_dir, one_thread):
    config = config_of(tiny_model_dir, "generation.temperature=0")
    engine, policy = engine_and_policy(config)
    assert engine.llm.args["dtype"] == "float32" and engine.dtype == torch.float32
    sampler = VLLMPolicySampler(engine, policy, config.generation, progress=False)

    first = sampler.generate(PROMPTS, 2, seed=0)
    assert {s.meta["weights_version"] for s in first} == {1}
    assert first[0].meta["weights_checksum"] == pytest.approx(weights_checksum(policy.model.parameters()), rel=1e-9)

    # fine-tune the policy on its samples: the engine's copy is stale until the next generate() pushes
    tuner = TextFineTuner(policy, TextFinetuneConfig(learning_rate=5e-2, epochs=2, batch_size=2), None, progress=False)
    tuner.finetune(first, seed=0)
    policy.model.eval()
    stale = engine_weights(engine)["model.layers.0.mlp.up_proj.weight"].clone()
    assert not torch.equal(stale, dict(policy.model.named_parameters())["model.layers.0.mlp.up_proj.weight"])

    second = sampler.generate(PROMPTS, 2, seed=0)
    assert {s.meta["weights_version"] for s in second} == {2}
    for name, p in policy.model.named_parameters():  # the engine holds the fine-tuned weights, every one
        assert torch.equal(engine_weights(engine)[name], p), name
    checksum = weights_checksum(policy.model.parameters())
    assert second[0].meta["weights_checksum"] == pytest.approx(checksum, rel=1e-9)
    assert engine.checksum() == pytest.approx(checksum, rel=1e-9)
    assert second[0].meta["weights_checksum"] != pytest.approx(first[0].meta["weights_checksum"], rel=1e-9)

    # and so it samples the fine-tuned policy: greedy, the same tokens as the hf sampler of the policy
    hf = TextSampler(policy, TextGenerationConfig(temperature=0, max_new_tokens=8, share_prompt_prefill=False),
                     progress=False).generate(PROMPTS, 1, seed=0)
    assert [s.meta["token_ids"] for s in second[::2]] == [s.meta["token_ids"] for s in hf]
    assert [s.output for s in second[::2]] == [s.output for s in hf]


def test_unchanged_weights_are_not_pushed_again(fake_vllm, tiny_model_dir):
    config = config_of(tiny_model_dir)
    engine, policy = engine_and_policy(config)
    sampler = VLLMPolicySampler(engine, policy, config.generation, progress=False)
    sampler.generate(PROMPTS, 2, seed=0)
    sampler.generate(PROMPTS, 2, seed=1)
    assert engine.llm.model.loads == 1 and sampler.version == 1
    perturb(policy.model.parameters(), seed=1)
    samples = sampler.generate(PROMPTS, 2, seed=2)
    assert engine.llm.model.loads == 2 and {s.meta["weights_version"] for s in samples} == {2}
    with torch.no_grad():  # the smallest change a small learning rate makes: one weight, a few ulps
        weight = policy.model.model.layers[1].mlp.down_proj.weight
        weight[0, 0] = torch.nextafter(torch.nextafter(weight[0, 0], torch.tensor(1.0)), torch.tensor(1.0))
    sampler.generate(PROMPTS, 1, seed=3)
    assert engine.llm.model.loads == 3 and sampler.version == 3
    assert torch.equal(engine_weights(engine)["model.layers.1.mlp.down_proj.weight"], weight)


def test_a_sync_that_does_not_reach_the_engine_stops_the_run(fake_vllm, tiny_model_dir, monkeypatch):
    config = config_of(tiny_model_dir)
    engine, policy = engine_and_policy(config)
    sampler = VLLMPolicySampler(engine, policy, config.generation, progress=False)
    sampler.generate(PROMPTS, 1, seed=0)
    monkeypatch.setattr(PolicyEngine, "load_weights", lambda self, named: None)  # a push that pushes nothing
    perturb(policy.model.parameters(), seed=2)
    with pytest.raises(RaftError, match="the engine does not hold the policy's weights after sync 2") as caught:
        sampler.generate(PROMPTS, 1, seed=1)
    assert "\n" not in str(caught.value)


# ---- LoRA: the adapter is saved and passed as a new LoRARequest


def test_lora_adapter_goes_to_the_engine_as_a_new_request_per_version(fake_vllm, tiny_model_dir, one_thread):
    config = config_of(tiny_model_dir, "generation.temperature=0", "finetune.lora.enabled=true", "finetune.lora.r=4")
    engine, policy = engine_and_policy(config)
    assert engine.llm.args["enable_lora"] is True and engine.llm.args["max_lora_rank"] == 8
    sampler = VLLMPolicySampler(engine, policy, config.generation, progress=False)
    first = sampler.generate(PROMPTS, 1, seed=0)
    adapter = [p for name, p in policy.model.named_parameters() if "lora_B" in name]
    perturb(adapter, seed=3)  # B starts at zero: the adapter now changes the model's outputs
    second = sampler.generate(PROMPTS, 1, seed=0)
    sampler.generate(PROMPTS, 1, seed=1)  # unchanged: the same request again

    requests = engine.llm.lora_requests
    assert [r.lora_int_id for r in requests] == [1, 2, 2] and requests[0].lora_path != requests[1].lora_path
    assert [s.meta["weights_version"] for s in first + second] == [1] * 3 + [2] * 3
    loaded = engine.llm.adapters[2]  # what the engine loaded from the folder it was given
    lora_sum = weights_checksum(p for name, p in loaded.named_parameters() if "lora_" in name)
    assert second[0].meta["weights_checksum"] == pytest.approx(lora_sum, rel=1e-9)
    assert engine.llm.model.loads == 0  # base weights never pushed under LoRA
    hf = TextSampler(policy, TextGenerationConfig(temperature=0, max_new_tokens=8, share_prompt_prefill=False),
                     progress=False).generate(PROMPTS, 1, seed=0)
    assert [s.meta["token_ids"] for s in second] == [s.meta["token_ids"] for s in hf]


# ---- token ids: as the engine sampled them, what fine-tuning trains on


def test_sampled_token_ids_are_recorded_and_trained_on(fake_vllm, tiny_model_dir):
    config = config_of(tiny_model_dir)
    engine, policy = engine_and_policy(config)
    samples = VLLMPolicySampler(engine, policy, config.generation, progress=False).generate(PROMPTS, 2, seed=4)
    drawn = [c.token_ids for output in engine.llm.last_outputs for c in output.outputs]
    assert [s.meta["token_ids"] for s in samples] == drawn
    assert all(s.meta["generator"] == "policy" and s.meta["settings"]["backend"] == "vllm" for s in samples)
    assert all("logprob" not in s.meta for s in samples)  # ranking recomputes the policy's side with transformers
    tuner = TextFineTuner(policy, TextFinetuneConfig(), None, progress=False)
    for sample in samples:
        ids, labels = tuner.example(sample)
        assert [t for t in labels if t != -100] == sample.meta["token_ids"]
        assert sample.output == policy.tokenizer.decode(
            [t for t in sample.meta["token_ids"] if t not in policy.eos_ids], skip_special_tokens=True).strip()


def test_a_run_records_the_weights_version_of_every_sample(fake_vllm, tiny_model_dir, prompt_file, tmp_path,
                                                           one_thread):
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run") + ["generation.backend=vllm"]
    run_dir = raft.run(raft.load_config("text", overrides=overrides))
    rows = {i: [json.loads(line) for line in (run_dir / f"iterations/iter-000{i}/samples.jsonl").open()]
            for i in (1, 2)}
    assert {r["weights_version"] for r in rows[1]} == {1} and {r["weights_version"] for r in rows[2]} == {2}
    assert rows[1][0]["weights_checksum"] != rows[2][0]["weights_checksum"]
    assert all(r["settings"]["backend"] == "vllm" and r["token_ids"] for r in rows[1] + rows[2])


# ---- config


def test_backend_vllm_without_vllm_is_one_line_before_the_policy_loads(tiny_model_dir, prompt_file, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    import raft.modalities.text as text

    def no_policy(*args, **kwargs):
        raise AssertionError("the policy was loaded before vllm was found missing")

    monkeypatch.setattr(text, "load_policy", no_policy)
    config = raft.load_config("text", overrides=tiny_overrides(tiny_model_dir, prompt_file, tmp_path / "run")
                              + ["generation.backend=vllm"])
    with pytest.raises(RaftError) as caught:
        text.TextModality().build(config, None)
    assert str(caught.value) == ("generation.backend vllm needs the vllm package, which is not installed "
                                 "(on a CUDA machine: pip install 'raft-align[vllm]')")


@pytest.mark.parametrize("overrides, message", [
    (["generation.backend=sglang"], "generation.backend must be one of hf, vllm"),
    (["generation.backend=vllm", "model.gguf_file=m.gguf"], "generation.backend vllm loads the model's safetensors"),
    (["generation.backend=vllm", "generators=[{kind: file, path: a.jsonl}]"],
     "generation.backend vllm samples the policy, but no generators entry is of kind policy"),
])
def test_bad_backend_settings_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as caught:
        raft.load_config("text", overrides=overrides)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_backend_defaults_to_hf():
    config = raft.load_config("text")
    assert config.generation.backend == "hf" and config.generation.vllm_args == {}
