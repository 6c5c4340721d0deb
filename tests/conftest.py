"""Shared fixtures: the tiny Stable Diffusion (built once per session) and script runners."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RCGDM_CACHE_DIR", tempfile.mkdtemp(prefix="rcgdm-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from rcgdm.models import ensure_tiny

    return ensure_tiny()


def run_script(script: str, *args: str, capsys=None) -> int:
    """Run a root script in this process as `python3 script args`; return its exit status."""
    argv = sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return 0


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python3 args` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def error_line(stderr: str) -> str:
    """The one `error: ...` line a user error must print, checking there is no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]
