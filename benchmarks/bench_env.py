"""What every benchmark records about where it ran (shared by the bench_*.py scripts)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

__all__ = ["cpu_name", "git_commit", "write_result"]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """``$SAMOYEDS_COMMIT`` when set, else the short git commit of this checkout (whatever the working directory).

    The variable wins: a copy of the tree sent to a GPU machine may carry a stale ``.git`` (seen: it reported the
    previous session's HEAD), so GPU runs pass the commit they were started from explicitly.
    """
    if os.environ.get("SAMOYEDS_COMMIT"):
        return os.environ["SAMOYEDS_COMMIT"]
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"


def write_result(out_dir: Path, kind: str, device: str, result: dict) -> Path:
    """Write ``result`` as ``<out_dir>/<kind>_<device>_<result['date']>.json`` (the BENCHMARKING.md naming)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = device.replace(" ", "_").replace("/", "_")
    path = out_dir / f"{kind}_{tag}_{result['date']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path
