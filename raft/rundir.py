"""The run directory: a self-describing record of a run, written so that a kill loses nothing finished.

    <run_dir>/
      config.yaml                  resolved config (what `--resume` reads back)
      state.json                   {"completed_iteration": N}: the commit point of iteration N
      metrics.jsonl                one row per completed iteration; row 0 is the starting policy
      metrics.png                  the curves of metrics.jsonl
      iterations/iter-0001/
        samples.jsonl              every sample: prompt, output, reward(s), discard reason, selected, provenance
        selected.jsonl             the kept set, as fine-tuned on
        eval_samples.jsonl         the policy's held-out samples and their rewards
      checkpoints/iter-0001/       weights or adapter (safetensors) and optimizer state if carried

      resumes.jsonl                one row per resume that changed settings: what changed, from what to what
      .lock                        while a process runs or resumes the run: its pid, host and start time

Every file and folder is written under a temporary name unique to the writing process and renamed into place
(the folder fsynced after), state.json last, so an iteration either is complete on disk or is redone from the
previous one on resume. One process at a time: `RunDirectory.lock` holds an exclusive lock (flock on .lock, which
the kernel drops when the holder dies, so a stale lock never blocks) for the whole run, and a second process on
the same directory stops with one line naming the holder.
"""

from __future__ import annotations

import atexit
import errno
import json
import math
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from raft.errors import RaftError


LOCK_NAME = ".lock"


def temp_path(path: Path, suffix: str = "") -> Path:
    """A temporary sibling of `path` no other process or call picks: `<name>.<pid>-<random>.tmp<suffix>`
    (`suffix` keeps a file type readable by writers that go by the extension, such as `.png`)."""
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")


def is_temp_name(name: str) -> bool:
    return ".tmp" in name


def fsync_dir(directory: Path) -> None:
    """Makes the renames inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def jsonable(value: Any) -> Any:
    """Plain JSON data; non-finite floats become null so any JSON reader (pyarrow too) accepts the file."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def to_jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(jsonable(row), ensure_ascii=False) + "\n" for row in rows)


def _fsync_tree(root: Path) -> None:
    """Flushes every file under `root` and the folders holding them, before `root` is renamed into place."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


# Settings a resume may change: they cannot change what the finished iterations mean (how many more to run,
# budgets, where and how fast things run, the collapse guard's bounds, which README says --resume re-checks).
RESUMABLE_CHANGES = (
    "iterations", "max_train_seconds", "keep_checkpoints", "run_dir", "guard.*", "model.device", "ranker_timeout_s",
    "finetune.gradient_checkpointing", "generators.*.max_concurrency", "generators.*.timeout_s",
    "generators.*.max_retries", "generators.*.retry_backoff_s", "generators.*.api_key_env",
)


def _flatten(data: Any, path: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{path}{key}."))
        return flat
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        flat = {f"{path}#entries": len(data)}
        for index, value in enumerate(data):
            flat.update(_flatten(value, f"{path}{index}."))
        return flat
    return {path.rstrip("."): data}


def settings_changes(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every setting that differs. A key the saved config lacks (written
    by an older raft, before the setting existed) counts as unchanged unless its list of entries grew."""
    old, now = _flatten(saved), _flatten(new)
    changes = {}
    for key, value in now.items():
        if key.endswith("#entries"):
            if old.get(key, value) != value:
                changes[key.removesuffix(".#entries")] = (f"{old.get(key)} entries", f"{value} entries")
        elif key in old and old[key] != value:
            changes[key] = (old[key], value)
    return changes


def code_settings(data: dict) -> dict[str, Any]:
    """The settings of a config (plain data) that run code other than raft's and its libraries' (a checkpoint's
    own model code: trust_remote_code; user ranker functions: a module or a .py file) or send a secret of this
    machine elsewhere (an http generator's api_key_env)."""
    found: dict[str, Any] = {}
    if isinstance(data.get("model"), dict) and data["model"].get("trust_remote_code") is True:
        found["model.trust_remote_code"] = True
    for index, ranker in enumerate(data.get("rankers") or []):
        if not isinstance(ranker, dict):
            continue
        if ranker.get("trust_remote_code") is True:
            found[f"rankers.{index}.trust_remote_code"] = True
        if ranker.get("kind") == "callable" and ranker.get("function"):
            found[f"rankers.{index}.function"] = ranker["function"]
    for index, generator in enumerate(data.get("generators") or []):
        # the secret in the named variable goes to the saved url: a run directory must not pick either
        if isinstance(generator, dict) and generator.get("kind") == "http" and generator.get("api_key_env"):
            found[f"generators.{index}.api_key_env"] = generator["api_key_env"]
    return found


def refuse_saved_code(config_path: Path, saved: dict, effective: dict, trusted: bool) -> None:
    """A run directory is data, not code: the settings of its saved config that would run code or send a secret
    (`code_settings`) stop the command in one line unless the user passed --trust-run-code (or gave them anew)."""
    if trusted:
        return
    now = code_settings(effective)
    asked = {key: value for key, value in code_settings(saved).items() if now.get(key) == value}
    if asked:
        shown = ", ".join(key if value is True else f"{key}={value}" for key, value in asked.items())
        secret = any(".api_key_env" in key for key in asked)
        raise RaftError(f"'{config_path}' asks to run code{' or send a secret' if secret else ''} ({shown}); a run "
                        f"directory is not trusted like code: pass --trust-run-code if you trust whoever wrote it")


def resumable(key: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_CHANGES)


def load_state(path: Path, map_location: Any = "cpu") -> Any:
    """A torch-saved state (optimizer state, a state dict) read without unpickling code (weights_only=True, on
    every torch version); anything else in the file stops the run in one line naming it."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a corrupt file, or a pickle holding more than tensors and plain data
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RaftError(f"cannot read '{path}': not a plain saved state ({first[:200]})") from None


def iteration_name(iteration: int) -> str:
    return f"iter-{iteration:04d}"


_HELD: dict[str, list] = {}  # realpath -> [lock file descriptor, depth]: this process's locks (re-entrant)


def _reason(error: Exception) -> str:
    return getattr(error, "msg", None) or " ".join(str(error).split())[:120] or type(error).__name__


def read_jsonl(path: Path, require: tuple[str, ...] = (), what: str = "") -> list[dict]:
    """The JSON objects of a .jsonl file; a line that is not one (a truncated write, a hand edit) stops the run in one
    line naming the file and the line."""
    rows = []
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise RaftError(f"{what}'{path}' is not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise RaftError(f"{what}'{path}' line {number} is not valid JSON ({_reason(error)})") from None
        if not isinstance(row, dict) or any(key not in row for key in require):
            raise RaftError(f"{what}'{path}' line {number} is not a JSON object"
                            f"{' with ' + ', '.join(require) if require else ''}")
        rows.append(row)
    return rows


def _short(value: Any) -> str:
    text = json.dumps(jsonable(value), ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe_holder(raw: str) -> str:
    try:
        holder = json.loads(raw)
        return f"pid {holder['pid']} on host {holder['host']} (since {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- the lock: one process per run directory

    def lock(self) -> None:
        """Takes the directory's exclusive lock (creating the directory), or stops in one line naming the process
        that holds it. Re-entrant within a process; `unlock` releases it (process exit does too)."""
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RaftError(f"cannot create run directory '{self.path}': {error.strerror or error}") from None
        path = self.path / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise RaftError(f"run directory '{self.path}' is in use by {holder}; wait for it to end or stop it "
                                f"(a dead holder's lock is released by the system)") from None
            except (ImportError, OSError) as error:  # no flock here (some network filesystems): pid and host
                os.close(fd)
                if isinstance(error, OSError) and error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                fd = self._lock_by_pid(path)
                break
            try:  # the holder may have released (unlinked) the file between our open and flock
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        os.fsync(fd)
        _HELD[key] = [fd, 1]

    def _lock_by_pid(self, path: Path) -> int:
        """The lock without flock: the file is created exclusively; one naming a dead pid on this host is stale."""
        for _ in range(3):
            try:
                return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raw = path.read_text(errors="replace") if path.exists() else ""
                try:
                    holder = json.loads(raw)
                    stale = holder["host"] == socket.gethostname() and not _pid_alive(int(holder["pid"]))
                except (ValueError, KeyError, TypeError):
                    holder, stale = None, False
                if not stale:
                    raise RaftError(f"run directory '{self.path}' is in use by {_describe_holder(raw)}; wait for it "
                                    f"to end, or delete {path} if that process is gone") from None
                path.unlink(missing_ok=True)
        raise RaftError(f"run directory '{self.path}' is in use by another process (its lock keeps changing)")

    def unlock(self) -> None:
        """Releases the lock; a directory that holds nothing but it (a run that never started) is removed."""
        key = os.path.realpath(self.path)
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        fd = held[0]
        path = self.path / LOCK_NAME
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        except OSError:
            pass
        os.close(fd)
        try:
            self.path.rmdir()  # only succeeds when empty
        except OSError:
            pass

    # ---- opening

    def ensure_new(self) -> None:
        if self.path.exists() and any(p.name != LOCK_NAME for p in self.path.iterdir()):
            raise RaftError(f"run directory '{self.path}' already exists; pass --resume {self.path} to continue it")

    def initialize(self, config_yaml: str) -> None:
        self.ensure_new()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", config_yaml)

    def write_config(self, config_yaml: str) -> None:
        atomic_write_text(self.path / "config.yaml", config_yaml)

    def check_resume_changes(self, new: dict, allow_all: bool = False) -> dict[str, tuple[Any, Any]]:
        """Compares the settings of a resume with the saved config.yaml: stops in one line on a change that would
        alter what the finished iterations mean (model, seed, K, LoRA, rewards, ... anything but RESUMABLE_CHANGES)
        unless `allow_all`, and records every change in resumes.jsonl. Returns the changes."""
        saved = self.saved_config()
        changes = settings_changes(saved, new)
        refused = [key for key in changes if not resumable(key)]
        if refused and not allow_all:
            shown = "; ".join(f"{key} ({_short(changes[key][0])} -> {_short(changes[key][1])})" for key in refused)
            raise RaftError(f"cannot resume '{self.path}' with settings that change what its finished iterations mean: "
                            f"{shown}; start a new run (or pass --allow-changed-settings to record the change and "
                            f"continue anyway)")
        if changes:
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "after_iteration": self.completed_iteration,
                      "changes": {key: {"from": a, "to": b} for key, (a, b) in changes.items()},
                      **({"forced": refused} if refused else {})}
            log = self.path / "resumes.jsonl"
            previous = log.read_text() if log.is_file() else ""
            atomic_write_text(log, previous + to_jsonl([record]))
        return changes

    def saved_config(self) -> dict:
        """config.yaml as data; one line naming the file when it is empty, not YAML or not a mapping."""
        import yaml

        path = self.path / "config.yaml"
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise RaftError(f"cannot resume: '{self.path}' is not a run directory (no config.yaml)") from None
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise RaftError(f"'{path}' is corrupt: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(data, dict) or not data:
            raise RaftError(f"'{path}' is corrupt: {'empty' if not data else 'not a mapping of settings'}")
        return data

    # ---- state

    @property
    def completed_iteration(self) -> int | None:
        """The last iteration committed to disk (0: only the starting evaluation), or None."""
        state = self._state()
        return None if not state else state["completed_iteration"]

    def checkpoint_dir(self, iteration: int) -> Path:
        return self.path / "checkpoints" / iteration_name(iteration)

    def _state(self) -> dict:
        """state.json ({} before the first commit); one line naming it when it is not what raft writes."""
        path = self.path / "state.json"
        if not path.is_file():
            return {}
        try:
            state = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise RaftError(f"'{path}' is corrupt ({_reason(error)}); it marks the last completed iteration: restore "
                            f"it from a backup or start a new run") from None
        numbers = [state.get(key) for key in ("completed_iteration", "checkpoint_iteration") if isinstance(state, dict)]
        if not isinstance(state, dict) or not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
                                                   for v in numbers) or numbers[0] is None:
            raise RaftError(f"'{path}' is corrupt (no completed_iteration >= 0); it marks the last completed "
                            f"iteration: restore it from a backup or start a new run")
        return state

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint of the run's model: the last completed iteration's, unless the collapse guard rolled
        that iteration back (then the last good one's); None for the starting model."""
        state = self._state()
        done = state.get("checkpoint_iteration", state.get("completed_iteration"))
        if not done:
            return None
        path = self.checkpoint_dir(done)
        if not path.is_dir():
            raise RaftError(f"cannot resume: checkpoint '{path}' of completed iteration {done} is missing")
        return path

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return read_jsonl(path, require=("iteration",))

    def discard_unfinished(self) -> None:
        """Remove what an interrupted iteration left behind (anything past the commit point)."""
        done = self.completed_iteration
        done = -1 if done is None else done
        for folder in (self.path / "iterations", self.path / "checkpoints"):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                number = entry.name.removeprefix("iter-")
                if is_temp_name(entry.name) or not number.isdigit() or int(number) > done:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        rows = [row for row in self.metrics() if row["iteration"] <= done]
        if (self.path / "metrics.jsonl").is_file():
            atomic_write_text(self.path / "metrics.jsonl", to_jsonl(rows))

    # ---- committing an iteration

    def commit_iteration(
        self,
        iteration: int,
        write_files: Callable[[Path], None],
        metrics_row: dict,
        save_checkpoint: Callable[[Path], None] | None,
        keep_checkpoints: int,
        before_commit: Callable[[], None] = lambda: None,
    ) -> None:
        """Write iteration `iteration` (its files, checkpoint, metrics row), then mark it complete. A full disk stops
        the run in one line; what was written of this iteration is removed, the completed iterations stay."""
        try:
            self._commit(iteration, write_files, metrics_row, save_checkpoint, keep_checkpoints, before_commit)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise RaftError(f"disk full while writing iteration {iteration} to '{self.path}' ({error.strerror}); "
                            f"the completed iterations are intact: free space, then --resume {self.path}") from None

    def _commit(self, iteration, write_files, metrics_row, save_checkpoint, keep_checkpoints, before_commit) -> None:
        self._write_folder(self.path / "iterations" / iteration_name(iteration), write_files)
        if save_checkpoint is not None:
            self._write_folder(self.checkpoint_dir(iteration), save_checkpoint)
        rows = [row for row in self.metrics() if row["iteration"] < iteration] + [metrics_row]
        atomic_write_text(self.path / "metrics.jsonl", to_jsonl(rows))
        state = {"completed_iteration": iteration}
        if save_checkpoint is None and iteration > 0:  # rolled back: the model stays the last saved one
            state["checkpoint_iteration"] = self._state().get("checkpoint_iteration", self.completed_iteration)
        before_commit()
        atomic_write_text(self.path / "state.json", json.dumps(state) + "\n")
        self._prune_checkpoints(keep_checkpoints)

    def _write_folder(self, final: Path, fill: Callable[[Path], Any]) -> None:
        tmp = temp_path(final)
        tmp.mkdir(parents=True)
        try:
            fill(tmp)
            _fsync_tree(tmp)
            if final.exists():  # an uncommitted leftover of this iteration (the lock rules out a live writer)
                shutil.rmtree(final)
            replace_durably(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _prune_checkpoints(self, keep: int) -> None:
        folder = self.path / "checkpoints"
        if not folder.is_dir():
            return
        checkpoints = sorted(p for p in folder.iterdir() if p.name.startswith("iter-") and not is_temp_name(p.name))
        for old in checkpoints[:-keep]:
            shutil.rmtree(old)


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        _HELD[key][1] = 1
        RunDirectory(key).unlock()
