"""The demos in a real headless Chromium (Playwright) against the apps served on 127.0.0.1, on tiny runs: a message
gets a reply and a reward in both panes, an over-long one gets a clear message and the app keeps serving, a prompt
gets two images and their rewards. Each browser test saves a screenshot in its tmp dir."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import raft
from conftest import tiny_overrides

pytest.importorskip("gradio", reason="the demos need gradio (pip install 'raft-align[demo]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (pip install playwright)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (scripts/setup.sh installs the "
                                    "Debian package 'chromium'; never `playwright install`)")
REPLY_TIMEOUT_MS = 180_000  # generation on a loaded 2-core machine
REWARD = re.compile(r"reward -?\d+\.\d{3}")
MAX_INPUT_CHARS = 80


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def lora_text_run(tiny_model_dir, prompt_file, tmp_path_factory) -> Path:
    """One RAFT iteration of the tiny Llama with a LoRA adapter: the aligned model is a peft checkpoint."""
    overrides = tiny_overrides(tiny_model_dir, prompt_file, tmp_path_factory.mktemp("chat") / "run") + [
        "iterations=1", "finetune.lora.enabled=true", "finetune.lora.r=4"]
    return raft.run(raft.load_config("text", overrides=overrides))


@pytest.fixture(scope="module")
def chat_app(lora_text_run):
    from raft.demos.chat import launch

    app = launch(str(lora_text_run), max_input_chars=MAX_INPUT_CHARS, max_new_tokens=8, block=False,
                 trust_run_code=True)  # its ranker is a function in tests/rewards.py
    yield app
    app.close()


@pytest.fixture(scope="module")
def diffusion_run(tiny_sd_dir, tiny_clip_dir, tmp_path_factory) -> Path:
    from tiny_diffusion import tiny_diffusion_overrides

    overrides = tiny_diffusion_overrides(tiny_sd_dir, tiny_clip_dir, tmp_path_factory.mktemp("image") / "run")
    overrides = [o for o in overrides if o not in ("--modality", "diffusion")] + ["iterations=1"]
    return raft.run(raft.load_config("diffusion", overrides=overrides))


@pytest.fixture(scope="module")
def image_app(diffusion_run):
    from raft.demos.image import launch

    app = launch(str(diffusion_run), max_prompt_chars=40, max_steps=5, block=False)
    yield app
    app.close()


def send(page, message: str) -> None:
    box = page.locator("#message textarea")
    box.fill(message)
    box.press("Enter")


def screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000


@needs_chromium
def test_chat_message_gets_a_reply_and_a_reward_from_both_models(browser, chat_app, tmp_path):
    page = browser.new_page()
    page.goto(chat_app.local_url)
    send(page, "the film was wonderful")
    for side in ("base", "aligned"):
        sync_api.expect(page.locator(f"#{side}-reward")).to_contain_text(REWARD, timeout=REPLY_TIMEOUT_MS)
        pane = page.locator(f"#{side}-chat")
        sync_api.expect(pane.locator('[data-testid="user"]')).to_have_text("the film was wonderful")
        reply = pane.locator('[data-testid="bot"]')
        sync_api.expect(reply).to_have_count(1)
        assert reply.inner_text().strip()
        value = float(REWARD.search(page.locator(f"#{side}-reward").inner_text()).group(0).split()[1])
        assert 0 <= value <= 1  # the run's ranker: the share of vowels
    assert page.locator("#status").inner_text().strip() == ""
    screenshot(page, tmp_path / "chat.png")


@needs_chromium
def test_chat_refuses_an_overlong_message_clearly_and_keeps_serving(browser, chat_app, tmp_path):
    page = browser.new_page()
    page.goto(chat_app.local_url)
    send(page, "a" * 200)
    message = f"Message too long: 200 characters, the limit is {MAX_INPUT_CHARS}"
    sync_api.expect(page.locator("#status")).to_contain_text(message, timeout=30_000)
    sync_api.expect(page.locator(".toast-body")).to_contain_text(message)  # gr.Warning's toast
    assert page.locator('[data-testid="bot"]').count() == 0  # nothing was generated
    screenshot(page, tmp_path / "too-long.png")

    send(page, "i loved the music")
    for side in ("base", "aligned"):
        sync_api.expect(page.locator(f"#{side}-reward")).to_contain_text(REWARD, timeout=REPLY_TIMEOUT_MS)
        sync_api.expect(page.locator(f"#{side}-chat [data-testid='bot']")).to_have_count(1)
    sync_api.expect(page.locator("#status")).to_have_text("")
    screenshot(page, tmp_path / "after.png")


@needs_chromium
def test_image_prompt_gets_base_and_aligned_images_with_rewards(browser, image_app, diffusion_run, tmp_path):
    page = browser.new_page()
    page.goto(image_app.local_url)
    prompt = page.locator("#prompt textarea")
    prompt.fill("a red circle above a blue square and a green triangle")  # 53 characters, limit 40
    page.locator("#generate").click()
    sync_api.expect(page.locator("#status")).to_contain_text("Prompt too long: 53 characters, the limit is 40",
                                                             timeout=30_000)

    prompt.fill("a red circle above a blue square")
    page.locator("#generate").click()
    for side in ("base", "aligned"):
        sync_api.expect(page.locator(f"#{side}-reward")).to_contain_text(REWARD, timeout=REPLY_TIMEOUT_MS)
        sync_api.expect(page.locator(f"#{side}-image img")).to_have_count(1)
    sync_api.expect(page.locator("#status")).to_have_text("")
    # the run's held-out grids, iterations 0 and 1, captioned with their rewards
    sync_api.expect(page.locator("#grids")).to_contain_text("iteration 1 · held-out reward")
    assert len(list((diffusion_run / "iterations").glob("*/eval_grid.png"))) == 2
    screenshot(page, tmp_path / "image.png")


def test_a_checkpoint_folder_opens_with_its_runs_config_and_a_bare_one_needs_its_base(lora_text_run, tmp_path):
    from raft.demos.common import open_run
    from raft.errors import RaftError

    whole = open_run(lora_text_run, "text", trust_run_code=True)
    assert whole.checkpoint == lora_text_run / "checkpoints/iter-0001" and whole.config.finetune.lora.enabled
    inside = open_run(whole.checkpoint, "text", trust_run_code=True)
    assert inside.run_dir == lora_text_run and inside.config.rankers[0].kind == "callable"

    bare = shutil.copytree(whole.checkpoint, tmp_path / "adapter")
    alone = open_run(bare, "text")  # a peft adapter names its base
    assert alone.run_dir is None and alone.config.finetune.lora.enabled
    assert alone.config.model.name_or_path == whole.config.model.name_or_path
    (bare / "adapter_config.json").rename(bare / "config.json")  # now it looks like a full model: no base known
    with pytest.raises(RaftError, match="pass --base"):
        open_run(bare, "text")
    with pytest.raises(RaftError, match="is a text run, not diffusion"):
        open_run(lora_text_run, "diffusion")


def test_cli_reports_a_bad_run_directory_in_one_line(tmp_path, capsys):
    from raft.cli import main

    assert main(["demo", "chat", "--run", str(tmp_path)]) == 2
    assert "neither a run directory (no config.yaml) nor a text checkpoint" in capsys.readouterr().err


def test_image_demo_serves_the_shipped_offline_default(browser, tmp_path):
    """The image demo on a (one-iteration, few-image) run of builtin:shapes, the model `raft run --modality
    diffusion` aligns, rather than on a tiny random pipeline."""
    from raft.demos.image import launch
    from raft.modalities.diffusion.model import ASSETS

    if not (ASSETS / "shapes-sd").is_dir():
        pytest.skip("offline diffusion assets not built")
    run_dir = raft.run(raft.load_config("diffusion", overrides=[
        f"run_dir={tmp_path / 'run'}", "iterations=1", "prompts_per_iteration=2", "samples_per_prompt=2",
        "data.eval_size=2", "eval.samples_per_prompt=1", "generation.num_inference_steps=5"]))
    app = launch(str(run_dir), max_steps=10, block=False)
    try:
        page = browser.new_page()
        page.goto(app.local_url)
        page.locator("#prompt textarea").fill("a red circle above a blue square")
        page.locator("#generate").click()
        for side in ("base", "aligned"):
            sync_api.expect(page.locator(f"#{side}-reward")).to_contain_text(REWARD, timeout=REPLY_TIMEOUT_MS)
            sync_api.expect(page.locator(f"#{side}-image img")).to_have_count(1)
        sync_api.expect(page.locator("#grids")).to_contain_text("iteration 1 · held-out reward")
        screenshot(page, tmp_path / "image-offline-default.png")
    finally:
        app.close()
