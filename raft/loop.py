"""The RAFT loop: generate -> rank -> select -> fine-tune -> evaluate -> checkpoint, once for all modalities.

Each stage is one named call on a component the modality built (raft/interface.py). Every stage gets
its own seed derived from (seed, iteration, stage), so an iteration redone after a kill produces
exactly what the uninterrupted run produced.

The same loop runs on N processes (`torchrun`, `accelerate launch`): each process samples its shards of the
iteration's prompts, the samples are gathered before ranking, so every process ranks and selects the same
set, fine-tuning is data-parallel (raft/finetune/trainer.py), the held-out evaluation is sharded the same way,
and only the main process reads and writes the run directory (what the others need of it is broadcast).
"""

from __future__ import annotations

import math
import os
import signal
from collections import Counter
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from raft.config import GUARD_BOUNDS, RaftConfig, dump_yaml, to_dict
from raft.errors import RaftError
from raft.finetune import distributed
from raft.generators.sampling import seed_of
from raft.interface import META_GENERATOR, META_KEYS, META_NOT_KEPT, META_PROMPT_TOKENS_CUT, Components, Sample
from raft.metrics import best_of_k_kl_bound, mean, plot_metrics, standard_error, train_seconds
from raft.modalities import get_modality
from raft.rankers import score_samples
from raft.rundir import RunDirectory, iteration_name, read_jsonl, to_jsonl
from raft.selection import apply_discard_rules, select

STAGES = ("generate", "rank", "select", "finetune", "evaluate")
OPENING_WORDS = 4  # eval/top_opening_share: the share of held-out samples opening with the most common 4 words


def run(config: RaftConfig, resume: bool = False, allow_changed_settings: bool = False) -> Path:
    """Run (or, with `resume`, continue) the RAFT loop described by `config`; returns the run directory.
    A resume refuses settings that change what the finished iterations mean unless `allow_changed_settings`."""
    model = getattr(config, "model", None)
    distributed.state(cpu=not torch.cuda.is_available() or getattr(model, "device", "auto") == "cpu")
    if distributed.world() > 1 and distributed.is_main():
        print(f"raft: {distributed.world()} processes ({distributed.state().distributed_type.value})", flush=True)
    run_dir = on_main(lambda: open_run_directory(config, resume, config.modality, allow_changed_settings))
    config.run_dir = str(run_dir.path)  # the main process named it
    try:
        return _run(config, run_dir)
    finally:
        if distributed.is_main():
            run_dir.unlock()


def _run(config: RaftConfig, run_dir: RunDirectory) -> Path:
    modality = get_modality(config.modality)
    parts = modality.build(config, checkpoint=on_main(run_dir.latest_checkpoint))
    done = evaluate_starting_policy(run_dir, parts, config)
    trackers = open_trackers(config, run_dir) if distributed.is_main() else None

    stopped = False
    for iteration in range(done + 1, config.iterations + 1):
        stopped = on_main(lambda: guard_stopped(config, run_dir))
        if stopped or on_main(lambda: budget_spent(config, run_dir, iteration)):
            break
        stage = Stages(config.seed, iteration)
        prompts = draw_prompts(parts.prompts, config.prompts_per_iteration, config.seed, iteration)
        samples = generate_sharded(parts.generator, prompts, config.samples_per_prompt, stage("generate"),
                                   config.prompts_per_shard)

        stage("rank")  # every process ranks and selects the same gathered samples
        discarded = apply_discard_rules(samples, parts.discard_rules)
        score_samples(parts.ranker, samples)
        beta = on_main(lambda: kl_beta(config, run_dir.metrics()))
        kl_metrics = regularize(samples, parts, beta, policy_name=parts.policy.name)

        stage("select")
        opening = (lambda s: parts.opening(s, config.selection.diversity.opening_words)) if parts.opening else None
        selected = select(samples, config.selection, parts.features, opening)
        replayed = on_main(lambda: read_kept(run_dir, parts, iteration, config.selection.replay_iterations))

        training_set = replayed + selected
        train_metrics = parts.finetuner.finetune(training_set, seed=stage("finetune")) if training_set else {}

        eval_metrics, eval_samples = {}, []
        last = on_main(lambda: is_last(config, iteration, train_seconds(run_dir.metrics()) + stage.elapsed()))
        if last or iteration % config.eval_every == 0:
            stage("evaluate")
            # with a guard bound set any evaluation may end the run, so each counts as a possible last one
            eval_metrics, eval_samples = evaluate(parts, config.prompts_per_shard, iteration, last or guard_set(config))

        _kill_point(iteration, "save")
        row = {
            "iteration": iteration,
            "samples": len(samples),
            "discarded": discarded,
            "selected": len(selected),
            "reward/policy_mean": mean(s.reward for s in samples if s.meta.get(META_GENERATOR) == parts.policy.name),
            "reward/all_mean": mean(s.reward for s in samples),
            "reward/selected_mean": mean(s.reward for s in selected),
            "selection/passed_over": sum(1 for s in samples if s.meta.get(META_NOT_KEPT)),
            **({"selection/replayed": len(replayed)} if config.selection.replay_iterations else {}),
            "samples/prompt_cut": sum(1 for s in samples if s.meta.get(META_PROMPT_TOKENS_CUT)),
            **kl_metrics,
            **({"kl/selected_mean": mean(s.kl for s in selected)} if kl_metrics else {}),
            **train_metrics,
            **eval_metrics,
            **stage.times(),
        }
        files = {"samples": samples, "selected": selected, **({"eval_samples": eval_samples} if eval_metrics else {})}
        crossed = on_main(lambda: guard_crossed(config, run_dir.metrics() + [row]))
        rollback = crossed is not None and config.guard.action == "rollback"
        if distributed.is_main():
            run_dir.commit_iteration(
                iteration,
                lambda folder: write_samples(folder, parts, iteration, files),
                row,
                save_checkpoint=None if rollback else parts.finetuner.save_checkpoint,
                keep_checkpoints=config.keep_checkpoints,
                before_commit=lambda: _kill_point(iteration, "commit"),
            )
            plot_metrics(run_dir.metrics(), run_dir.path / "metrics.png")
            report(row, config.iterations)
            if trackers:
                trackers.sync()
        elif not rollback:
            parts.finetuner.save_checkpoint(None)  # takes part in gathering sharded weights
        distributed.barrier()

    if not stopped:
        on_main(lambda: guard_stopped(config, run_dir))  # says so when the last iteration crossed a bound
    on_main(lambda: summarize(run_dir))
    if trackers:
        trackers.finish()
    distributed.finish()
    return run_dir.path


def on_main(work):
    """`work()` on the main process, its result (or its RaftError) on every process."""
    if distributed.world() == 1:
        return work()
    result, error = None, None
    if distributed.is_main():
        try:
            result = work()
        except RaftError as raised:
            error = raised
    result, error = distributed.broadcast((result, error))
    if error is not None:
        raise error
    return result


def generate_sharded(generator, prompts: list[str], samples_per_prompt: int, seed: int, per_shard: int | None,
                     finish=None) -> list[Sample]:
    """The samples of `prompts`, from every process.

    The prompts are cut into shards of `per_shard` (default: one shard per process), shard i sampled with its
    own seed (shard 0 with `seed` itself) by process i mod N; `finish(samples)` runs on each shard where it was
    sampled. With per_shard fixed, the samples do not depend on the number of processes."""
    size = per_shard or max(1, math.ceil(len(prompts) / distributed.world()))
    shards = list(range(0, len(prompts), size))
    mine = []
    for index in distributed.shard(list(range(len(shards)))):
        start = shards[index]
        samples = generator.generate(prompts[start : start + size], samples_per_prompt,
                                     seed=seed if index == 0 else seed_of(seed, index))
        for one in samples:
            one.prompt_index += start  # its prompt's position in `prompts`
        if finish is not None:
            finish(samples)
        mine.append((index, samples))
    return [one for _, samples in sorted(distributed.gather(mine), key=lambda part: part[0]) for one in samples]


def open_trackers(config: RaftConfig, run_dir: RunDirectory):
    """config.trackers, having logged what is committed and not logged yet (row 0 of a new run); None if none."""
    if not getattr(config, "trackers", None):
        return None
    from raft.trackers import Trackers

    trackers = Trackers(config.trackers, run_dir)
    if run_dir.completed_iteration == 0:  # a new run: row 0 (the starting policy)
        trackers.logged = -1
    trackers.sync()
    return trackers


def open_run_directory(config: RaftConfig, resume: bool, name: str, allow_changed_settings: bool = False) -> RunDirectory:
    """A new run directory (runs/<name>-<date>-<time> unless config.run_dir is set), or on `resume` the
    existing one with anything past its last completed iteration removed.

    The directory is locked for this process (a second one stops in one line naming the holder) until
    `run_dir.unlock()` or the process ends. Its files are only written by `evaluate_starting_policy`, after the
    components were built, so a run that cannot start (bad model, bad data) leaves nothing behind."""
    if not config.run_dir:
        config.run_dir = default_run_dir(name)
    run_dir = RunDirectory(config.run_dir)
    run_dir.lock()
    try:
        if resume and (run_dir.path / "config.yaml").is_file():
            run_dir.check_resume_changes(to_dict(config), allow_all=allow_changed_settings)
            run_dir.discard_unfinished()
            run_dir.write_config(dump_yaml(config))
            if run_dir.completed_iteration is not None:
                print(f"resuming {run_dir.path} after iteration {run_dir.completed_iteration}", flush=True)
        else:
            run_dir.ensure_new()
    except BaseException:
        run_dir.unlock()
        raise
    return run_dir


def default_run_dir(name: str) -> str:
    """runs/<name>-<date>-<time>, or with -2, -3, ... appended when another run took that name in the same second:
    the folder is created here (atomically), so two launches never share one."""
    stamp = f"runs/{name}-{datetime.now():%Y%m%d-%H%M%S}"
    for number in range(1, 10_000):
        candidate = Path(stamp if number == 1 else f"{stamp}-{number}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        return str(candidate)
    raise RaftError(f"no free run directory name for {stamp}")


def evaluate_starting_policy(run_dir: RunDirectory, parts: Components, config: RaftConfig) -> int:
    """Commits row 0 of metrics.jsonl (the policy before any training) unless it is on disk already;
    returns the last completed iteration."""
    completed = on_main(lambda: run_dir.completed_iteration)
    if completed is not None:
        return completed
    if distributed.is_main() and not (run_dir.path / "config.yaml").is_file():
        run_dir.initialize(dump_yaml(config))
    _kill_point(0, "evaluate")
    started = time.perf_counter()
    eval_metrics, eval_samples = evaluate(parts, config.prompts_per_shard)
    files = {"eval_samples": eval_samples}
    if parts.eval_best_of_n:
        best_metrics, files["best_of_n_samples"] = best_of_n(parts, parts.eval_best_of_n, config.prompts_per_shard)
        eval_metrics.update(best_metrics)
    row = {"iteration": 0, **eval_metrics, "time/evaluate": time.perf_counter() - started}
    if distributed.is_main():
        run_dir.commit_iteration(0, lambda folder: write_samples(folder, parts, 0, files),
                                 row, save_checkpoint=None, keep_checkpoints=config.keep_checkpoints)
        report(row, config.iterations)
    distributed.barrier()
    return 0


def is_last(config: RaftConfig, iteration: int, spent_seconds: float) -> bool:
    """Whether `iteration` is the run's last one (the last of config.iterations, or the one that spends
    max_train_seconds). Held-out evaluation ends it, and every eval_every-th one, so every run ends measured."""
    return iteration == config.iterations or (
        config.max_train_seconds is not None and spent_seconds >= config.max_train_seconds)


def budget_spent(config: RaftConfig, run_dir: RunDirectory, iteration: int) -> bool:
    """Whether config.max_train_seconds is spent by the completed iterations (so `iteration` must not start)."""
    if config.max_train_seconds is None or train_seconds(run_dir.metrics()) < config.max_train_seconds:
        return False
    print(f"max_train_seconds ({config.max_train_seconds:g}) spent; stopping before iteration {iteration}", flush=True)
    return True


class Stages:
    """Starts the named stages of one iteration: times them, gives each its seed, hosts the kill hook."""

    def __init__(self, seed: int, iteration: int):
        self.seed, self.iteration = seed, iteration
        self.durations: dict[str, float] = {}
        self.current, self.started = None, time.perf_counter()

    def __call__(self, name: str) -> int:
        self._stop()
        self.current, self.started = name, time.perf_counter()
        _kill_point(self.iteration, name)
        return stage_seed(self.seed, self.iteration, name)

    def elapsed(self) -> float:
        """Seconds spent in this iteration's stages so far."""
        return sum(self.durations.values()) + (time.perf_counter() - self.started if self.current else 0.0)

    def _stop(self) -> None:
        if self.current is not None:
            self.durations[f"time/{self.current}"] = time.perf_counter() - self.started

    def times(self) -> dict[str, float]:
        self._stop()
        self.current = None
        return dict(self.durations)


def regularize(samples: list[Sample], parts: Components, beta: float, policy_name: str) -> dict[str, float]:
    """KL-regularized ranking: each sample's ranking score becomes reward - beta * KL_i (KL_i: its log-ratio to
    the starting policy). Returns the KL metrics of the iteration (none when beta is 0)."""
    if beta == 0 or parts.reference is None:
        return {}
    for sample, kl in zip(samples, parts.reference.log_ratios(samples)):
        sample.kl = kl
        sample.score = sample.reward - beta * kl
    own = [s.kl for s in samples if s.meta.get(META_GENERATOR) == policy_name] or [s.kl for s in samples]
    return {"kl/beta": beta, "kl/policy_mean": mean(own)}


def kl_beta(config: RaftConfig, rows: list[dict]) -> float:
    """This iteration's beta: kl.beta, or with kl.adaptive, the controller's update from the last iteration's
    mean KL of the policy's samples (recomputed from metrics.jsonl, so a resumed run gets the same beta)."""
    beta = config.kl.beta
    if not config.kl.adaptive:
        return beta
    for row in rows:
        if isinstance(row.get("kl/beta"), float) and isinstance(row.get("kl/policy_mean"), float):
            error = min(0.2, max(-0.2, row["kl/policy_mean"] / config.kl.target - 1))
            beta = row["kl/beta"] * (1 + error * row["samples"] / config.kl.horizon)
    return beta


def guard_set(config: RaftConfig) -> bool:
    """Whether any collapse-guard bound is set."""
    return any(getattr(config.guard, name) is not None for name in GUARD_BOUNDS)


def guard_crossed(config: RaftConfig, rows: list[dict]) -> str | None:
    """Why the last row of `rows` crosses a collapse-guard bound (relative bounds against row 0), or None."""
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    for name, (metric, relative) in GUARD_BOUNDS.items():
        bound = getattr(config.guard, name)
        value = last.get(metric)
        if bound is None or not isinstance(value, (int, float)):
            continue
        if relative:
            start = first.get(metric)
            if isinstance(start, (int, float)) and start > 0 and value < bound * start:
                return f"{metric} fell to {value:.3f}, {value / start:.2f} x the start's {start:.3f} (guard.{name} {bound:g})"
        elif value > bound:
            return f"{metric} rose to {value:.3f} (guard.{name} {bound:g})"
    return None


def guard_stopped(config: RaftConfig, run_dir: RunDirectory) -> bool:
    """Whether the last completed iteration crossed a guard bound; if so, says which in one line."""
    reason = guard_crossed(config, run_dir.metrics())
    if reason is None:
        return False
    done = run_dir.completed_iteration
    kept = run_dir.latest_checkpoint()
    print(f"guard: stopping after iteration {done}: {reason}; the run's model is "
          f"{kept.relative_to(run_dir.path) if kept else 'the starting model'}", flush=True)
    return True


def evaluate(parts: Components, per_shard: int | None = None, iteration: int = 0,
             last: bool = True) -> tuple[dict, list[Sample]]:
    """Reward of the policy's own samples on held-out prompts, plus the collapse metrics and the modality's.

    Sharded: each process samples, scores and measures the KL of its shards of the held-out prompts; the
    modality's metrics are computed on the main process (the others get the same result)."""

    def score(samples: list[Sample]) -> None:
        score_samples(parts.ranker, samples)
        if parts.reference is not None:
            for sample, kl in zip(samples, parts.reference.kl_to_start(samples)):
                sample.kl = kl

    samples = generate_sharded(parts.policy, parts.eval_prompts, parts.eval_samples_per_prompt, parts.eval_seed,
                               per_shard, finish=score)
    rewards = [s.reward for s in samples]
    metrics = {"eval/reward_mean": mean(rewards), "eval/reward_sem": standard_error(rewards)}
    if parts.reference is not None:
        metrics["eval/kl_to_start"] = mean(s.kl for s in samples)
    for name in dict.fromkeys(name for s in samples for name in s.rewards):  # each ranker's raw held-out mean
        metrics[f"eval/reward/{name}"] = mean(s.rewards[name] for s in samples if name in s.rewards)
    if parts.opening is not None and samples:
        openings = Counter(parts.opening(s, OPENING_WORDS) for s in samples)
        metrics["eval/top_opening_share"] = openings.most_common(1)[0][1] / len(samples)
    return {**metrics, **on_main(lambda: parts.evaluator.evaluate(samples, iteration, last))}, samples


def best_of_n(parts: Components, n: int, per_shard: int | None = None) -> tuple[dict[str, float], list[Sample]]:
    """The held-out reward of best-of-n sampling at inference with the starting policy: n fresh samples per
    held-out prompt (another seed than the evaluation's), the reward picking one. Its KL to the start is at
    most log n - (n - 1) / n."""
    samples = generate_sharded(parts.policy, parts.eval_prompts, n, parts.eval_seed + 1, per_shard,
                               finish=lambda shard: score_samples(parts.ranker, shard))
    best: dict[int, float] = {}
    for sample in samples:
        best[sample.prompt_index] = max(best.get(sample.prompt_index, -math.inf), sample.reward)
    for sample in samples:
        sample.selected = sample.reward == best[sample.prompt_index]
    return {"eval/best_of_n": n, "eval/best_of_n_reward": mean(best.values()),
            "eval/best_of_n_kl_bound": best_of_k_kl_bound(n)}, samples


def read_kept(run_dir: RunDirectory, parts: Components, iteration: int, replay_iterations: int) -> list[Sample]:
    """The kept samples of the `replay_iterations` iterations before `iteration` (-1: all of them), read back from
    their selected.jsonl: the same for a resumed run as for an uninterrupted one."""
    if replay_iterations == 0:
        return []
    first = 1 if replay_iterations < 0 else max(1, iteration - replay_iterations)
    kept = []
    for earlier in range(first, iteration):
        folder = run_dir.path / "iterations" / iteration_name(earlier)
        path = folder / "selected.jsonl"
        if not path.is_file():
            raise RaftError(f"selection.replay_iterations: iteration {earlier}'s kept set '{path}' is missing")
        for row in read_jsonl(path, require=("prompt_index", "prompt", "output", "reward"), what="kept set "):
            kept.append(Sample(
                prompt_index=row["prompt_index"], prompt=row["prompt"],
                output=parts.record_to_output(row["output"], folder),
                meta={key: row[key] for key in META_KEYS if key in row},
                reward=row["reward"], rewards=row.get("rewards") or {}, selected=True,
                kl=row.get("kl", math.nan), score=row.get("score")))
    return kept


def draw_prompts(pool: list[str], count: int, seed: int, iteration: int) -> list[str]:
    """Prompts of `iteration`: consecutive slices of seeded permutations of the pool, epoch after epoch."""
    drawn = []
    for position in range((iteration - 1) * count, iteration * count):
        epoch, offset = divmod(position, len(pool))
        order = np.random.default_rng([seed, epoch]).permutation(len(pool))
        drawn.append(pool[order[offset]])
    return drawn


def stage_seed(seed: int, iteration: int, stage: str) -> int:
    return int(np.random.SeedSequence([seed, iteration, STAGES.index(stage)]).generate_state(1)[0] >> 1)


def write_samples(folder: Path, parts: Components, iteration: int, files: dict[str, list[Sample]]) -> None:
    for name, samples in files.items():
        rows = []
        for index, sample in enumerate(samples):
            key = f"{name}-{index:05d}"
            rows.append({
                "iteration": iteration,
                "prompt_index": sample.prompt_index,
                "prompt": sample.prompt,
                "output": parts.output_to_record(sample.output, folder, key),
                "reward": sample.reward,
                "rewards": sample.rewards or None,
                "discard_reason": sample.discard_reason,
                "selected": sample.selected,
                **({"kl": sample.kl} if not math.isnan(sample.kl) else {}),
                **({"score": sample.score} if sample.score is not None else {}),
                **sample.meta,
            })
        (folder / f"{name}.jsonl").write_text(to_jsonl(rows))
    parts.write_files(folder, files)


def report(row: dict, iterations: int) -> None:
    parts = [f"iteration {row['iteration']}/{iterations}"]
    for key, label in [("reward/policy_mean", "policy reward"), ("reward/selected_mean", "kept reward"),
                       ("eval/reward_mean", "held-out reward"), ("train/loss", "loss")]:
        if isinstance(row.get(key), float):
            parts.append(f"{label} {row[key]:.4f}")
    print(" | ".join(parts), flush=True)


def summarize(run_dir: RunDirectory) -> None:
    rows = [r for r in run_dir.metrics() if isinstance(r.get("eval/reward_mean"), float)]
    if len(rows) >= 1:
        first, last = rows[0], rows[-1]
        print(
            f"held-out reward: {first['eval/reward_mean']:.4f} ± {first.get('eval/reward_sem') or 0:.4f} "
            f"(iteration {first['iteration']}) -> {last['eval/reward_mean']:.4f} ± {last.get('eval/reward_sem') or 0:.4f} "
            f"(iteration {last['iteration']}); run directory: {run_dir.path}",
            flush=True,
        )


def _kill_point(iteration: int, stage: str) -> None:
    """Testing hook: RAFT_KILL_AT=<iteration>:<stage> SIGKILLs this process there, to prove resume works.

    Stages: generate, rank, select, finetune, evaluate, save (before any file of the iteration is
    written) and commit (everything written but state.json).
    """
    if os.environ.get("RAFT_KILL_AT") == f"{iteration}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)
