"""End to end: the console of `sapo-megatron train` (one rank, two small steps, real megatron-core and vLLM).

Quiet (the default): the terminal shows only the run's own lines (where the logs go, the progress bar, the
summary); vLLM's INFO lines, the Apex / Transformer Engine fallback warnings, deprecations and torch's NUMA
note are in <run_dir>/logs/train.log. `--verbose`: they are on the terminal again."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]

SMALL = [
    "trainer.steps=2",
    "trainer.sft_warmup_steps=0",
    "data.prompts_per_step=4",
    "rollout.n_samples=4",
    "trainer.micro_batch_size=4",
    "trainer.val_prompts=8",
    "trainer.eval_interval=0",
    "trainer.save_interval=0",
]

VLLM_INFO = re.compile(r"^\(\w+ pid=\d+\) INFO ", re.MULTILINE)
LIBRARY_WARNING = re.compile(r"site-packages/.*: (UserWarning|DeprecationWarning|FutureWarning):")
# Every line the quiet terminal may show: ours.
OURS = re.compile(r"^(\[console\] .*|sapo: .*|== summary ==|  \w+ +\S.*|)$")


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sapo_megatron.cli", "train", str(REPO / "recipes" / "tiny_cpu_sapo.yaml"), *SMALL,
           f"trainer.run_dir={run_dir}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_quiet_console_and_verbose(tmp_path):
    quiet = _train(tmp_path / "quiet")
    log = tmp_path / "quiet" / "logs" / "train.log"
    terminal = quiet.stdout + quiet.stderr
    lines = quiet.stdout.replace("\r", "\n").splitlines()
    assert lines[0] == f"[console] library output, warnings and INFO lines go to {log} (--verbose shows them here)"
    assert [line for line in lines if not OURS.match(line)] == [], quiet.stdout
    assert "== summary ==" in quiet.stdout and "sapo: 100%" in quiet.stdout
    assert not VLLM_INFO.search(terminal) and not LIBRARY_WARNING.search(terminal), terminal
    assert "Apex" not in terminal and "NUMA" not in terminal and "LD_PRELOAD" not in terminal
    assert quiet.stderr == "", quiet.stderr

    text = log.read_text()
    assert VLLM_INFO.search(text) and LIBRARY_WARNING.search(text)
    assert "UserWarning: Transformer Engine and Apex are not installed" in text
    assert "[step 2/2] reward=" in text and "== summary ==" in text

    verbose = _train(tmp_path / "verbose", "--verbose")
    terminal = verbose.stdout + verbose.stderr
    assert VLLM_INFO.search(terminal) and LIBRARY_WARNING.search(terminal)
    assert "UserWarning: Transformer Engine and Apex are not installed" in terminal
    assert "[console]" not in terminal and not (tmp_path / "verbose" / "logs").exists()
