"""Shared fixtures: a tiny causal LM built from a config (with its own small BPE tokenizer), prompt files,
and the overrides that make a full RAFT run take seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub download fails fast instead of hanging
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).parent
REWARDS = TESTS / "rewards.py"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "the film was a wonderful and moving story with great actors",
    "this movie is terrible, boring and far too long",
    "i loved the music and the bright happy ending",
    "a dull plot, bad acting and an awful script",
    "an excellent, beautiful and funny film for the whole family",
    "the director makes a good case for a sequel",
]


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot (10x seen) when other processes share
    the cores; tests that train one for many steps use this."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.txt"
    path.write_text("\n".join(f"review {i}: {CORPUS[i % len(CORPUS)]}" for i in range(40)) + "\n")
    return path


@pytest.fixture(scope="session")
def reference_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "references.jsonl"
    import json

    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return path


def tiny_overrides(model_dir: Path, prompts: Path, run_dir: Path, references: Path | None = None) -> list[str]:
    """A full RAFT run on the tiny model in seconds; the reward is the share of vowels (any reward would do).

    Selection is local (best of each prompt) and no best-of-n is measured before training, what the loop's tests
    count on; the other defaults are the defended ones (tests/test_defences.py checks what they do)."""
    return [
        f"model.name_or_path={model_dir}",
        f"run_dir={run_dir}",
        f"data.prompts={prompts}",
        "data.prompt_template={prompt}",
        "model.chat_template=true",  # the tiny tokenizer's ChatML template, so the chat path is what the tests run
        "data.eval_size=4",
        f"data.reference_texts={references if references else 'null'}",
        "iterations=2",
        "prompts_per_iteration=3",
        "samples_per_prompt=3",
        "generation.max_new_tokens=6",
        "finetune.batch_size=2",
        "finetune.learning_rate=1e-3",
        "eval.samples_per_prompt=2",
        "discard.min_words=0",
        "discard.max_repeated_ngram_fraction=null",
        "discard.patterns=[]",
        "selection.strategy=local",
        "eval.best_of_n=0",
        "rankers.0.kind=callable",
        f"rankers.0.function={REWARDS}:vowel_share",
        # full precision throughout, so the figures do not depend on the CPU's bf16 support (the bf16 copy and
        # autocast have their own tests: test_inference_dtype.py, test_trainer.py)
        "model.inference_dtype=model",
        "finetune.mixed_precision=no",
        "eval_every=1",  # the loop's tests read every iteration's held-out figures
        "eval.perplexity_every=null",  # perplexity too (test_loop.py tests its schedule)
    ]


# ---- diffusion: tiny Stable Diffusion and CLIP models built from configs (tests/tiny_diffusion.py)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from tiny_diffusion import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from tiny_diffusion import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
