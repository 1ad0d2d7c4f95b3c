"""Running a ``bench/`` script from a test: tiny settings, its JSON, no background sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_bench(script: str, args: list[str], out: Path) -> tuple[str, dict[str, Any]]:
    """``bench/<script> <args> --json <out>`` with no background profile sweep: what it
    printed and the JSON it wrote. A non-zero exit fails the test with its output's tail."""
    argv = [sys.executable, str(BENCH / script), *args, "--json", str(out)]
    env = {**os.environ, "GPUFAAS_PROFILE_S": "0"}  # no background sweep
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=360, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, dict(json.loads(out.read_text()))
