"""Where a run's prompts come from: the built-in toy tasks (``toy:<task>``) or prepared prompt files, and how a
prompt becomes token ids (through the tokenizer's chat template when it has one)."""

from __future__ import annotations

from functools import partial

from sapo_megatron.config import Config, ConfigError
from sapo_megatron.data.prompts import PromptStream, load_prompts
from sapo_megatron.data.toy import ToyTaskStream, parse_toy_source


def is_toy_source(source: str) -> bool:
    return source.startswith("toy:")


def build_prompt_streams(cfg: Config, tokenizer):
    """The resumable training stream and the fixed validation examples (``.prompt`` / ``.answer`` each)."""
    if is_toy_source(cfg.data.train):
        task = parse_toy_source(cfg.data.train)
        train_stream = ToyTaskStream(task, seed=cfg.data.seed, split="train")
        val_source = cfg.data.validation or cfg.data.train
        val_task = parse_toy_source(val_source) if is_toy_source(val_source) else None
        if val_task is not None:
            val_examples = ToyTaskStream(val_task, seed=cfg.data.seed, split="heldout").take(cfg.trainer.val_prompts)
            return train_stream, val_examples
    else:
        count = partial(count_prompt_tokens, tokenizer)
        examples, stats = load_prompts(cfg.data.train, count_tokens=count, max_prompt_length=cfg.data.max_prompt_length)
        if not examples:
            raise ConfigError(f"data.train={cfg.data.train!r}: no usable prompt ({stats.summary()})")
        print(f"[data] {cfg.data.train}: {stats.summary()}", flush=True)
        train_stream = PromptStream(examples, seed=cfg.data.seed)
        val_source = cfg.data.validation
    if not val_source:
        return train_stream, []
    count = partial(count_prompt_tokens, tokenizer)
    val_examples, stats = load_prompts(val_source, count_tokens=count, max_prompt_length=cfg.data.max_prompt_length)
    print(f"[data] {val_source}: {stats.summary()}", flush=True)
    return train_stream, val_examples[: cfg.trainer.val_prompts]


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt: through the chat template when the tokenizer has one, else as plain text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def count_prompt_tokens(tokenizer, text: str) -> int:
    return len(encode_prompt(tokenizer, text))

