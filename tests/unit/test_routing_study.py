"""tools/routing_replay_study.py: the runs' overrides resolve to the intended configs, and the table and plots
computed from run directories (hand-written metrics with known means, and synthetic dashboard runs) — not the
training itself."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_study():
    spec = importlib.util.spec_from_file_location("routing_replay_study", REPO / "tools" / "routing_replay_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


study = _load_study()


def _write_run(run_dir: Path, records: list[dict], status: dict | None = None) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if status is not None:
        (run_dir / study.STATUS_FILE).write_text(json.dumps(status))


def _moe_step(step: int, *, mb1: float, changed: float, val: float | None = None) -> dict:
    record = {
        "step": step,
        "reward/mean": 0.1 * step,
        "mismatch/mismatch_abs_mean": 1e-7 * step,
        "mismatch/mismatch_kl_k3": 3e-14,
        # mb0 carries values that must never be reported: the table reads the last mini-batch only.
        "ratio/mb0/ratio_std": 99.0,
        "ratio/mb1/ratio_std": mb1,
        "ratio/mb1/log_ratio_seq_var_mean": mb1**2,
        "ratio/mb1/gate_weight_mean": 1.0 - mb1,
        "ratio/mb1/gate_weight_below_half_frac": 0.0,
        "routing/old_vs_mb0/routing_token_changed_frac": 99.0,
        "routing/old_vs_mb1/routing_token_changed_frac": changed,
        "routing/rollout_vs_old/routing_token_changed_frac": 0.0,
        "attribution/old_vs_mb1/var_share_changed": 2 * changed,
        "attribution/old_vs_mb1/ss_changed": changed,
        "attribution/old_vs_mb1/ss_total": float(step),
        "time/step": 2.0 * step,
        "time/update": 1.0,
    }
    if val is not None:
        record["reward/val_mean"] = val
    return record


@pytest.fixture
def study_dir(tmp_path):
    out = tmp_path / "study"
    _write_run(out / "dense", [
        {"step": 0, "reward/val_mean": 0.25},
        {"step": 1, "reward/mean": 0.5, "ratio/mb0/ratio_std": 0.0, "ratio/mb1/ratio_std": 0.02,
         "mismatch/mismatch_abs_mean": 4e-8, "time/step": 3.0},
        {"step": 2, "reward/mean": 0.7, "ratio/mb1/ratio_std": 0.04, "mismatch/mismatch_abs_mean": None,
         "time/step": 5.0, "reward/val_mean": 0.5},
    ], status={"returncode": 0, "timed_out": False, "wall_seconds": 61.0})
    _write_run(out / "moe_off", [
        {"step": 0, "reward/val_mean": 0.25},
        _moe_step(1, mb1=0.01, changed=0.1),
        _moe_step(2, mb1=0.03, changed=0.2, val=0.75),
        _moe_step(3, mb1=0.05, changed=0.3, val=0.75),
        _moe_step(4, mb1=0.07, changed=0.4, val=0.5),
    ])
    _write_run(out / "moe_old", [], status={"returncode": 1, "timed_out": False, "wall_seconds": 5.0})
    # moe_rollout: no directory at all.
    return out


def _table_rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_table_reports_last_mini_batch_means_over_rl_steps(study_dir):
    rows = _table_rows(study.study_table(study.read_study(study_dir)))
    dense, off, old, rollout = zip(*rows.values())
    assert list(rows["run"]) == ["ok", "ok", "crashed (exit 1)", "no metrics"]
    assert rows["RL steps logged"] == ["2", "4", "0", "0"]
    # Held-out: step 0 is after the warm-up; best is the earliest step that reaches the maximum.
    assert rows["held-out reward, after warm-up (step 0)"][:2] == ["0.250", "0.250"]
    assert rows["held-out reward, final"] == ["0.500", "0.500", "—", "—"]
    assert rows["held-out reward, best"][:2] == ["0.500 (step 2)", "0.750 (step 2)"]
    # Means over steps 1..N of the last mini-batch (mb1), never mb0; a null value is skipped.
    assert rows["ratio std, last mini-batch"][:2] == [f"{0.03:.3e}", f"{(0.01 + 0.03 + 0.05 + 0.07) / 4:.3e}"]
    assert rows["train/rollout mismatch `mismatch_abs_mean`"][:2] == [f"{4e-8:.3e}", f"{2.5e-7:.3e}"]
    assert rows["Var_i of log r, last mini-batch (`log_ratio_seq_var_mean`)"][1] == (
        f"{(0.01**2 + 0.03**2 + 0.05**2 + 0.07**2) / 4:.3e}"
    )
    assert rows["tokens with routing changed, old vs last mini-batch"] == ["—", "0.2500", "—", "—"]
    assert rows["tokens with routing changed, rollout vs old"] == ["—", "0", "—", "—"]
    assert rows["share of log r variance on routing-changed tokens (`var_share_changed`)"][1] == "0.5000"
    # Pooled: (0.1 + 0.2 + 0.3 + 0.4) / (1 + 2 + 3 + 4).
    assert rows["same, pooled over steps (sum SS_changed / sum SS_total)"] == ["—", "0.1000", "—", "—"]
    assert rows["SAPO gate weight mean, last mini-batch"][1] == f"{1 - 0.04:.6f}"
    assert rows["step time, mean (s)"][:2] == ["4.0", "5.0"]
    assert rows["wall time of the run incl. start-up and warm-up (s)"] == ["61.0", "—", "5.0", "—"]
    assert rows[f"train reward, mean of last {study.TRAIN_REWARD_TAIL} steps"][1] == "0.250"


def test_last_mini_batch_is_the_highest_index_numerically():
    run = study.RunData("r", "r", [{"step": 1, "ratio/mb2/ratio_std": 1.0, "ratio/mb10/ratio_std": 2.0}], None)
    assert run.last_mini_batch == 10
    assert study.RunData("r", "r", [{"step": 1, "reward/mean": 0.0}], None).last_mini_batch is None


def test_timed_out_run_is_named_so(tmp_path):
    _write_run(tmp_path / "x", [{"step": 0, "reward/val_mean": 0.0}], status={"returncode": None, "timed_out": True})
    assert study.read_run(tmp_path / "x", name="x", label="x").state == "timed out"


@pytest.mark.parametrize("config", study.CONFIGS, ids=study.CONFIG_NAMES)
def test_overrides_resolve_to_the_intended_config(config, tmp_path):
    from sapo_megatron.config import load_config

    overrides = study.run_overrides(config, run_dir=tmp_path / config.name, steps=7, seed=3)
    cfg = load_config(study.DEFAULT_RECIPE, overrides)
    cfg.validate()
    expected_replay = {"dense": "off", "moe_off": "off", "moe_old": "old", "moe_rollout": "rollout"}[config.name]
    # A bare `off` would be YAML's boolean false: the value must arrive as the string.
    assert cfg.algorithm.routing_replay == expected_replay
    assert cfg.model.dense is (config.name == "dense")
    assert (cfg.trainer.seed, cfg.data.seed, cfg.rollout.seed) == (3, 3, 3)
    assert cfg.trainer.steps == 7 and cfg.trainer.run_dir == str(tmp_path / config.name)
    assert cfg.algorithm.num_mini_batches == 2 and cfg.trainer.save_interval == 0


def test_only_the_replay_and_dense_knobs_differ_between_configs(tmp_path):
    from sapo_megatron.config import load_config, to_dict

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    resolved = [
        dict(flat(to_dict(load_config(study.DEFAULT_RECIPE, study.run_overrides(c, run_dir=tmp_path, steps=5, seed=0)))))
        for c in study.CONFIGS
    ]
    differing = {k for k in resolved[0] if len({repr(r[k]) for r in resolved}) > 1}
    assert differing == {"model.dense", "algorithm.routing_replay"}


def test_analyse_writes_table_and_three_pngs(tmp_path):
    from sapo_megatron.dashboard.example_runs import write_example_run

    out, figures = tmp_path / "study", tmp_path / "figures"
    write_example_run(out / "dense", moe=False, num_steps=6)
    for seed, name in enumerate(("moe_off", "moe_old", "moe_rollout")):
        write_example_run(out / name, num_steps=6, seed=seed)
    table = study.analyse(out, figures)
    assert (out / "table.md").read_text() == table
    rows = _table_rows(table)
    assert rows["run"] == ["ok"] * 4 and rows["RL steps logged"] == ["6"] * 4
    assert rows["tokens with routing changed, old vs last mini-batch"][0] == "—"
    assert all(v not in ("—", "0") for v in rows["tokens with routing changed, old vs last mini-batch"][1:])
    for name in study.FIGURE_NAMES:
        data = (figures / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_across_table_gives_mean_min_max_over_study_dirs_and_skips_failed_runs(tmp_path):
    studies = []
    for seed, (std, val) in enumerate([(0.02, 0.25), (0.06, 0.75)]):
        out = tmp_path / f"seed{seed}"
        _write_run(out / "moe_off", [_moe_step(1, mb1=std, changed=0.1, val=val)])
        status = {"returncode": 0} if seed == 0 else {"returncode": 1}
        _write_run(out / "moe_old", [_moe_step(1, mb1=std, changed=0.0, val=val)], status=status)
        studies.append(study.read_study(out, study.CONFIGS[1:3]))
    rows = _table_rows(study.across_table(studies))
    assert rows["held-out reward, final"] == ["0.500 [0.250, 0.750] (n=2)", "0.250 [0.250, 0.250] (n=1)"]
    assert rows["ratio std, last mini-batch"][0] == f"{0.04:.3e} [{0.02:.3e}, {0.06:.3e}] (n=2)"
    assert rows["same, pooled over steps"] == ["0.1000 [0.1000, 0.1000] (n=2)", "0 [0, 0] (n=1)"]
    figure = study.plot_across(studies, tmp_path / "figures" / study.ACROSS_FIGURE_NAME)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
