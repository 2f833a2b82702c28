"""`sapo-megatron` command line: train, config (print the resolved config)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sapo_megatron.config import ConfigError, load_config, save_config, to_dict

DEFAULT_RECIPE = "recipes/tiny_cpu_sapo.yaml"


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "recipe",
        nargs="?",
        default=None,
        help=f"YAML recipe (default: {DEFAULT_RECIPE} when it exists, else the built-in defaults)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides checked against the schema, e.g. algorithm.sapo.tau_neg=1.1",
    )


def _resolve(args: argparse.Namespace):
    recipe = args.recipe
    overrides = list(args.overrides)
    # `sapo-megatron train key=value` (no recipe) is accepted: the first positional is then an override.
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        overrides.insert(0, recipe)
        recipe = None
    if recipe is None and Path(DEFAULT_RECIPE).is_file():
        recipe = DEFAULT_RECIPE
    return load_config(recipe, overrides)


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = _resolve(args)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    from sapo_megatron.trainer import train

    run_dir = Path(cfg.trainer.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    summary = train(cfg)
    return 0 if summary is not None else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sapo-megatron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="run SAPO (or another policy loss) RL training from a recipe")
    _add_recipe_args(p_train)
    p_train.set_defaults(func=_cmd_train)
    p_config = sub.add_parser("config", help="print the resolved config of a recipe + overrides")
    _add_recipe_args(p_config)
    p_config.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"sapo-megatron: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
