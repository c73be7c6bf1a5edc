"""The diffusion benchmarks on the tiny models: raft's in-loop sampler and a direct diffusers call draw the same
images from the same seeds (the speed ratio compares like with like)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sampling_speed_benchmark_compares_identical_images(tiny_sd_dir, tiny_clip_dir, capsys, one_thread):
    bench = load_benchmark("diffusion_sampling_speed")
    code = bench.main(["--prompts", "2", "--k", "2", "--rounds", "1", f"model.name_or_path={tiny_sd_dir}",
                       f"rankers.0.model={tiny_clip_dir}", "generation.num_inference_steps=2",
                       "generation.batch_size=3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "max pixel difference raft vs direct: 0 " in out
    assert "x the direct pipeline's speed" in out


def test_max_pixel_diff_sees_a_changed_pixel():
    bench = load_benchmark("diffusion_sampling_speed")
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[1, 2, 0] = 7
    assert bench.max_pixel_diff([Image.fromarray(a)], [Image.fromarray(a)]) == 0
    assert bench.max_pixel_diff([Image.fromarray(a), Image.fromarray(a)], [Image.fromarray(a), Image.fromarray(b)]) == 7



def test_seed_spread_reuses_given_start_means(tiny_sd_dir, tiny_clip_dir, tmp_path, capsys, one_thread):
    import json

    import raft
    from raft.loop import run
    from tiny_diffusion import tiny_diffusion_overrides

    overrides = tiny_diffusion_overrides(tiny_sd_dir, tiny_clip_dir, tmp_path / "run")[2:]  # without --modality
    run(raft.load_config("diffusion", None, overrides + ["iterations=1"]))
    bench = load_benchmark("diffusion_seed_spread")
    capsys.readouterr()
    assert bench.main([str(tmp_path / "run"), "--seeds", "2", "--start-means", "11.5", "12.5"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("\n{") + 1 :])
    assert report["start_seed_means"] == [11.5, 12.5]  # given, not redrawn
    assert "start policy" not in out and len(report["end_seed_means"]) == 2
    with pytest.raises(SystemExit):  # one mean per seed
        bench.main([str(tmp_path / "run"), "--seeds", "2", "--start-means", "11.5"])


def test_composition_benchmark_checks_each_held_out_image_by_rule(tmp_path, capsys):
    """Two iterations of a run directory's held-out images: drawn by the world (they pass) or black (they fail)."""
    import json

    from raft.modalities.diffusion import world

    rng = np.random.default_rng(0)
    captions = ["a red circle above a blue square", "a green triangle to the left of a white circle"]
    for iteration, drawn in ((0, 1), (1, 2)):
        folder = tmp_path / "iterations" / f"iter-{iteration:04d}"
        (folder / "images").mkdir(parents=True)
        lines = []
        for n, caption in enumerate(captions):
            image = world.draw(world.parse(caption), rng) if n < drawn else Image.new("RGB", (32, 32))
            image.save(folder / "images" / f"eval-{n}.png")
            lines.append(json.dumps({"prompt": caption, "output": f"images/eval-{n}.png", "reward": 50.0 + n,
                                     "rewards": None}))
        (folder / "eval_samples.jsonl").write_text("\n".join(lines) + "\n")
    assert load_benchmark("diffusion_composition").main([str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == [["0", "2", "50.500", "50.50", "50.0%", "50.0%", "50.0%"],
                    ["1", "2", "50.500", "50.50", "100.0%", "100.0%", "100.0%"]]
    assert load_benchmark("diffusion_composition").main([str(tmp_path / "absent")]) == 1
