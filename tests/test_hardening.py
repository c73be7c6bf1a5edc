"""Hardening (issue 15): inputs that must not corrupt a run directory, leak a key or run code unasked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent


def test_cli_exits_quietly_on_a_closed_pipe():
    """`raft run --help | head`: the reader is gone before the help is written; no BrokenPipeError traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "raft", "run", "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    process.stdout.close()  # closed before the child (still importing) writes anything
    stderr = process.stderr.read().decode()
    process.wait(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert process.returncode == 141
