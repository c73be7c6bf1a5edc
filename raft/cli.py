"""`raft run --modality text|diffusion --config file.yaml key.sub=value ...` and friends."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from raft.config import describe, dump_yaml, load_config
from raft.errors import RaftError

USAGE = """raft run [--modality text|diffusion] [--config FILE.yaml] [--resume RUN_DIR [--allow-changed-settings]]
                [--trust-run-code] [key.sub=value ...]

Runs RAFT: per iteration, sample K outputs for each of b prompts, score them, keep the best, fine-tune
on them, evaluate on held-out prompts. Settings: the modality's defaults, then --config, then the
key.sub=value overrides (YAML values: 3, 2e-5, true, null, [16, 48]). --resume continues the run in
RUN_DIR after its last completed iteration, with its saved config; overrides may change only what cannot change
what the finished iterations mean (iterations, max_train_seconds, keep_checkpoints, guard.*, model.device,
ranker_timeout_s, the servers' timeouts and retries): anything else stops the resume in one line, unless
--allow-changed-settings.
Every change is recorded in RUN_DIR/resumes.jsonl. A run directory is data, not code: a saved config that would
run code (model.trust_remote_code, rankers.N.trust_remote_code, a callable ranker's function) or send a secret
(an http generator's api_key_env) is refused unless --trust-run-code is given."""

BASELINE_USAGE = """raft ppo [--config FILE.yaml] [--resume RUN_DIR] [key.sub=value ...]
       raft best-of-k [--config FILE.yaml] [key.sub=value ...]
       raft compare [--config FILE.yaml] [--methods best_of_k,raft,raft_undefended,rrhf,ppo] [--seeds 0,1,2]
                    [--budget-samples N] [--budget-seconds S] [--out DIR] [key.sub=value ...]

Baselines for text, in raft's harness (same sampler, rewards, evaluation and run directory). ppo: PPO with
a value head and a KL penalty to the starting model. best-of-k: no training; the held-out reward when the
policy samples samples_per_prompt responses and the reward picks the best. compare: runs every method once
per seed (default: the config's seed), one after another, each in its own process, on the same settings and
budget (generated samples, seconds of training, or both), and writes DIR/report.md with tables (mean ± std
over seeds and per seed: reward, diversity, opening share, perplexity, KL to start, wall-clock, peak memory)
and plots, the reward-KL frontier among them. raft is RAFT with the config's collapse defences (kl.*,
selection.diversity.*, finetune.replay, guard.*); raft_undefended the same with all of them off; rrhf is
`raft run finetune.objective=rrhf selection.strategy=all`, defences off, as published."""

DEMO_USAGE = """raft demo chat --run DIR [--base MODEL] [--host H] [--port P] [--max-input-chars N] [--max-new-tokens N]
                      [--history-turns N] [--auth USER:PASSWORD|@FILE] [--max-queue N] [--trust-run-code]
       raft demo image --run DIR [--base MODEL] [--host H] [--port P] [--max-prompt-chars N] [--steps N] [--max-steps N]
                       [--auth USER:PASSWORD|@FILE] [--max-queue N] [--trust-run-code]

Serves a Gradio app on http://HOST:PORT (default 127.0.0.1, the first free port from 7860) comparing the base model
with the aligned one on the same input, each output scored by the run's rankers. DIR is a run directory (its latest
checkpoint is the aligned model, its config.yaml's model.name_or_path the base), a checkpoint folder inside one, or
a bare checkpoint (a full model, a peft adapter or a diffusers LoRA) with --base naming the model it was trained from.
chat: both replies stream side by side; messages longer than --max-input-chars (500) are refused with a message,
replies stop at --max-new-tokens (128), the models see the last --history-turns (3) exchanges. image: base and
aligned images from the same seed, the run's per-iteration grids and reward curve; prompts are limited to
--max-prompt-chars (200) and denoising to --max-steps (50); --steps sets the default (the run's). Nothing of the run
directory is served but the images shown; no share link is made and gradio's telemetry is off. Another --host than
127.0.0.1 is warned about: add --auth (a login; @FILE keeps the password out of ps). At most --max-queue (8) requests
wait; more are turned away. A run whose config names code (a ranker function, remote model code) needs
--trust-run-code."""


EXPORT_USAGE = """raft export RUN --format samples|sft|preferences --out DIR [--min-margin M] [--conversational]

Writes the samples of run directory RUN as a Hugging Face dataset in DIR: DIR/data/*.parquet (datasets.load_dataset(DIR)),
DIR/arrow (datasets.load_from_disk) and a dataset card DIR/README.md. samples: every sample with its reward(s) and
`kept`; sft: the kept set as prompt / completion (and chat `messages`); preferences: West-of-N pairs, per prompt and
iteration the best and the worst of the N samples as chosen / rejected with both rewards and the margin, pairs with
a margin below M (default 0; ties are always left out) dropped. --conversational: prompt, completion, chosen and
rejected as chat messages (TRL's conversational format). Diffusion runs' images are datasets.Image columns."""

TRAIN_RM_USAGE = """raft train-rm [--config FILE.yaml] data=PAIRS out=DIR [key=value ...]

WARM (weight-averaged reward models): fine-tunes `members` reward models from one shared init (`base` with one
score head) on the preference pairs in PAIRS (a `raft export --format preferences` folder or any DPO-style dataset
with prompt / chosen / rejected), each with its own seed (data order, dropout), with the Bradley-Terry loss, and
writes the average of their weights to DIR as a sequence-classification model that `rankers: [{kind: classifier,
model: DIR}]` loads. DIR/warm.json holds the held-out pairwise accuracy of each member, of the ensemble of their
outputs and of the weight average."""


def main(argv: list[str] | None = None) -> int:
    """The `raft` command; a reader that closes the pipe early (`raft run --help | head`) ends it quietly."""
    from raft.memory import keep_freed_memory

    keep_freed_memory()  # glibc: reuse freed tensors' memory instead of faulting it in again (raft/memory.py)
    try:
        status = _main(argv)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # Python's own flush at exit would raise again: point stdout at /dev/null first
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command ended by a closed pipe


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="raft", description="Reward-ranked fine-tuning of generative models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", usage=USAGE, add_help=False, help="run or resume RAFT")
    run_parser.add_argument("--modality", default=None)
    run_parser.add_argument("--config", default=None)
    run_parser.add_argument("--resume", default=None, metavar="RUN_DIR")
    run_parser.add_argument("--allow-changed-settings", action="store_true")
    run_parser.add_argument("--trust-run-code", action="store_true")
    run_parser.add_argument("-h", "--help", action="store_true")
    for name, what in [("ppo", "run or resume the PPO baseline (text)"),
                       ("best-of-k", "held-out reward of best-of-K sampling, no training (text)"),
                       ("compare", "RAFT (defended, undefended) vs RRHF vs PPO vs best-of-K on one budget and "
                                   "seeds, with a report (text)")]:
        baseline = commands.add_parser(name, usage=BASELINE_USAGE, add_help=False, help=what)
        baseline.add_argument("--config", default=None)
        baseline.add_argument("-h", "--help", action="store_true")
        if name == "ppo":
            baseline.add_argument("--resume", default=None, metavar="RUN_DIR")
            baseline.add_argument("--trust-run-code", action="store_true")
        if name == "compare":
            baseline.add_argument("--methods", default="best_of_k,raft,raft_undefended,rrhf,ppo")
            baseline.add_argument("--seeds", default=None)  # comma-separated; checked by compare.parse_seeds
            baseline.add_argument("--budget-samples", default=None)
            baseline.add_argument("--budget-seconds", default=None)
            baseline.add_argument("--out", default=None)
    demo = commands.add_parser("demo", usage=DEMO_USAGE, help="Gradio demo of a run: chat (text) or image (diffusion)")
    demo.add_argument("app", choices=["chat", "image"])
    demo.add_argument("--run", required=True, metavar="DIR")
    demo.add_argument("--base", default=None)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=positive, default=None)
    demo.add_argument("--max-input-chars", type=positive, default=500)
    demo.add_argument("--max-new-tokens", type=positive, default=128)
    demo.add_argument("--history-turns", type=non_negative, default=3)
    demo.add_argument("--max-prompt-chars", type=positive, default=200)
    demo.add_argument("--steps", type=positive, default=None)
    demo.add_argument("--max-steps", type=positive, default=50)
    demo.add_argument("--trust-run-code", action="store_true")
    demo.add_argument("--auth", default=None, metavar="USER:PASSWORD|@FILE")
    demo.add_argument("--max-queue", type=positive, default=8)
    export = commands.add_parser("export", usage=EXPORT_USAGE, help="a run's samples as a Hugging Face dataset "
                                 "(samples, sft, West-of-N preferences)")
    export.add_argument("run_path", metavar="RUN")
    export.add_argument("--format", required=True, metavar="samples|sft|preferences")
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument("--min-margin", default="0")
    export.add_argument("--conversational", action="store_true")
    train_rm = commands.add_parser("train-rm", usage=TRAIN_RM_USAGE, add_help=False,
                                   help="WARM: train M reward models on preference pairs and average their weights")
    train_rm.add_argument("--config", default=None)
    train_rm.add_argument("-h", "--help", action="store_true")
    show_parser = commands.add_parser("config", help="print the resolved config as YAML (nothing runs)")
    show_parser.add_argument("--modality", default=None)
    show_parser.add_argument("--config", default=None)
    args, overrides = parser.parse_known_args(argv)
    unknown_flags = [o for o in overrides if o.startswith("-")]
    try:
        if unknown_flags:
            raise RaftError(f"unknown option {unknown_flags[0]} (settings are given as key.sub=value)")
        if args.command in ("ppo", "best-of-k", "compare"):
            return run_baseline(args, overrides, argv)
        if args.command == "demo":
            return run_demo(args, overrides)
        if args.command == "export":
            return run_export(args, overrides)
        if args.command == "train-rm":
            return run_train_rm(args, overrides)
        if args.command == "run" and args.help:
            print_help(args.modality or "text")
            return 0
        config, resume = resolve(args, overrides)
        if args.command == "config":
            print(dump_yaml(config), end="")
            return 0
        from raft.loop import run

        run(config, resume=resume, allow_changed_settings=args.allow_changed_settings)
        return 0
    except RaftError as error:
        print(f"raft: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raft: interrupted; completed iterations are kept (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130
    except OSError as error:
        import errno

        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"raft: error: disk full ({error.strerror}{': ' + str(error.filename) if error.filename else ''}); "
              f"completed iterations are kept: free space, then resume with --resume RUN_DIR", file=sys.stderr)
        return 2


def run_baseline(args: argparse.Namespace, overrides: list[str], argv: list[str]) -> int:
    from raft.baselines.ppo import TextPPOConfig

    config_class = TextPPOConfig if args.command in ("ppo", "compare") else None
    if args.help:
        print("usage: " + BASELINE_USAGE)
        print("\nsettings (key (default): meaning):")
        for line in describe(config_class or resolve_class("text")):
            print("  " + line)
        return 0
    args.modality = None
    config, resume = resolve(args, overrides, config_class)
    if args.command == "ppo":
        from raft.baselines.ppo import run_ppo

        run_ppo(config, resume=resume)
    elif args.command == "best-of-k":
        from raft.baselines.best_of_k import run_best_of_k

        run_best_of_k(config)
    else:
        import shlex
        from datetime import datetime

        from raft.baselines.compare import compare, parse_seeds

        out = Path(args.out or f"reports/compare-{datetime.now():%Y%m%d-%H%M%S}")
        threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
        compare(config, [m.strip() for m in args.methods.split(",") if m.strip()], out,
                threads + "raft " + shlex.join(argv),
                budget_samples=number_option(args.budget_samples, "--budget-samples", int),
                budget_seconds=number_option(args.budget_seconds, "--budget-seconds", float),
                seeds=parse_seeds(args.seeds))
    return 0


def run_export(args: argparse.Namespace, overrides: list[str]) -> int:
    from raft.export import export_run

    if overrides:
        raise RaftError(f"unexpected argument '{overrides[0]}' (see raft export --help)")
    try:
        min_margin = float(args.min_margin)
    except ValueError:
        raise RaftError(f"--min-margin must be a number, got '{args.min_margin}'") from None
    out = export_run(args.run_path, args.format, args.out, min_margin=min_margin, conversational=args.conversational)
    import datasets

    print(f"exported {len(datasets.load_from_disk(str(out / 'arrow')))} rows ({args.format}) to {out}")
    return 0


def run_train_rm(args: argparse.Namespace, overrides: list[str]) -> int:
    from raft.warm import TrainRMConfig, train_rm

    if args.help:
        print("usage: " + TRAIN_RM_USAGE)
        print("\nsettings (key (default): meaning):")
        for line in describe(TrainRMConfig):
            print("  " + line)
        return 0
    train_rm(load_config(TrainRMConfig, args.config, overrides))
    return 0


def run_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise RaftError(f"unexpected argument '{overrides[0]}' (see raft demo --help)")
    from raft.demos.common import parse_auth

    auth = parse_auth(args.auth)
    try:
        if args.app == "chat":
            from raft.demos.chat import launch

            launch(args.run, args.base, args.host, args.port, max_input_chars=args.max_input_chars,
                   max_new_tokens=args.max_new_tokens, history_turns=args.history_turns,
                   trust_run_code=args.trust_run_code, auth=auth, max_queue=args.max_queue)
        else:
            from raft.demos.image import launch

            launch(args.run, args.base, args.host, args.port, max_prompt_chars=args.max_prompt_chars,
                   max_steps=args.max_steps, steps=args.steps, trust_run_code=args.trust_run_code, auth=auth,
                   max_queue=args.max_queue)
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise RaftError("raft demo needs gradio (pip install 'raft-align[demo]')") from None
    except KeyboardInterrupt:
        pass
    return 0


def whole_number(minimum: int):
    """An argparse type: a whole number >= minimum, else argparse's one-line error."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got '{raw}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got '{raw}'")
        return value

    return parse


positive, non_negative = whole_number(1), whole_number(0)


def number_option(raw: str | None, name: str, kind: type):
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise RaftError(f"{name} must be {'an integer' if kind is int else 'a number'}, got '{raw}'") from None
    if value <= 0:
        raise RaftError(f"{name} must be > 0, got '{raw}'")
    return value


def resolve_class(modality: str) -> type:
    from raft.modalities import get_modality

    return get_modality(modality).config_class


def resolve(args: argparse.Namespace, overrides: list[str], config_class: type | None = None):
    saved = None
    resume_dir = getattr(args, "resume", None)
    if resume_dir:
        from raft.rundir import RunDirectory

        saved = RunDirectory(resume_dir).saved_config()  # one line when missing, empty or not YAML
        saved["run_dir"] = str(resume_dir)
    modality = args.modality or (saved or {}).get("modality") or _file_modality(args.config) or "text"
    if saved and args.modality and saved.get("modality") != args.modality:
        raise RaftError(f"cannot resume: '{resume_dir}' is a {saved.get('modality')} run, not {args.modality}")
    if config_class is None and modality == "text" and _wants_ppo(saved, args.config, overrides):
        from raft.modalities.text.config import TextPPOConfig

        config_class = TextPPOConfig  # `raft run finetune.objective=ppo`, or resuming a PPO run: PPO's settings
    config_class = config_class or resolve_class(modality)
    config = load_config(config_class, args.config, [f"modality={modality}", *overrides], base=saved)
    if saved is not None:
        from raft.config import to_dict
        from raft.rundir import refuse_saved_code

        refuse_saved_code(Path(resume_dir) / "config.yaml", saved, to_dict(config), args.trust_run_code)
    return config, bool(resume_dir)


def _wants_ppo(saved: dict | None, path: str | None, overrides: list[str]) -> bool:
    """Whether the settings ask for the PPO objective (whose settings live in TextPPOConfig's ppo section)."""
    loaded = saved or {}
    if path and Path(path).is_file():
        try:
            loaded = {**loaded, **(yaml.safe_load(Path(path).read_text()) or {})}
        except yaml.YAMLError:
            pass  # load_config reports the YAML error
    if not isinstance(loaded, dict):
        return False
    finetune = loaded.get("finetune") if isinstance(loaded.get("finetune"), dict) else {}
    asked = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "finetune.objective"]
    objective = asked[-1] if asked else finetune.get("objective")
    return objective == "ppo" or (not asked and "ppo" in loaded)


def _file_modality(path: str | None) -> str | None:
    """The `modality:` a --config file names, so `raft run --config diffusion.yaml` needs no --modality."""
    if not path or not Path(path).is_file():
        return None  # load_config reports a missing file
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return None  # load_config reports the YAML error
    return loaded.get("modality") if isinstance(loaded, dict) and isinstance(loaded.get("modality"), str) else None


def print_help(modality: str) -> None:
    from raft.modalities import available, get_modality

    print("usage: " + USAGE)
    print(f"\nmodalities: {', '.join(available())}")
    print(f"\nsettings of --modality {modality} (key (default): meaning):")
    for line in describe(get_modality(modality).config_class):
        print("  " + line)


if __name__ == "__main__":
    sys.exit(main())
