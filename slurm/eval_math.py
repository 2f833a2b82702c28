"""Accuracy of a Hugging Face checkpoint on a recipe's validation prompts, one vLLM engine per process.

    python slurm/eval_math.py run MODEL_DIR RECIPE [KEY=VALUE ...] --out DIR [--samples 16]
    python slurm/eval_math.py merge DIR

``run`` evaluates this process's slice of the problems (``SLURM_PROCID`` of ``SLURM_NTASKS``: srun starts one
process per GPU) and writes ``DIR/slice_<i>_of_<n>.json``; a slice already written is kept, so a requeued job
only does what is missing. ``merge`` combines the slices into ``DIR/summary.json`` and prints the accuracy.

Prompts are encoded and responses scored exactly as the trainer's validation does (``data.sources.encode_prompt``,
the math answer verifier); sampling follows the recipe's ``rollout`` section (temperature, top-p,
max_new_tokens). Accuracy is the mean reward over all samples of all problems: with ``--samples 16`` that is
avg@16, the usual estimate of pass@1 for sampled decoding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path


def _slice_path(out: Path, index: int, count: int) -> Path:
    return out / f"slice_{index}_of_{count}.json"


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from sapo_megatron.config import load_config
    from sapo_megatron.data.prompts import load_prompts
    from sapo_megatron.rewards.math import math_reward
    from sapo_megatron.rollout.engine import RolloutEngine
    from sapo_megatron.data.sources import encode_prompt

    cfg = load_config(args.recipe, args.overrides)
    if not cfg.data.validation:
        print("eval_math: the recipe has no data.validation; pass data.validation=PATH", file=sys.stderr)
        return 2
    index, count = int(os.environ.get("SLURM_PROCID", "0")), int(os.environ.get("SLURM_NTASKS", "1"))
    out = Path(args.out)
    target = _slice_path(out, index, count)
    if target.is_file():
        print(f"eval_math: {target} exists (a previous attempt wrote it); keeping it")
        return 0

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    count_tokens = lambda text: len(encode_prompt(tokenizer, text))  # noqa: E731
    examples, stats = load_prompts(
        cfg.data.validation, count_tokens=count_tokens, max_prompt_length=cfg.data.max_prompt_length
    )
    mine = examples[index::count]
    records = []
    started = time.perf_counter()
    if mine:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        rollout = dataclasses.replace(cfg.rollout, n_samples=args.samples, seed=args.seed)
        engine = RolloutEngine(
            args.model,
            rollout,
            device=device,
            dtype=cfg.model.params_dtype,
            max_model_len=cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
        )
        try:
            batch = engine.generate([encode_prompt(tokenizer, ex.prompt) for ex in mine])
        finally:
            engine.close()
        texts = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
        rewards: dict[int, list[float]] = {}
        for prompt_index, text in zip(batch.prompt_index, texts):
            rewards.setdefault(prompt_index, []).append(math_reward(text, mine[prompt_index].answer))
        for i, example in enumerate(mine):
            scores = rewards.get(i, [])
            records.append({"id": example.id, "source": example.source, "answer": example.answer, "rewards": scores})
    out.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": str(args.model), "data": cfg.data.validation, "samples": args.samples,
                               "skipped": stats.summary(), "seconds": time.perf_counter() - started,
                               "problems": records}))  # fmt: skip
    os.replace(tmp, target)
    print(f"eval_math: slice {index + 1}/{count}: {len(records)} problems -> {target}")
    return 0


def merge(args: argparse.Namespace) -> int:
    out = Path(args.out)
    slices = sorted(out.glob("slice_*_of_*.json"))
    if not slices:
        print(f"eval_math: no slice_*.json in {out}", file=sys.stderr)
        return 1
    counts = {int(p.stem.rsplit("_of_", 1)[1]) for p in slices}
    if len(counts) != 1 or len(slices) != counts.pop():
        print(f"eval_math: {out} holds {len(slices)} slices of inconsistent or incomplete runs", file=sys.stderr)
        return 1
    parts = [json.loads(p.read_text()) for p in slices]
    problems = [problem for part in parts for problem in part["problems"]]
    rewards = [r for problem in problems for r in problem["rewards"]]
    per_problem = [sum(p["rewards"]) / len(p["rewards"]) for p in problems if p["rewards"]]
    summary = {
        "model": parts[0]["model"],
        "data": parts[0]["data"],
        "samples_per_problem": parts[0]["samples"],
        "problems": len(problems),
        "accuracy": sum(rewards) / len(rewards) if rewards else 0.0,
        "solved_at_least_once": sum(1 for p in problems if any(r > 0 for r in p["rewards"])),
        "per_problem": {p["id"] or str(i): s for i, (p, s) in enumerate(zip(problems, per_problem))},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"eval_math: {summary['model']} on {summary['data']}: accuracy {summary['accuracy']:.4f} "
        f"(avg@{summary['samples_per_problem']} over {summary['problems']} problems; "
        f"{summary['solved_at_least_once']} solved at least once) -> {out / 'summary.json'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="evaluate this process's slice of the problems; KEY=VALUE overrides follow")
    p_run.add_argument("model", help="Hugging Face model directory")
    p_run.add_argument("recipe", help="the run's recipe (validation data, sampling, lengths)")
    p_run.add_argument("--out", required=True, help="directory for the slices and the summary")
    p_run.add_argument("--samples", type=int, default=16, help="samples per problem (default 16)")
    p_run.add_argument("--seed", type=int, default=1234, help="sampling seed (default 1234)")
    p_run.set_defaults(func=run)
    p_merge = sub.add_parser("merge", help="combine the slices into summary.json")
    p_merge.add_argument("out", help="the directory given to run --out")
    p_merge.set_defaults(func=merge)
    # Overrides may come before or after the options (the sbatch script appends them last).
    args, extra = parser.parse_known_args(argv)
    if args.command == "run":
        unknown = [word for word in extra if "=" not in word or word.startswith("-")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
