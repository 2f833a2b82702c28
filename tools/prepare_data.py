"""Converts public math datasets (DAPO-Math-17k, AIME 2024) into sapo_megatron's prompt JSONL.

    python tools/prepare_data.py --input dapo-math-17k.parquet --format dapo --output data/dapo_math.jsonl
    python tools/prepare_data.py --input aime_2024_problems.parquet --output data/aime_2024.jsonl

Bad rows are skipped and counted by reason; repeated prompts are written once.
"""

from __future__ import annotations

import argparse
import sys

from sapo_megatron.data.prompts import PREPARE_FORMATS, prepare_prompts, write_prompts_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", required=True, metavar="PATH",
                        help="a .parquet, .jsonl or .json file; repeat to merge several")  # fmt: skip
    parser.add_argument("--format", default="auto", choices=PREPARE_FORMATS,
                        help="dapo: verl layout (prompt messages + reward_model.ground_truth); "
                             "aime: Problem/Answer columns; auto: decided per file from its columns")  # fmt: skip
    parser.add_argument("--output", required=True, metavar="PATH", help="the prompt JSONL to write")
    parser.add_argument("--source", default=None, help="overrides every record's source field")
    args = parser.parse_args(argv)
    try:
        examples, stats = prepare_prompts(args.input, fmt=args.format, source=args.source)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not examples:
        print(f"error: no usable rows in {', '.join(args.input)} ({stats.summary()}); nothing written", file=sys.stderr)
        return 1
    write_prompts_jsonl(examples, args.output)
    print(f"{args.output}: {stats.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
