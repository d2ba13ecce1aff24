"""Helpers of the vLLM plugin tests: engines in subprocesses, the Transformers greedy reference, free ports."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("engine_worker.py")

#: Token-id prompts shared by all engine tests (id 0 is ``<s>`` in the tiny fixtures' tokenizer).
PROMPTS: list[list[int]] = [[0, 5, 9, 17, 33], [0, 44, 2, 101], [0, 250, 7]]
MAX_TOKENS = 8


def engine_env() -> dict[str, str]:
    """Environment of a CPU vLLM subprocess: small KV cache, one OpenMP thread per engine."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_engine(
    model: Path,
    prompts: list[list[int]] = PROMPTS,
    max_tokens: int = MAX_TOKENS,
    *extra: str,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``engine_worker.py`` on ``model``; the result's ``tokens`` attribute holds the generated ids (or None).

    The worker runs in its own session; its whole process group is killed when it ends or times out.

    Raises
    ------
    subprocess.TimeoutExpired
        If the engine does not finish within ``timeout`` seconds.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "out.json", Path(tmp) / "engine.log"
        cmd = [sys.executable, str(WORKER), "--model", str(model), "--prompts", json.dumps(prompts)]
        cmd += ["--max-tokens", str(max_tokens), "--out", str(out), *extra]
        # Output goes to a file, not a pipe: vLLM's engine-core child inherits the descriptors and may outlive
        # the worker, so reading a pipe to EOF would wait for it.
        with log.open("w") as sink:
            proc = subprocess.Popen(
                cmd,
                stdout=sink,
                stderr=subprocess.STDOUT,
                text=True,
                env={**engine_env(), **(env or {})},
                start_new_session=True,
            )
        try:
            proc.wait(timeout=timeout)
        finally:
            kill_group(proc)  # the worker and whatever it left behind
        result = subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(errors="replace"), "")
        result.tokens = json.loads(out.read_text())["tokens"] if out.exists() else None
    return result


def kill_group(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and every process it started (it runs in its own session), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, 9)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def hf_greedy(
    model_dir: Path,
    prompts: list[list[int]] = PROMPTS,
    max_tokens: int = MAX_TOKENS,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> list[list[int]]:
    """Greedy tokens of a Transformers model (float32 on CPU by default), one prompt at a time, never stopping."""
    from transformers import AutoModelForCausalLM

    # (no device_map: that needs accelerate, which the CPU environment does not install)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    tokens = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=3,
            )
            tokens.append(out[0, len(ids) :].tolist())
    return tokens


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def failure_report(output: str, limit: int = 3000) -> str:
    """An engine log cut for an assertion message: the error lines first (root causes sit mid-log), then the tail."""
    errors = [line for line in output.splitlines() if "Error" in line or "Exception" in line]
    return "\n".join(errors[:12]) + "\n...\n" + output[-limit:]
