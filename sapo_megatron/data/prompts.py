"""Prompt datasets from files: loading, validation, a resumable stream, and preparation from public releases.

A prepared prompt file is JSON lines (or parquet) with one record per prompt::

    {"prompt": "Solve ... Answer: $Answer ...", "answer": "204", "source": "math_dapo", "id": "..."}

``prompt`` and ``answer`` are required non-empty strings; ``source`` (defaults to the file name) and ``id``
are optional. A bad row never stops a run: it is skipped and counted by reason in :class:`DatasetStats`.
Errors about the file itself (missing, unknown format, parquet without pyarrow) are ``ValueError``\\ s that
name the fix.

:func:`prepare_prompts` converts the public releases into that format: DAPO-Math-17k and other files in
verl's layout (``prompt`` = chat messages, ``reward_model.ground_truth``) and AIME tables with
``Problem``/``Answer`` columns. AIME problems are wrapped in DAPO's instruction so that validation asks
for the same "Answer:" line the policy is trained to write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# DAPO-Math-17k's instruction, verbatim: the reward reads the "Answer:" line it asks for.
DAPO_INSTRUCTION_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_INSTRUCTION_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
PREPARE_FORMATS = ("dapo", "aime", "auto")


def dapo_prompt(problem: str) -> str:
    """A problem statement in DAPO-Math's instruction, as the training prompts are written."""
    return DAPO_INSTRUCTION_PREFIX + problem + DAPO_INSTRUCTION_SUFFIX


@dataclass(frozen=True)
class PromptExample:
    prompt: str
    answer: str
    source: str
    id: str = ""

    def to_record(self) -> dict[str, str]:
        return {"prompt": self.prompt, "answer": self.answer, "source": self.source, "id": self.id}


@dataclass
class DatasetStats:
    """What happened to the rows of one or more files; ``skipped`` maps a reason to a row count."""

    n_rows: int = 0
    n_kept: int = 0
    n_duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(self.skipped.items()))
        text = f"read {self.n_rows} rows, kept {self.n_kept}, skipped {self.n_skipped}"
        if reasons:
            text += f" ({reasons})"
        return text + f", duplicates dropped {self.n_duplicates}"


class _SkipRow(Exception):
    """A row that cannot be used; the message is the reason counted in DatasetStats."""


# ----------------------------------------------------------------------------------------------------------
# Loading prepared prompt files
# ----------------------------------------------------------------------------------------------------------


def load_prompts(
    path: str | Path,
    *,
    count_tokens: Callable[[str], int] | None = None,
    max_prompt_length: int | None = None,
) -> tuple[list[PromptExample], DatasetStats]:
    """The usable examples of a prepared prompt file, in file order, and what was skipped.

    With both ``count_tokens`` (the prompt's length in tokens, chat template included if the trainer
    applies one) and ``max_prompt_length``, longer prompts are skipped as ``prompt_too_long``: the rollout
    engine would reject or truncate them.
    """
    path = Path(path)
    stats = DatasetStats()
    examples = []
    for row in _read_rows(path, stats, field_name="data.train / data.validation"):
        try:
            example = _prepared_row(row, default_source=path.stem)
            if count_tokens is not None and max_prompt_length is not None:
                if count_tokens(example.prompt) > max_prompt_length:
                    raise _SkipRow("prompt_too_long")
        except _SkipRow as skip:
            stats.skipped[str(skip)] += 1
            continue
        examples.append(example)
    stats.n_kept = len(examples)
    if stats.n_skipped:
        logger.warning("%s: %s", path, stats.summary())
    return examples, stats


def _prepared_row(row: dict[str, Any], *, default_source: str) -> PromptExample:
    prompt = _required_string(row, "prompt")
    answer = _required_string(row, "answer")
    source = row.get("source", default_source)
    if not isinstance(source, str):
        raise _SkipRow("source_not_string")
    return PromptExample(prompt=prompt, answer=answer, source=source or default_source, id=_optional_id(row.get("id")))


def _required_string(row: dict[str, Any], key: str, *, counted_as: str | None = None) -> str:
    name = counted_as or key
    if row.get(key) is None:
        raise _SkipRow(f"missing_{name}")
    value = row[key]
    if not isinstance(value, str):
        raise _SkipRow(f"{name}_not_string")
    if not value.strip():
        raise _SkipRow(f"empty_{name}")
    return value


def _optional_id(value: Any) -> str:
    # bool is an int subclass but never a meaningful id.
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    return ""


# ----------------------------------------------------------------------------------------------------------
# Resumable stream
# ----------------------------------------------------------------------------------------------------------


class PromptStream:
    """An endless, seeded, resumable stream over a fixed list of examples.

    Each epoch visits every example once, in a permutation drawn from ``(seed, epoch)``; the state is
    ``(epoch, position)`` plus a fingerprint of the data, so resuming on a different file or seed is an
    error instead of a silently different order.
    """

    def __init__(self, examples: Sequence[PromptExample], *, seed: int, shuffle: bool = True):
        if not examples:
            raise ValueError(
                "the prompt stream has no examples: the prompt file is empty or every row was skipped "
                "(raw DAPO-Math / AIME files are converted first with tools/prepare_data.py)"
            )
        self.examples = list(examples)
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self.fingerprint = _fingerprint(self.examples)
        self._order_epoch: int | None = None
        self._order: list[int] = []

    def __len__(self) -> int:
        return len(self.examples)

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
            self._order_epoch, self._order = self.epoch, order
        return self._order

    def take(self, count: int) -> list[PromptExample]:
        out: list[PromptExample] = []
        while len(out) < count:
            order = self._epoch_order()
            stop = min(len(order), self.position + count - len(out))
            out.extend(self.examples[i] for i in order[self.position : stop])
            self.position = stop
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "the prompt data differs from the checkpoint's (the file or the prompt-length filter changed); "
                "resume with the same data, or start a new run directory"
            )
        if state.get("seed") != self.seed:
            raise ValueError(
                f"data.seed={self.seed} differs from the checkpoint's seed {state.get('seed')!r}; "
                "resume with the checkpoint's seed, or start a new run directory"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.examples):
            raise ValueError(f"prompt stream state epoch={epoch}, position={position} is out of range")
        self.epoch, self.position = epoch, position


def _fingerprint(examples: Iterable[PromptExample]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.prompt.encode())
        digest.update(b"\x00")
        digest.update(example.answer.encode())
        digest.update(b"\x01")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Preparation from public releases (DAPO-Math-17k, AIME 2024)
# ----------------------------------------------------------------------------------------------------------


def prepare_prompts(
    paths: Sequence[str | Path], *, fmt: str = "auto", source: str | None = None
) -> tuple[list[PromptExample], DatasetStats]:
    """Converts public dataset files into prompt examples, dropping exact duplicate prompts.

    ``fmt`` is ``"dapo"`` (verl layout: DAPO-Math-17k, verl's AIME parquet), ``"aime"``
    (``Problem``/``Answer`` columns, any case) or ``"auto"`` (decided per file from its columns).
    ``source`` overrides every example's source (default: ``data_source`` for dapo rows, ``"aime"``).
    DAPO-Math-17k's release repeats each prompt many times; a repeated prompt with the same answer is
    counted in ``n_duplicates``, one with a different answer is skipped as ``conflicting_duplicate``
    (the first answer is kept).
    """
    if fmt not in PREPARE_FORMATS:
        raise ValueError(f"--format {fmt!r} is not known; use one of: {', '.join(PREPARE_FORMATS)}")
    if not paths:
        raise ValueError("no input files: pass at least one --input PATH")
    stats = DatasetStats()
    examples: list[PromptExample] = []
    answer_of: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        rows = _read_rows(path, stats, field_name="--input")
        file_fmt = fmt
        if fmt == "auto":
            first, rows = _peek(rows)
            if first is None:
                continue
            file_fmt = _detect_format(first, path)
        convert = _dapo_row if file_fmt == "dapo" else _aime_row
        for row in rows:
            try:
                example = convert(row)
            except _SkipRow as skip:
                stats.skipped[str(skip)] += 1
                continue
            if source is not None:
                example = PromptExample(example.prompt, example.answer, source, example.id)
            seen_answer = answer_of.get(example.prompt)
            if seen_answer is not None:
                if seen_answer == example.answer:
                    stats.n_duplicates += 1
                else:
                    stats.skipped["conflicting_duplicate"] += 1
                continue
            answer_of[example.prompt] = example.answer
            examples.append(example)
    stats.n_kept = len(examples)
    return examples, stats


def write_prompts_jsonl(examples: Iterable[PromptExample], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for example in examples:
            out.write(json.dumps(example.to_record(), ensure_ascii=False) + "\n")


def _detect_format(row: dict[str, Any], path: Path) -> str:
    if "prompt" in row and "reward_model" in row:
        return "dapo"
    if "problem" in {key.lower() for key in row}:
        return "aime"
    raise ValueError(
        f"cannot tell the format of {path} from its columns {sorted(row)}: expected verl's 'prompt' + "
        "'reward_model' (DAPO-Math) or 'Problem' + 'Answer' (AIME); pass --format dapo or --format aime"
    )


def _dapo_row(row: dict[str, Any]) -> PromptExample:
    messages = row.get("prompt")
    if messages is None:
        raise _SkipRow("missing_prompt")
    # One user turn is DAPO's layout; anything else (a system turn, a dialogue) would be lost in one string.
    if (
        not isinstance(messages, (list, tuple))
        or len(messages) != 1
        or not isinstance(messages[0], dict)
        or messages[0].get("role") != "user"
    ):
        raise _SkipRow("prompt_not_single_user_message")
    prompt = _required_string(messages[0], "content", counted_as="prompt")
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict):
        raise _SkipRow("missing_answer")
    answer = _answer_string(reward_model.get("ground_truth"))
    data_source = row.get("data_source")
    extra = row.get("extra_info")
    return PromptExample(
        prompt=prompt,
        answer=answer,
        source=data_source if isinstance(data_source, str) and data_source else "dapo",
        id=_optional_id(extra.get("index")) if isinstance(extra, dict) else "",
    )


def _aime_row(row: dict[str, Any]) -> PromptExample:
    by_lower = {key.lower(): value for key, value in row.items()}
    problem = _required_string(by_lower, "problem", counted_as="prompt")
    answer = _answer_string(by_lower.get("answer"))
    return PromptExample(
        prompt=dapo_prompt(problem.strip()), answer=answer, source="aime", id=_optional_id(by_lower.get("id"))
    )


def _answer_string(value: Any) -> str:
    # AIME tables store answers as integers (sometimes floats after a pandas round trip).
    if value is None:
        raise _SkipRow("missing_answer")
    if isinstance(value, bool):
        raise _SkipRow("answer_not_string")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        raise _SkipRow("answer_not_string")
    if not isinstance(value, str):
        raise _SkipRow("answer_not_string")
    if not value.strip():
        raise _SkipRow("empty_answer")
    return value.strip()


# ----------------------------------------------------------------------------------------------------------
# Reading rows
# ----------------------------------------------------------------------------------------------------------


def _read_rows(path: Path, stats: DatasetStats, *, field_name: str) -> Iterator[dict[str, Any]]:
    """Yields the rows of a JSONL / JSON / parquet file that are JSON objects; counts the others.

    File-level problems raise ``ValueError`` here, before the first row, so callers fail fast.
    """
    if not path.is_file():
        raise ValueError(f"{field_name}: prompt file {str(path)!r} does not exist (or is not a file); check the path")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(
            f"{field_name}: {str(path)!r} has an unknown format {suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(FILE_SUFFIXES)}"
        )
    if suffix == ".parquet":
        return _parquet_rows(path, _open_parquet(path, field_name), stats)
    return _json_rows(path, stats)


def _open_parquet(path: Path, field_name: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError(
            f"{field_name}: reading {str(path)!r} needs the 'pyarrow' package (pip install pyarrow), "
            "or convert the file to JSON lines"
        ) from exc
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError for a damaged file
        raise ValueError(f"{str(path)!r} is not a readable parquet file: {exc}") from exc


def _parquet_rows(path: Path, parquet_file, stats: DatasetStats) -> Iterator[dict[str, Any]]:
    try:
        for batch in parquet_file.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                stats.n_rows += 1
                yield row
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{str(path)!r}: parquet data is damaged after {stats.n_rows} rows: {exc}") from exc


def _json_rows(path: Path, stats: DatasetStats) -> Iterator[dict[str, Any]]:
    with path.open("rb") as file:
        head = file.read(4096).lstrip()
        file.seek(0)
        if head.startswith(b"["):
            # One JSON array: a syntax error leaves no row to salvage, so it is a file-level error.
            try:
                items = json.load(file)
            except ValueError as exc:
                raise ValueError(f"{str(path)!r} starts like a JSON array but does not parse: {exc}") from exc
        else:
            items = _json_lines(file)
        for item in items:
            stats.n_rows += 1
            if isinstance(item, _BadLine):
                stats.skipped["invalid_json"] += 1
            elif not isinstance(item, dict):
                stats.skipped["not_an_object"] += 1
            else:
                yield item


class _BadLine:
    """A JSON-lines line that does not parse (bad syntax or bad UTF-8)."""


def _json_lines(file) -> Iterator[Any]:
    for line in file:
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            yield _BadLine()


def _peek(rows: Iterator[dict[str, Any]]) -> tuple[dict[str, Any] | None, Iterator[dict[str, Any]]]:
    for first in rows:
        return first, _chain_first(first, rows)
    return None, iter(())


def _chain_first(first: dict[str, Any], rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rows
