"""raft/memory.py: the `raft` command keeps freed memory for reuse (glibc), so a tensor allocated again after a free
is not faulted in again page by page; RAFT_MALLOC=system and glibc's own MALLOC_* settings leave malloc alone."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import resource, torch
from raft.memory import keep_freed_memory
applied = keep_freed_memory()
def faults_of_one_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(16 * 2**20)  # 64 MB, above glibc's largest mmap threshold
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_block()
print(applied, min(faults_of_one_block() for _ in range(3)))
"""


def run(env_update: dict) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "RAFT_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={**env, **env_update}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
                    reason="glibc's malloc only")
def test_a_freed_block_is_reused_not_faulted_in_again():
    applied, kept = run({})
    system_applied, system = run({"RAFT_MALLOC": "system"})
    users_applied, _ = run({"MALLOC_ARENA_MAX": "2"})  # the user tuned malloc: left as it is
    assert applied and not system_applied and not users_applied
    assert system > 10_000  # 64 MB in 4 kB pages, faulted in on every allocation
    assert kept < system / 10, (kept, system)
