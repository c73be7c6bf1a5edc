"""What both demos need: a run directory (or a bare checkpoint) turned into a config, a base and a checkpoint."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from raft.config import RaftConfig, to_dict
from raft.errors import RaftError
from raft.rundir import RunDirectory, refuse_saved_code


@dataclass
class DemoRun:
    config: RaftConfig  # the run's resolved config (a bare checkpoint gets the modality's defaults)
    checkpoint: Path | None  # the aligned weights; None when no iteration completed (aligned = base)
    run_dir: Path | None  # None for a bare checkpoint

    def metrics(self) -> list[dict]:
        return RunDirectory(self.run_dir).metrics() if self.run_dir else []

    def summary(self) -> str:
        """One Markdown line: what is compared, and the run's held-out reward before -> after."""
        line = f"**Base** `{self.config.model.name_or_path}` vs **aligned** `{self.checkpoint or 'no checkpoint yet: the base'}`"
        rows = [r for r in self.metrics() if isinstance(r.get("eval/reward_mean"), (int, float))]
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            line += (f" · held-out reward {first['eval/reward_mean']:.3f} (iteration {first['iteration']}) → "
                     f"{last['eval/reward_mean']:.3f} (iteration {last['iteration']})")
        return line


def open_run(path: str | Path, modality: str, base: str | None = None, trust_run_code: bool = False) -> DemoRun:
    """A run directory (its latest checkpoint), a checkpoint inside one (its run's config), or a bare checkpoint
    (text: a full model or a peft adapter; diffusion: a LoRA or a UNet), whose base is `base`. A run's config that
    would run code (remote model code, ranker functions) is refused unless `trust_run_code`."""
    import raft

    path = Path(path).expanduser()
    if not path.is_dir():
        raise RaftError(f"--run: no such directory '{path}'")
    overrides = [f"model.name_or_path={base}"] if base else []
    for run_dir in (path, path.parent.parent):  # <run>/ or <run>/checkpoints/iter-NNNN/
        if (run_dir / "config.yaml").is_file():
            data = RunDirectory(run_dir).saved_config()
            saved = data.get("modality", "text")
            if saved != modality:
                raise RaftError(f"--run: '{run_dir}' is a {saved} run, not {modality}")
            config = raft.load_config(modality, run_dir / "config.yaml", overrides)
            refuse_saved_code(run_dir / "config.yaml", data, to_dict(config), trust_run_code)
            checkpoint = path if run_dir != path else RunDirectory(run_dir).latest_checkpoint()
            return DemoRun(config, checkpoint, run_dir)

    lora, base = bare_checkpoint(path, modality, base)
    overrides = [f"model.name_or_path={base}", f"finetune.lora.enabled={str(lora).lower()}"]
    if modality == "text":
        overrides.append("data.prompt_template={prompt}")  # not the default's movie-review task
    return DemoRun(raft.load_config(modality, None, overrides), path, None)


def bare_checkpoint(path: Path, modality: str, base: str | None) -> tuple[bool, str]:
    """(whether `path` is a LoRA adapter, its base model) for a checkpoint outside a run directory."""
    if modality == "text" and (path / "adapter_config.json").is_file():
        base = base or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        lora = True
    elif modality == "text" and (path / "config.json").is_file():
        lora = False
    elif modality == "diffusion" and (path / "pytorch_lora_weights.safetensors").is_file():
        lora = True
    elif modality == "diffusion" and (path / "unet").is_dir():
        lora = False
    else:
        raise RaftError(f"--run: '{path}' is neither a run directory (no config.yaml) nor a {modality} checkpoint")
    if not base:
        raise RaftError(f"--run: '{path}' is a bare checkpoint; pass --base with the model it was trained from")
    return lora, base



def parse_auth(raw: str | None) -> tuple[str, str] | None:
    """--auth USER:PASSWORD, or --auth @FILE whose first line is USER:PASSWORD (kept out of `ps` and shell history)."""
    if raw is None:
        return None
    text = raw
    if raw.startswith("@"):
        try:
            content = Path(raw[1:]).expanduser().read_text()
        except OSError as error:
            raise RaftError(f"--auth: cannot read '{raw[1:]}': {error.strerror or error}") from None
        text = content.splitlines()[0] if content.strip() else ""
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise RaftError("--auth must be USER:PASSWORD or @FILE holding USER:PASSWORD, both non-empty")
    return user, password


def serve(app, host: str, port: int | None, block: bool, auth: tuple[str, str] | None, max_queue: int):
    """Launches a demo's app: never a public share link, telemetry off (raft/demos/__init__.py), at most `max_queue`
    requests waiting, one generation at a time, and a warning when it listens beyond this machine."""
    from raft.generators.openai_http import is_loopback

    if not is_loopback(host):
        print(f"raft: warning: the demo listens on {host}: anyone who can reach this machine can use its models"
              f"{' (with the --auth password)' if auth else '; pass --auth to ask for a password'}",
              file=sys.stderr, flush=True)
    app.queue(default_concurrency_limit=1, max_size=max_queue, api_open=False)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False, auth=auth,
               max_threads=8, enable_monitoring=False, show_error=False)
    return app
