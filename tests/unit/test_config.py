"""The config schema: recipes, dotted overrides, and errors that name the key and what is allowed."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

from sapo_megatron.cli import main as cli_main
from sapo_megatron.config import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    REDUCTIONS,
    AlgorithmConfig,
    Config,
    ConfigError,
    load_config,
    save_config,
    to_dict,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_defaults_are_the_paper_settings():
    cfg = load_config()
    assert cfg.algorithm.policy_loss == "sapo"
    assert cfg.algorithm.reduction == "seq_mean_token_mean"
    assert (cfg.algorithm.sapo.tau_pos, cfg.algorithm.sapo.tau_neg) == (1.0, 1.05)


def test_allowed_values_are_the_fields_literal_types():
    # One list per choice: the tuples the algorithms check against are the config fields' own Literal values.
    hints = typing.get_type_hints(AlgorithmConfig)
    assert POLICY_LOSSES == typing.get_args(hints["policy_loss"]) == ("sapo", "clip", "dual_clip", "gspo", "cispo")
    assert REDUCTIONS == typing.get_args(hints["reduction"])
    assert ADVANTAGE_ESTIMATORS == typing.get_args(hints["advantage"]) == ("grpo", "dr_grpo", "rloo")
    assert KL_ESTIMATORS == typing.get_args(hints["kl_estimator"]) == ("k1", "k2", "k3")
    with pytest.raises(ConfigError, match="not allowed; use one of 'k1', 'k2', 'k3'"):
        load_config(None, ["algorithm.kl_estimator=k4"])


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads_and_round_trips(recipe, tmp_path):
    cfg = load_config(recipe)
    out = tmp_path / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


def test_dotted_override_changes_only_that_value():
    base = load_config()
    cfg = load_config(None, ["algorithm.sapo.tau_neg=1.1", "parallel.tensor=2", "launch.nproc_per_node=2"])
    assert cfg.algorithm.sapo.tau_neg == 1.1
    assert cfg.parallel.tensor == 2
    assert cfg.algorithm.sapo.tau_pos == base.algorithm.sapo.tau_pos
    # an int given where a float is expected is accepted and stored as float
    assert load_config(None, ["algorithm.sapo.tau_pos=2"]).algorithm.sapo.tau_pos == 2.0


def test_override_wins_over_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"algorithm": {"sapo": {"tau_pos": 0.5}}, "trainer": {"steps": 3}}))
    cfg = load_config(recipe, ["algorithm.sapo.tau_pos=0.7"])
    assert cfg.algorithm.sapo.tau_pos == 0.7
    assert cfg.trainer.steps == 3


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("algorithm.sapo.tau_neg=0", "algorithm.sapo.tau_neg=0"),
        ("algorithm.sapo.tau_pos=-1", "finite number > 0"),
        ("algorithm.sapo.tau_pos=.nan", "algorithm.sapo.tau_pos"),
        ("algorithm.sapo.temperature=1", "unknown key 'temperature' in algorithm.sapo; allowed: tau_pos, tau_neg"),
        ("algorithm.policy_loss=ppo2", "use one of 'sapo', 'clip', 'dual_clip', 'gspo', 'cispo'"),
        ("algorithm.reduction=mean", "algorithm.reduction='mean'"),
        ("rollout.max_new_tokens=-4", "rollout.max_new_tokens=-4: must be >= 1"),
        ("data.max_prompt_length=0", "data.max_prompt_length"),
        ("trainer.steps=ten", "trainer.steps='ten': expected an integer"),
        ("trainer.resume=maybe", "expected true or false"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.adam_beta2=1.0", "optimizer.adam_beta2"),
        ("parallel.tensor=0", "parallel.tensor=0: parallel sizes must be >= 1"),
        ("parallel.virtual_pipeline=2", "interleaving needs parallel.pipeline >= 2"),
        ("nonsense.key=1", "unknown key 'nonsense'"),
        ("algorithm.sapo=1", "expected a mapping of SapoConfig fields"),
        ("algorithm.sapo.tau_pos.x=1", "algorithm.sapo.tau_pos is a value, not a section"),
        ("no_equals_sign", "expected the form section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_parallel_sizes_must_divide_world_size():
    with pytest.raises(ConfigError, match=r"tensor\(2\) x pipeline\(2\) x context\(1\) = 4 does not divide the world size 2"):
        load_config(None, ["parallel.tensor=2", "parallel.pipeline=2", "launch.nproc_per_node=2"])
    with pytest.raises(ConfigError, match=r"expert\(4\)"):
        load_config(None, ["parallel.expert=4", "launch.nproc_per_node=2"])
    cfg = load_config(None, ["parallel.tensor=2", "parallel.expert=2", "launch.nproc_per_node=4"])
    assert cfg.parallel.data_parallel_size(cfg.launch.world_size) == 2


def test_mini_batches_must_divide_rollout_batch():
    with pytest.raises(ConfigError, match="algorithm.num_mini_batches=3: must divide the rollout batch"):
        load_config(None, ["algorithm.num_mini_batches=3", "data.prompts_per_step=4", "rollout.n_samples=2"])


def test_unknown_top_level_key_in_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithms:\n  policy_loss: sapo\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) algorithms in the top level; allowed: model, parallel"):
        load_config(recipe)


def test_missing_and_malformed_recipe(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_cli_config_prints_resolved_config_and_reports_errors(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli_main(["config", "recipes/tiny_cpu_sapo.yaml", "algorithm.sapo.tau_neg=1.2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["algorithm"]["sapo"]["tau_neg"] == 1.2
    assert printed == to_dict(load_config(REPO / "recipes/tiny_cpu_sapo.yaml", ["algorithm.sapo.tau_neg=1.2"]))
    assert cli_main(["config", "recipes/tiny_cpu_sapo.yaml", "algorithm.sapo.tau_neg=-1"]) == 2
    assert "config error: algorithm.sapo.tau_neg=-1.0" in capsys.readouterr().err


def test_config_is_a_dataclass_tree():
    cfg = Config()
    assert to_dict(cfg)["algorithm"]["sapo"] == {"tau_pos": 1.0, "tau_neg": 1.05}


def test_exponent_notation_without_a_dot_is_a_number():
    # YAML 1.1 parses "1e-4" as a string; the schema knows the field is a float.
    cfg = load_config(None, ["optimizer.lr=1e-4"])
    assert cfg.optimizer.lr == 1e-4
    with pytest.raises(ConfigError, match="optimizer.lr='fast': expected a number"):
        load_config(None, ["optimizer.lr=fast"])


def test_a_bare_off_is_the_choice_off_not_a_boolean(tmp_path):
    # YAML 1.1 reads `off` as false; routing_replay's allowed values include the word "off".
    assert load_config(None, ["algorithm.routing_replay=off"]).algorithm.routing_replay == "off"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm:\n  routing_replay: off\n")
    assert load_config(recipe).algorithm.routing_replay == "off"
    with pytest.raises(ConfigError, match="algorithm.policy_loss=False: not allowed"):
        load_config(None, ["algorithm.policy_loss=off"])
