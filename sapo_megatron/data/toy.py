"""Built-in verifiable tasks for the embedded CPU demo.

Each prompt is ``"<task>:<letters>="`` and the answer is a deterministic function of the letters
(reverse, copy, sort). A random model essentially never produces the answer followed by EOS, so the
reward starts near zero and any rise is learning. Train and held-out prompts come from disjoint
random streams, and held-out strings never occur in the training stream of the same run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ALPHABET = "abcdefgh"
TASKS = {
    "reverse": lambda s: s[::-1],
    "copy": lambda s: s,
    "sort": lambda s: "".join(sorted(s)),
}


@dataclass(frozen=True)
class ToyExample:
    prompt: str
    answer: str
    task: str


def parse_toy_source(source: str) -> str:
    """``"toy:reverse"`` -> ``"reverse"``; anything else is a user error naming the allowed tasks."""
    if not source.startswith("toy:"):
        raise ValueError(f"data source {source!r} is not a toy task; toy sources look like 'toy:reverse'")
    task = source[len("toy:") :]
    if task not in TASKS:
        raise ValueError(f"data.train={source!r}: unknown toy task {task!r}; allowed: {', '.join(sorted(TASKS))}")
    return task


class ToyTaskStream:
    """An endless, seeded, resumable stream of toy prompts (the position is part of the trainer state)."""

    def __init__(self, task: str, *, seed: int, min_len: int = 3, max_len: int = 5, split: str = "train"):
        if task not in TASKS:
            raise ValueError(f"unknown toy task {task!r}; allowed: {', '.join(sorted(TASKS))}")
        if not 1 <= min_len <= max_len:
            raise ValueError(f"toy task lengths must satisfy 1 <= min_len <= max_len, got {min_len}, {max_len}")
        self.task, self.seed, self.min_len, self.max_len, self.split = task, seed, min_len, max_len, split
        self.position = 0

    def _example(self, index: int) -> ToyExample:
        # One RNG per example keyed on (seed, split, index): resuming needs only the position.
        rng = random.Random(f"{self.seed}:{self.split}:{index}")
        while True:
            length = rng.randint(self.min_len, self.max_len)
            letters = "".join(rng.choice(ALPHABET) for _ in range(length))
            if self.split == "train" and _is_heldout(letters, self.seed):
                continue
            if self.split != "train" and not _is_heldout(letters, self.seed):
                continue
            return ToyExample(prompt=f"{self.task}:{letters}=", answer=TASKS[self.task](letters), task=self.task)

    def take(self, count: int) -> list[ToyExample]:
        out = [self._example(self.position + i) for i in range(count)]
        self.position += count
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def _is_heldout(letters: str, seed: int) -> bool:
    # A fixed ~1/8 of all strings is reserved for validation, decided by a hash of the string.
    return random.Random(f"heldout:{seed}:{letters}").random() < 0.125
