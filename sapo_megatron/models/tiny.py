"""The embedded tiny Qwen3-MoE and its tokenizer, built locally (no model hub) and cached on disk.

The tokenizer is byte-level with no merges: every character of the toy tasks is exactly one token, so
copy / reverse / sort tasks are learnable by a very small model and token ids never drift between the
trainer and the rollout engine. The model is a real ``Qwen3MoeForCausalLM`` with random weights saved
with ``save_pretrained``; vLLM, transformers and the Megatron bridge all load the same directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

TINY_MODEL_NAME = "tiny-qwen3-moe"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # vLLM's CPU attention backend needs head_dim >= 32.
    head_dim: int = 32
    moe_intermediate_size: int = 64
    intermediate_size: int = 128
    num_experts: int = 8
    num_experts_per_tok: int = 2
    # 256 byte symbols + 3 specials, padded so that TP up to 8 divides it.
    vocab_size: int = 320
    max_position_embeddings: int = 512
    # Dense control of the same width: every layer uses a dense MLP (Qwen3-MoE's mlp_only_layers).
    dense: bool = False
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sapo_megatron"


def build_tokenizer():
    """A byte-level tokenizer with the 256 byte symbols as its whole vocabulary, plus Qwen's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )


def build_config(spec: TinyModelSpec, eos_token_id: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        moe_intermediate_size=spec.moe_intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        decoder_sparse_step=1,
        mlp_only_layers=list(range(spec.num_hidden_layers)) if spec.dense else [],
        norm_topk_prob=True,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        attention_bias=False,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        dtype="float32",
    )


def build_tiny_model(spec: TinyModelSpec = TinyModelSpec(), cache_dir: str | os.PathLike | None = None) -> Path:
    """Returns a Hugging Face directory holding the tiny model; built once per spec, then reused.

    The directory is written to a temporary sibling and renamed into place, so a killed build never
    leaves a half-written model behind and concurrent builders agree on the result.
    """
    import torch
    from transformers import GenerationConfig, Qwen3MoeForCausalLM

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / f"{TINY_MODEL_NAME}{'-dense' if spec.dense else ''}-{spec.key()}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert len(tokenizer) <= spec.vocab_size, "the model vocabulary must hold every tokenizer id"
    config = build_config(spec, eos)
    torch.manual_seed(spec.seed)
    model = Qwen3MoeForCausalLM(config).to(torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(eos_token_id=eos, pad_token_id=eos, bos_token_id=eos).save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            # Another builder won the race with an identical spec; keep its copy.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
