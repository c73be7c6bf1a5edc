"""`raft run --modality text|diffusion --config file.yaml key.sub=value ...` and friends."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from raft.config import describe, dump_yaml, load_config
from raft.errors import RaftError

USAGE = """raft run [--modality text|diffusion] [--config FILE.yaml] [--resume RUN_DIR] [key.sub=value ...]

Runs RAFT: per iteration, sample K outputs for each of b prompts, score them, keep the best, fine-tune
on them, evaluate on held-out prompts. Settings: the modality's defaults, then --config, then the
key.sub=value overrides (YAML values: 3, 2e-5, true, null, [16, 48]). --resume continues the run in
RUN_DIR after its last completed iteration, with its saved config (overrides still apply)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="raft", description="Reward-ranked fine-tuning of generative models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", usage=USAGE, add_help=False, help="run or resume RAFT")
    run_parser.add_argument("--modality", default=None)
    run_parser.add_argument("--config", default=None)
    run_parser.add_argument("--resume", default=None, metavar="RUN_DIR")
    run_parser.add_argument("-h", "--help", action="store_true")
    show_parser = commands.add_parser("config", help="print the resolved config as YAML (nothing runs)")
    show_parser.add_argument("--modality", default=None)
    show_parser.add_argument("--config", default=None)
    args, overrides = parser.parse_known_args(argv)
    unknown_flags = [o for o in overrides if o.startswith("-")]
    try:
        if unknown_flags:
            raise RaftError(f"unknown option {unknown_flags[0]} (settings are given as key.sub=value)")
        if args.command == "run" and args.help:
            print_help(args.modality or "text")
            return 0
        config, resume = resolve(args, overrides)
        if args.command == "config":
            print(dump_yaml(config), end="")
            return 0
        from raft.loop import run

        run(config, resume=resume)
        return 0
    except RaftError as error:
        print(f"raft: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raft: interrupted; completed iterations are kept (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130


def resolve(args: argparse.Namespace, overrides: list[str]):
    from raft.modalities import get_modality

    saved = None
    resume_dir = getattr(args, "resume", None)
    if resume_dir:
        saved_path = Path(resume_dir) / "config.yaml"
        if not saved_path.is_file():
            raise RaftError(f"cannot resume: '{resume_dir}' is not a run directory (no config.yaml)")
        saved = yaml.safe_load(saved_path.read_text())
        saved["run_dir"] = str(resume_dir)
    modality = args.modality or (saved or {}).get("modality") or _file_modality(args.config) or "text"
    if saved and args.modality and saved.get("modality") != args.modality:
        raise RaftError(f"cannot resume: '{resume_dir}' is a {saved.get('modality')} run, not {args.modality}")
    config_class = get_modality(modality).config_class
    config = load_config(config_class, args.config, [f"modality={modality}", *overrides], base=saved)
    return config, bool(resume_dir)


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
