"""The tree passes the project's ruff settings (pyproject.toml: lint and format, one line length)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_lint_passes():
    out = _ruff("check", "--output-format", "concise", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_leaves_the_tree_as_it_is():
    out = _ruff("format", "--check", ".")
    assert out.returncode == 0, out.stdout + out.stderr
