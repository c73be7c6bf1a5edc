"""Text rankers: sentiment lexicons (offline) and Hugging Face sequence-classification reward models."""

from __future__ import annotations

import torch

from raft.errors import RaftError
from raft.interface import Ranker, Sample
from raft.modalities.text.config import TextRankerConfig
from raft.rankers import CallableRanker, combine


class LexiconRanker(Ranker):
    """Sentiment of the response from a lexicon: VADER compound, TextBlob polarity or AFINN score per word."""

    def __init__(self, lexicon: str = "vader", name: str | None = None):
        self.name = name or lexicon
        try:
            if lexicon == "vader":
                from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

                analyzer = SentimentIntensityAnalyzer()
                self.fn = lambda text: analyzer.polarity_scores(text)["compound"]
            elif lexicon == "textblob":
                from textblob import TextBlob

                self.fn = lambda text: TextBlob(text).sentiment.polarity
            elif lexicon == "afinn":
                from afinn import Afinn

                afinn = Afinn()
                self.fn = lambda text: afinn.score(text) / max(1, len(text.split()))
            else:
                raise RaftError(f"unknown lexicon '{lexicon}' (vader, textblob, afinn)")
        except ImportError as error:
            raise RaftError(f"lexicon '{lexicon}' needs a package that is not installed ({error.name})") from None

    def score(self, samples: list[Sample]) -> list[float]:
        return [self.fn(s.output) for s in samples]


class ClassifierRanker(Ranker):
    """A sequence-classification model's logit (or probability) of one label, e.g. a reward model."""

    def __init__(self, config: TextRankerConfig, device: torch.device):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = config.name or f"classifier:{config.model}"
        self.config, self.device = config, device
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                config.model, trust_remote_code=config.trust_remote_code).to(device).eval()
        except (OSError, ValueError) as error:
            raise RaftError(f"ranker '{self.name}': cannot load '{config.model}': {str(error).splitlines()[0]}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label_index = self._label_index(config.label)

    def _label_index(self, label) -> int:
        labels = self.model.config.num_labels
        if label is None:
            if labels != 1:
                names = ", ".join(f"{i}={n}" for i, n in self.model.config.id2label.items())
                raise RaftError(f"ranker '{self.name}': the model has {labels} labels ({names}); set its label")
            return 0
        if isinstance(label, int):
            if not 0 <= label < labels:
                raise RaftError(f"ranker '{self.name}': label {label} is out of range (the model has {labels})")
            return label
        by_name = {str(n).lower(): int(i) for i, n in self.model.config.id2label.items()}
        if label.lower() not in by_name:
            raise RaftError(f"ranker '{self.name}': no label '{label}' (labels: {', '.join(by_name)})")
        return by_name[label.lower()]

    @torch.no_grad()
    def score(self, samples: list[Sample]) -> list[float]:
        scores = []
        size = self.config.batch_size
        for start in range(0, len(samples), size):
            batch = samples[start : start + size]
            responses = [s.output for s in batch]
            pair = [s.prompt for s in batch] if self.config.input == "prompt_and_response" else None
            inputs = self.tokenizer(*([pair, responses] if pair else [responses]), padding=True, truncation=True,
                                    max_length=self.config.max_length, return_tensors="pt").to(self.device)
            logits = self.model(**inputs).logits.float()
            if self.config.output == "probability":
                logits = logits.softmax(-1)
            scores += logits[:, self.label_index].tolist()
        return scores


def build_ranker(configs: list[TextRankerConfig], device: torch.device) -> Ranker:
    """One ranker, or their weighted sum when several are configured (or one has a weight other than 1)."""
    rankers = []
    for config in configs:
        if config.kind == "lexicon":
            ranker = LexiconRanker(config.lexicon, config.name)
        elif config.kind == "classifier":
            ranker = ClassifierRanker(config, device)
        else:
            ranker = CallableRanker(config.function, config.name)
        rankers.append((ranker, config.weight))
    return combine(rankers)
