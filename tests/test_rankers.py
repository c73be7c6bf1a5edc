import math

import pytest
import torch

from raft.errors import RaftError
from raft.interface import Sample
from raft.modalities.text.config import TextRankerConfig
from raft.modalities.text.rankers import ClassifierRanker, LexiconRanker, build_ranker
from raft.rankers import CallableRanker, WeightedSum, check_scores, score_samples

from conftest import REWARDS


def samples_of(*texts):
    return [Sample(prompt_index=i, prompt=f"prompt {i}", output=t) for i, t in enumerate(texts)]


def test_vader_prefers_positive_text():
    samples = samples_of("What a wonderful, moving film. I loved it.", "A boring, awful mess.", "It is a film.")
    scores = LexiconRanker("vader").score(samples)
    assert scores[0] > 0.5 > scores[2] > scores[1]
    assert scores[2] == 0.0


def test_callable_from_file_and_module():
    samples = samples_of("aaaa", "xyz")
    by_path = CallableRanker(f"{REWARDS}:vowel_share")
    assert by_path.score(samples) == [1.0, 0.0]
    by_module = CallableRanker("raft.metrics:distinct_n")  # importable, but not a ranker signature
    with pytest.raises(RaftError, match="ranker 'raft.metrics:distinct_n' raised TypeError"):
        score_samples(by_module, samples)


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "must look like module:function"),
    ("raft.nothing_here:f", "cannot import 'raft.nothing_here'"),
    ("raft.metrics:missing", "has no callable 'missing'"),
    ("/no/such/file.py:f", "does not exist"),
])
def test_callable_spec_errors(spec, message):
    with pytest.raises(RaftError, match=message):
        CallableRanker(spec)


def test_weighted_sum_keeps_each_part():
    samples = samples_of("a lovely film", "a hateful film")
    combined = WeightedSum([(LexiconRanker("vader"), 2.0), (CallableRanker(f"{REWARDS}:vowel_share", "vowels"), -1.0)])
    score_samples(combined, samples)
    for s in samples:
        assert s.reward == pytest.approx(2.0 * s.rewards["vader"] - 1.0 * s.rewards["vowels"])
    assert samples[0].reward > samples[1].reward


def test_build_ranker_combines_only_when_needed():
    single = build_ranker([TextRankerConfig()], torch.device("cpu"))
    assert isinstance(single, LexiconRanker)
    double = build_ranker([TextRankerConfig(), TextRankerConfig(kind="callable", function=f"{REWARDS}:vowel_share")],
                          torch.device("cpu"))
    assert isinstance(double, WeightedSum) and len(double.parts) == 2


def test_bad_scores_are_named():
    with pytest.raises(RaftError, match="ranker 'r' returned 1 scores for 2 samples"):
        check_scores("r", [1.0], 2)
    with pytest.raises(RaftError, match="NaN or infinite scores for 1 of 2"):
        check_scores("r", [1.0, math.nan], 2)
    with pytest.raises(RaftError, match="not a list of numbers"):
        check_scores("r", ["high", "low"], 2)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=2,
                         id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("classifier")
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_classifier_label_by_name_index_and_probability(classifier_dir):
    samples = samples_of("a wonderful film", "an awful film", "the music")
    cpu = torch.device("cpu")
    by_name = ClassifierRanker(TextRankerConfig(kind="classifier", model=str(classifier_dir), label="positive"), cpu)
    by_index = ClassifierRanker(TextRankerConfig(kind="classifier", model=str(classifier_dir), label=1, batch_size=2), cpu)
    assert by_name.score(samples) == pytest.approx(by_index.score(samples), abs=1e-5)  # batching changes nothing
    negative = ClassifierRanker(TextRankerConfig(kind="classifier", model=str(classifier_dir), label=0,
                                                 output="probability"), cpu)
    positive = ClassifierRanker(TextRankerConfig(kind="classifier", model=str(classifier_dir), label=1,
                                                 output="probability"), cpu)
    for p, n in zip(positive.score(samples), negative.score(samples)):
        assert p + n == pytest.approx(1.0, abs=1e-5)
    paired = ClassifierRanker(TextRankerConfig(kind="classifier", model=str(classifier_dir), label=1,
                                               input="prompt_and_response"), cpu)
    assert paired.score(samples) != pytest.approx(by_name.score(samples))


def test_classifier_errors(classifier_dir):
    cpu = torch.device("cpu")
    with pytest.raises(RaftError, match="has 2 labels .*set its label"):
        ClassifierRanker(TextRankerConfig(kind="classifier", model=str(classifier_dir)), cpu)
    with pytest.raises(RaftError, match="no label 'happy'"):
        ClassifierRanker(TextRankerConfig(kind="classifier", model=str(classifier_dir), label="happy"), cpu)
    with pytest.raises(RaftError, match="cannot load"):
        ClassifierRanker(TextRankerConfig(kind="classifier", model="/no/such/model"), cpu)
