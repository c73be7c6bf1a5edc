"""`raft train-rm` (WARM) on a tiny causal LM built from a config: two members from one init, their weight average
saved as a sequence-classification folder that the text classifier ranker loads; one-line errors for bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from raft.cli import main
from raft.config import load_config
from raft.errors import RaftError
from raft.interface import Sample
from raft.modalities.text.config import TextRankerConfig
from raft.modalities.text.rankers import build_ranker
from raft.warm import TrainRMConfig, average_weights, load_pairs, train_rm

GOOD = ["the film was wonderful and moving", "i loved the bright happy ending", "an excellent and funny film"]
BAD = ["this movie is terrible and boring", "a dull plot and awful script", "bad acting, far too long"]


def write_pairs(path, n=48):
    rows = [{"prompt": f"review {i}:", "chosen": GOOD[i % 3], "rejected": BAD[(i + 1) % 3]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_two_members_are_averaged_into_a_classifier_ranker(tiny_model_dir, tmp_path, one_thread):
    pairs, out = write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "rm"
    config = load_config(TrainRMConfig, None, [f"base={tiny_model_dir}", f"data={pairs}", f"out={out}", "members=2",
                                               "eval_size=12", "batch_size=8", "epochs=3", "learning_rate=3e-3",
                                               "save_members=true", "max_length=32"])
    report = train_rm(config)

    members = [load_file(str(out / "members" / str(i) / "model.safetensors")) for i in range(2)]
    averaged = load_file(str(out / "model.safetensors"))
    assert set(averaged) == set(members[0])
    differing = [k for k in averaged if not torch.equal(members[0][k], members[1][k])]
    assert differing, "the two members (seeds 0 and 1) trained to the same weights"
    for key in averaged:
        assert torch.allclose(averaged[key], (members[0][key] + members[1][key]) / 2, atol=1e-6), key
    assert average_weights(members)[differing[0]].equal(averaged[differing[0]])

    assert [m["seed"] for m in report["members"]] == [0, 1] and report["train_pairs"] == 36
    assert report["members"][0]["losses"][-1] < report["members"][0]["losses"][0]
    saved = json.loads((out / "warm.json").read_text())
    assert set(saved) >= {"members", "ensemble_accuracy", "warm_accuracy", "init_accuracy"}
    assert report["warm_accuracy"] > 0.9  # the pairs are easy: good words vs bad words

    ranker = build_ranker([TextRankerConfig(kind="classifier", model=str(out), input="prompt_and_response")],
                          torch.device("cpu"))
    scores = ranker.score([Sample(0, "review 1:", GOOD[0]), Sample(0, "review 1:", BAD[0])])
    assert len(scores) == 2 and all(torch.isfinite(torch.tensor(scores)))
    assert scores[0] > scores[1]


def test_export_style_folder_and_conversational_pairs(tmp_path):
    import datasets

    rows = [{"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}], "margin": 1.0}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "export" / "arrow"))
    pairs = load_pairs(str(tmp_path / "export"), TrainRMConfig(), "data")
    assert pairs == [{"prompt": "p", "chosen": "yes", "rejected": "no"}]


@pytest.mark.parametrize("setting, message", [
    ("members=0", "members must be >= 1"),
    ("data=MISSING", "data: no such file or folder"),
    ("data=NOT_A_DATASET", "data: '.*' is not a dataset"),
    ("data=NO_COLUMN", "data: '.*' has no column 'rejected' .*set rejected_field"),
    ("data=TEXT_FILE", "is not a dataset file"),
    ("learning_rates=[0.1]", "learning_rates must be empty or list one rate per member"),
])
def test_bad_input_is_one_line(tmp_path, capsys, setting, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "answer": "b"}) + "\n")
    (tmp_path / "pairs.txt").write_text("a\n")
    paths = {"MISSING": tmp_path / "absent", "NOT_A_DATASET": tmp_path / "empty", "NO_COLUMN": tmp_path / "pairs.jsonl",
             "TEXT_FILE": tmp_path / "pairs.txt"}
    for name, path in paths.items():
        setting = setting.replace(name, str(path))
    data = [] if setting.startswith("data=") else [f"data={tmp_path / 'pairs.jsonl'}"]
    assert main(["train-rm", *data, setting, f"out={tmp_path / 'out'}", "base=/nonexistent/base"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re

    assert re.search(message, err), err


def test_image_pairs_are_refused_in_one_line(tmp_path):
    import datasets
    from PIL import Image

    rows = [{"prompt": "p", "chosen": Image.new("RGB", (4, 4)), "rejected": Image.new("RGB", (4, 4), (9, 9, 9))}]
    features = datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Image(), "rejected": datasets.Image()})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "images" / "arrow"))
    with pytest.raises(RaftError, match="holds image pairs; train-rm trains text reward models"):
        load_pairs(str(tmp_path / "images"), TrainRMConfig(), "data")


def test_help_lists_every_setting(capsys):
    assert main(["train-rm", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: raft train-rm" in out and "members (default 4, >= 1)" in out and "eval_data (default null)" in out
