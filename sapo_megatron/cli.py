"""`sapo-megatron` command line: train, config (print the resolved config), dashboard (live diagnostics page),
convert (Megatron dist-checkpoint -> Hugging Face directory)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from sapo_megatron.config import ConfigError, load_config, save_config, to_dict
from sapo_megatron.convert import add_arguments as add_convert_arguments
from sapo_megatron.convert import run as run_convert
from sapo_megatron.dashboard.server import DashboardServer
from sapo_megatron.planner import PlanError, format_plan, make_plan

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
    cfg = _resolve(args)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    # torch, megatron-core and vLLM: only for the commands that run them, not for `plan`, `config` or `--help`.
    from sapo_megatron.trainer import train

    # The run writes its resolved config.yaml itself; None means interrupted (Ctrl-C), like a shell's 130.
    summary = train(cfg, verbose=args.verbose)
    return 0 if summary is not None else 130


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    # torch and vLLM: only for this command (see _cmd_train).
    from sapo_megatron.rollout.serve_node import serve_node

    return serve_node(cfg, host=args.host, base_port=args.base_port)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    if not args.refresh > 0:
        print(f"sapo-megatron dashboard: --refresh={args.refresh}: must be > 0 seconds", file=sys.stderr)
        return 2
    try:
        server = DashboardServer(args.run_dirs, host=args.host, port=args.port, poll_seconds=args.refresh)
    except ValueError as exc:
        print(f"sapo-megatron dashboard: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sapo-megatron dashboard: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"sapo-megatron dashboard: listening on {args.host}: anyone who can reach this machine can read "
              f"these runs", file=sys.stderr)
    print(f"sapo-megatron dashboard: {len(args.run_dirs)} run(s) at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    try:
        plan = make_plan(cfg, preset=args.preset)
    except PlanError as exc:
        print(f"sapo-megatron plan: refused: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    try:
        plan.check_fits()
    except PlanError as exc:
        print(f"sapo-megatron plan: refused: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    return run_convert(args, "sapo-megatron convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sapo-megatron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="run SAPO (or another policy loss) RL training from a recipe")
    _add_recipe_args(p_train)
    p_train.add_argument(
        "--verbose",
        action="store_true",
        help="show library output on the terminal as well (logging, warnings, C++ messages); by default it goes "
        "to <run_dir>/logs/train.log (rank r > 0: train.rank<r>.log) and the terminal shows the run's own output",
    )
    p_train.set_defaults(func=_cmd_train)
    p_serve = sub.add_parser(
        "serve",
        help="start this rollout node's vLLM servers for a disaggregated run (rollout.mode=remote) and keep them up",
        description="Starts launch.nproc_per_node / rollout.engine_tensor_parallel vLLM servers on this node, bound "
        "to --host at --base-port, --base-port + 1, ...; runs until stopped. Documentation: docs/rollout.md.",
    )
    _add_recipe_args(p_serve)
    p_serve.add_argument("--host", default=None, help="routable name or address to bind (default: this host's name)")
    p_serve.add_argument("--base-port", type=int, default=8000, help="port of the first server (default: 8000)")
    p_serve.set_defaults(func=_cmd_serve)
    p_config = sub.add_parser("config", help="print the resolved config of a recipe + overrides")
    _add_recipe_args(p_config)
    p_config.set_defaults(func=_cmd_config)
    p_dash = sub.add_parser(
        "dashboard",
        help="serve a live web page of the diagnostics of one or more run directories",
        description="Serves a web page with the diagnostics of the given run directories (read live, while the "
        "runs write them), overlaid for comparison. Documentation: docs/diagnostics.md.",
    )
    p_dash.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (trainer.run_dir)")
    p_dash.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p_dash.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 = any free port)")
    p_dash.add_argument(
        "--refresh", type=float, default=3.0, metavar="SECONDS",
        help="how often the page re-reads the runs (default: 3)",
    )
    p_dash.set_defaults(func=_cmd_dashboard)
    p_plan = sub.add_parser(
        "plan",
        help="print the launch plan and per-GPU memory estimate of a recipe; refuse one that cannot run",
        description="Prints where every rank, parallel group and rollout engine goes and what each GPU holds "
        "(parameters, gradients, optimizer states, activations, engine weights and KV cache, with and without "
        "each offload). Exits with 2 when the layout does not divide the GPUs or does not fit launch.gpu_memory_gib. "
        "Documentation: docs/planner.md.",
    )
    _add_recipe_args(p_plan)
    p_plan.add_argument(
        "--preset", default=None, help="use a built-in architecture (qwen3-30b-a3b) instead of model.hf_path/config.json"
    )
    p_plan.set_defaults(func=_cmd_plan)
    p_convert = sub.add_parser(
        "convert",
        help="convert a Megatron dist-checkpoint (any TP/PP/EP layout) into a Hugging Face directory",
        description="Loads a checkpoint written by the trainer into an unsharded model in this one process and "
        "writes safetensors shards, config.json, tokenizer and generation config. Documentation: docs/checkpoints.md.",
    )
    add_convert_arguments(p_convert)
    p_convert.set_defaults(func=_cmd_convert)
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
