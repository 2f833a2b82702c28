"""Prompt files: conversion of DAPO-Math / AIME releases (bad rows counted by reason, duplicates dropped),
loading of prepared files, user errors that name the fix, and the seeded resumable stream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sapo_megatron.data.prompts import (
    DatasetStats,
    PromptExample,
    PromptStream,
    dapo_prompt,
    load_prompts,
    prepare_prompts,
    write_prompts_jsonl,
)

REPO = Path(__file__).resolve().parents[2]

TRIANGLE = (
    "In triangle $ABC$, $\\sin \\angle A = \\frac{4}{5}$ and $\\angle A < 90^\\circ$. Let $D$ be a point outside "
    "triangle $ABC$ such that $\\angle BAD = \\angle DAC$ and $\\angle BDC = 90^\\circ$. Suppose that $AD = 1$ and "
    "that $\\frac{BD}{CD} = \\frac{3}{2}$. If $AB + AC$ can be expressed in the form $\\frac{a\\sqrt{b}}{c}$, "
    "find $a + b + c$."
)
DIGITS = "How many positive integers less than $1{,}000$ have digits that sum to $9$?"
TOWER = "Find the remainder when $3^{3^{3^3}}$ is divided by $1000$."


def dapo_row(problem, ground_truth, index, *, messages=None, reward_model=True):
    row = {
        "data_source": "math_dapo",
        "prompt": messages if messages is not None else [{"role": "user", "content": dapo_prompt(problem)}],
        "ability": "MATH",
        "reward_model": {"ground_truth": ground_truth, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }
    if not reward_model:
        del row["reward_model"]
    return row


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def dapo_jsonl(tmp_path):
    return write_jsonl(
        tmp_path / "dapo-math-17k.jsonl",
        [
            dapo_row(TRIANGLE, "34", "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"),
            dapo_row(TRIANGLE, "34", "1f0e2d44-0c52-4b8b-9d0f-5a3e8c1d7b21"),  # the release repeats prompts
            dapo_row(DIGITS, "55", "b2c45f10-7d0e-4c8a-a3b4-0e6f1c2d3e4f"),
            dapo_row(DIGITS, "54", "c3d56a21-8e1f-4d9b-b4c5-1f7a2d3e4f50"),  # same prompt, other answer
            dapo_row("", "3", "d4e67b32", messages=[{"role": "user", "content": "   "}]),
            dapo_row(TOWER, "387", "e5f78c43", reward_model=False),
            dapo_row(
                TOWER,
                "387",
                "f6a89d54",
                messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": TOWER}],
            ),
            '{"data_source": "math_dapo", "prompt": [{"role": "user", "content": "truncated',
            "[1, 2, 3]",
            dapo_row(TOWER, 387, "a7b9ae65"),  # an integer ground truth is still a usable answer
        ],
    )


@pytest.fixture
def aime_jsonl(tmp_path):
    return write_jsonl(
        tmp_path / "aime_2024.jsonl",
        [
            {"ID": "2024-I-1", "Problem": "Every morning Aya goes for a $9$-kilometer-long walk ...", "Answer": 204},
            {"ID": "2024-II-4", "Problem": "Let $x,y$ and $z$ be positive real numbers ...", "Answer": "33"},
            {"ID": "2024-I-2", "Problem": "There exist real numbers $x$ and $y$ ...", "Answer": None},
            {"ID": "2024-I-3", "Problem": "Alice and Bob play the following game ...", "Answer": 7.5},
            {"ID": "2024-I-4", "Problem": 17, "Answer": 1},
            {"ID": "2024-I-5", "Problem": "Rectangles $ABCD$ and $EFGH$ are drawn ...", "Answer": 104.0},
        ],
    )


def test_dapo_rows_are_converted_with_bad_rows_and_duplicates_counted(dapo_jsonl):
    examples, stats = prepare_prompts([dapo_jsonl], fmt="dapo")
    assert examples == [
        PromptExample(dapo_prompt(TRIANGLE), "34", "math_dapo", "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"),
        PromptExample(dapo_prompt(DIGITS), "55", "math_dapo", "b2c45f10-7d0e-4c8a-a3b4-0e6f1c2d3e4f"),
        PromptExample(dapo_prompt(TOWER), "387", "math_dapo", "a7b9ae65"),
    ]
    assert (stats.n_rows, stats.n_kept, stats.n_duplicates) == (10, 3, 1)
    assert stats.skipped == {
        "conflicting_duplicate": 1,
        "empty_prompt": 1,
        "missing_answer": 1,
        "prompt_not_single_user_message": 1,
        "invalid_json": 1,
        "not_an_object": 1,
    }
    assert stats.summary() == (
        "read 10 rows, kept 3, skipped 6 (conflicting_duplicate=1, empty_prompt=1, invalid_json=1, "
        "missing_answer=1, not_an_object=1, prompt_not_single_user_message=1), duplicates dropped 1"
    )


def test_aime_rows_get_the_dapo_instruction_and_integer_answers(aime_jsonl):
    examples, stats = prepare_prompts([aime_jsonl], fmt="auto")
    assert [(e.answer, e.id, e.source) for e in examples] == [
        ("204", "2024-I-1", "aime"),
        ("33", "2024-II-4", "aime"),
        ("104", "2024-I-5", "aime"),
    ]
    assert examples[0].prompt == (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        "Every morning Aya goes for a $9$-kilometer-long walk ...\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )
    assert stats.skipped == {"missing_answer": 1, "answer_not_string": 1, "prompt_not_string": 1}
    renamed, _ = prepare_prompts([aime_jsonl], fmt="aime", source="aime-2024")
    assert [e.source for e in renamed] == ["aime-2024"] * 3


def test_json_array_files_are_read_row_by_row(tmp_path):
    path = tmp_path / "aime.json"
    path.write_text(json.dumps([{"id": 60, "problem": "Find $n$ ...", "answer": "236"}, "stray", None]))
    examples, stats = prepare_prompts([path])
    assert [(e.id, e.answer) for e in examples] == [("60", "236")]
    assert (stats.n_rows, dict(stats.skipped)) == (3, {"not_an_object": 2})


def test_cli_merges_files_and_writes_exact_records(dapo_jsonl, aime_jsonl, tmp_path):
    output = tmp_path / "out" / "train.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_data.py"),
         "--input", str(dapo_jsonl), "--input", str(aime_jsonl), "--output", str(output)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"{output}: read 16 rows, kept 6, skipped 9 (answer_not_string=1, conflicting_duplicate=1, "
        "empty_prompt=1, invalid_json=1, missing_answer=2, not_an_object=1, prompt_not_single_user_message=1, "
        "prompt_not_string=1), duplicates dropped 1"
    )
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [(r["answer"], r["source"], r["id"]) for r in records] == [
        ("34", "math_dapo", "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"),
        ("55", "math_dapo", "b2c45f10-7d0e-4c8a-a3b4-0e6f1c2d3e4f"),
        ("387", "math_dapo", "a7b9ae65"),
        ("204", "aime", "2024-I-1"),
        ("33", "aime", "2024-II-4"),
        ("104", "aime", "2024-I-5"),
    ]
    assert records[0]["prompt"] == dapo_prompt(TRIANGLE)
    # The written file is a valid prepared prompt file.
    examples, stats = load_prompts(output)
    assert [e.to_record() for e in examples] == records and stats.n_skipped == 0


def test_cli_reports_user_errors_without_a_traceback(tmp_path):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("prepare_data", REPO / "tools" / "prepare_data.py")
    tool = module_from_spec(spec)
    spec.loader.exec_module(tool)
    missing = tmp_path / "nowhere.parquet"
    assert tool.main(["--input", str(missing), "--output", str(tmp_path / "o.jsonl")]) == 2
    unknown = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "2+2?", "answer": "4"}])
    assert tool.main(["--input", str(unknown), "--output", str(tmp_path / "o.jsonl")]) == 2
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [{"Problem": "", "Answer": 1}])
    assert tool.main(["--input", str(only_bad), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_parquet_dapo_release_is_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [dapo_row(TRIANGLE, "34", "9a9b6eb4"), dapo_row(DIGITS, "55", "b2c45f10"), dapo_row(TRIANGLE, "34", "x")]
    rows.append({**dapo_row(TOWER, "387", "e5f78c43"), "reward_model": None})
    path = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples, stats = prepare_prompts([path])
    assert [(e.prompt, e.answer, e.id) for e in examples] == [
        (dapo_prompt(TRIANGLE), "34", "9a9b6eb4"),
        (dapo_prompt(DIGITS), "55", "b2c45f10"),
    ]
    assert (stats.n_rows, stats.n_duplicates, dict(stats.skipped)) == (4, 1, {"missing_answer": 1})


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    path = tmp_path / "dapo.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"needs the 'pyarrow' package \(pip install pyarrow\)"):
        prepare_prompts([path])


def test_file_level_user_errors_name_the_field_and_fix(tmp_path):
    with pytest.raises(ValueError, match=r"data.train / data.validation: prompt file .* does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "prompts.csv").write_text("prompt,answer\n")
    with pytest.raises(ValueError, match=r"unknown format '.csv'; use one of .jsonl, .json, .parquet"):
        load_prompts(tmp_path / "prompts.csv")
    with pytest.raises(ValueError, match="--format 'gsm8k' is not known; use one of: dapo, aime, auto"):
        prepare_prompts([tmp_path / "prompts.csv"], fmt="gsm8k")


def test_load_prompts_skips_bad_rows_by_reason(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "What is $1+1$?", "answer": "2", "source": "smoke", "id": 7},
            {"prompt": "What is $2+3$?", "answer": 5},
            {"prompt": "", "answer": "0"},
            {"answer": "1"},
            {"prompt": "What is $3 \\cdot 4$? " * 20, "answer": "12"},
            "not json at all",
            "",
            {"prompt": "Compute $\\binom{5}{2}$.", "answer": "10"},
        ],
    )
    examples, stats = load_prompts(path, count_tokens=lambda text: len(text.split()), max_prompt_length=16)
    assert examples == [
        PromptExample("What is $1+1$?", "2", "smoke", "7"),
        PromptExample("Compute $\\binom{5}{2}$.", "10", "train", ""),
    ]
    assert stats == DatasetStats(
        n_rows=7,
        n_kept=2,
        skipped={
            "answer_not_string": 1,
            "empty_prompt": 1,
            "missing_prompt": 1,
            "prompt_too_long": 1,
            "invalid_json": 1,
        },
    )
    # Without a length function nothing is filtered by length.
    assert load_prompts(path)[1].n_kept == 3


def test_stream_visits_every_example_once_per_epoch_and_resumes_exactly():
    examples = [PromptExample(f"Compute ${i}^2$.", str(i * i), "squares") for i in range(7)]
    stream = PromptStream(examples, seed=11)
    first_epoch, second_epoch = stream.take(7), stream.take(7)
    assert sorted(e.answer for e in first_epoch) == sorted(e.answer for e in examples)
    assert sorted(e.answer for e in second_epoch) == sorted(e.answer for e in examples)
    assert first_epoch != second_epoch  # a fresh permutation per epoch
    assert PromptStream(examples, seed=11).take(14) == first_epoch + second_epoch

    stream = PromptStream(examples, seed=11)
    stream.take(5)
    state = stream.state_dict()
    expected = stream.take(6)  # crosses into the second epoch
    assert (stream.epoch, stream.position) == (1, 4)
    resumed = PromptStream(examples, seed=11)
    resumed.load_state_dict(state)
    assert resumed.take(6) == expected

    with pytest.raises(ValueError, match="prompt data differs from the checkpoint"):
        PromptStream(examples[:6], seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="data.seed=12 differs from the checkpoint's seed 11"):
        PromptStream(examples, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="no examples"):
        PromptStream([], seed=0)


def test_written_records_round_trip(tmp_path):
    examples = [PromptExample(dapo_prompt("Find $x$ if $2x = 10$."), "5", "math_dapo", "u-1")]
    write_prompts_jsonl(examples, tmp_path / "p.jsonl")
    assert load_prompts(tmp_path / "p.jsonl")[0] == examples
