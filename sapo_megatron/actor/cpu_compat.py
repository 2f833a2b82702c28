"""The one place where megatron-core 0.16.1 is adapted to run on a CPU-only torch build (gloo).

megatron-core assumes a GPU in a few dozen call sites. :class:`MegatronCpuCompat` redirects them while it
is installed and restores every attribute it touched when it is removed. The actor installs it explicitly
when it runs on CPU; nothing happens at import time, and on a CUDA device ``install()`` does nothing.

Why not a process-wide shim: replacing ``torch.cuda.*`` for the whole process changed the output of
transformers' ``generate`` in the same process, and vLLM shares the trainer's process when colocated. So
every redirect below is scoped to megatron-core's own modules. A ``TorchFunctionMode`` cannot do this job
either: torch disables it inside autograd's backward pass, where some of these call sites run.

What is redirected, and why (per call site):

1. ``torch`` seen from megatron-core. Each loaded ``megatron.core.*`` module's global name ``torch`` is
   bound to a view of torch that differs in two things only; every other attribute is the real torch's.

   a. ``torch.cuda`` becomes a CPU stand-in:

      - ``current_device()`` returns ``torch.device("cpu")``. megatron passes it as ``device=`` when it
        allocates: rotary_pos_embedding.py (inv_freq), moe/router.py (weights, aux-loss buffers), utils.py
        (global memory buffer, l2 norm), tensor_parallel/mappings.py and layers.py (all-gather / reduce-
        scatter outputs, weight init), p2p_communication.py (shape exchange and receive buffers),
        param_and_grad_buffer.py (grad buffers), dist_checkpointing state_dict_saver.py.
      - ``Stream``/``current_stream``/``default_stream``/``stream``/``Event``: one CPU "stream" that is
        always the current one, and events that are always complete. The MoE alltoall token dispatcher
        copies split sizes on a side stream (token_dispatcher.py), the shared-expert overlap and the DDP
        communication stream use them too; on CPU everything runs in program order.
      - ``synchronize`` / ``empty_cache`` do nothing (p2p_communication.py, filesystem_async.py, DDP).
      - ``get_rng_state`` / ``set_rng_state`` / ``manual_seed`` / ``random.get_rng_state`` act on the CPU
        default generator: megatron's CUDA RNG tracker (tensor_parallel/random.py) forks "the CUDA RNG" to
        give tensor-parallel ranks different weight-init and dropout streams; on CPU the ops that draw
        random numbers use the CPU generator, so that is the one to fork. ``torch.manual_seed`` is not
        used for this because it re-enters ``torch.cuda.manual_seed_all``.

   b. Tensor factories (``empty``, ``zeros``, ``ones``, ``full``, ``tensor``, ``arange``, ...) map a CUDA
      ``device=`` argument to the CPU: ``device="cuda"`` literals in schedules.py (total_num_tokens),
      transformer/utils.py (default causal mask), optimizer/clip_grads.py, optimizer/optimizer.py,
      utils.py (l2 norm), dist_checkpointing exchange_utils.py.

2. tensor_parallel/random.py ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` read and write the CPU
   generator: the originals index ``torch.cuda.default_generators`` and defer through ``_lazy_call``, which
   on a CPU build queues the state change forever instead of applying it.

3. The same tracker logs "CPU RNG state changed within GPU RNG context" whenever a forked region draws a
   random number. On CPU the two generators are the same one, so the message is always true and says
   nothing; a logging filter drops exactly that message while installed.

4. moe/moe_utils.py refers to ``te_general_gemm`` in the router's gating GEMM, but only binds the name
   when Transformer Engine imports: without TE the router raises ``NameError``. It is bound to ``None``,
   which selects the plain ``torch.mm`` path that the code already has.

5. moe/moe_utils.py ``maybe_move_tensor_to_cpu(as_numpy=True)`` (also bound by name in token_dispatcher.py)
   converts split sizes to numpy only for tensors that are on the GPU; already-CPU tensors stay tensors and
   gloo's ``all_to_all_single`` then rejects them as split sizes. The replacement returns numpy for CPU
   tensors too, which is what the GPU path hands to the collective.

6. ``tensor.type() == 'torch.cuda.FloatTensor'`` checks: optimizer/clip_grads.py
   (``clip_grad_by_total_norm_fp32``, also bound by name in optimizer.py), optimizer/distrib_optimizer.py
   (``DistributedOptimizer._build_model_and_main_param_groups``) and optimizer/optimizer.py
   (``Float16OptimizerWithFloat16Params.__init__``) reject CPU fp32 parameters. These three functions are
   wrapped so that, only while one of them runs, ``Tensor.type()`` without arguments reports CPU tensors
   under their CUDA type name. Nothing else sees the change.

Not here, but the same kind of adaptation (it is a choice in the layer spec, not a patch, so it lives with the
bridge that builds the spec): :class:`~sapo_megatron.bridge.qwen3_moe.SequenceParallelTorchNorm`. megatron's MoE
layers train only with sequence parallelism when TP > 1, while the local (non-TE) spec's torch norm asserts that
sequence parallelism is off.

Known CUDA call sites not covered because the actor does not reach them on CPU: ``tensor.cuda()`` calls
(tensor_parallel/data.py ``broadcast_data``, shared embeddings with PP in language_module.py, context-
parallel RoPE in rope_utils.py, optimizer state reload in optimizer.py), CUDA graphs, FSDP, and the
HybridDeviceOptimizer (``optimizer_cpu_offload``), which is a GPU feature.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import types
from typing import Any, Callable, Iterator

import torch

from sapo_megatron.device import resolve_device

CPU = torch.device("cpu")

# Modules that hold call sites listed in the docstring. They are imported before the torch view is bound,
# so that a module megatron imports lazily later (e.g. during the first checkpoint save) is covered too.
CALL_SITE_MODULES = (
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.module",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.shared_experts",
    "megatron.core.transformer.moe.experts",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.exchange_utils",
)

_TENSOR_FACTORIES = (
    "empty",
    "empty_like",
    "empty_strided",
    "zeros",
    "zeros_like",
    "ones",
    "ones_like",
    "full",
    "full_like",
    "tensor",
    "as_tensor",
    "arange",
    "rand",
    "randn",
    "randint",
    "randperm",
)

_RNG_WARNING = "CPU RNG state changed within GPU RNG context"
_MISSING = object()


def needs_cpu_compat(device: str | torch.device | None = None) -> bool:
    """True when megatron-core is about to run on the CPU, the only case that needs the redirects."""
    return resolve_device(device).type == "cpu"


# ----------------------------------------------------------------------------------------------------------
# The CPU stand-ins
# ----------------------------------------------------------------------------------------------------------


class _CpuEvent:
    """A CUDA event stand-in: CPU work is finished when the call that queued it returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


class _CpuStream:
    """The single CPU "stream". Every constructor call returns it, so megatron's ``current_stream() !=
    side_stream`` tests see one stream and skip their cross-stream bookkeeping."""

    _instance: "_CpuStream | None" = None

    def __new__(cls, *args: Any, **kwargs: Any) -> "_CpuStream":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _CpuEvent:
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _cpu_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _seed_cpu_generator(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


class _CpuCudaView:
    """What megatron-core's modules see as ``torch.cuda`` while the compatibility layer is installed."""

    Stream = _CpuStream
    Event = _CpuEvent
    random = types.SimpleNamespace(get_rng_state=_cpu_rng_state, set_rng_state=_set_cpu_rng_state)

    def __init__(self, real_cuda: types.ModuleType) -> None:
        self._real_cuda = real_cuda

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real_cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return CPU

    @staticmethod
    def current_stream(device: Any = None) -> _CpuStream:
        return _CpuStream()

    @staticmethod
    def default_stream(device: Any = None) -> _CpuStream:
        return _CpuStream()

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    get_rng_state = staticmethod(_cpu_rng_state)
    set_rng_state = staticmethod(_set_cpu_rng_state)
    manual_seed = staticmethod(_seed_cpu_generator)
    manual_seed_all = staticmethod(_seed_cpu_generator)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare ordinal is how torch.cuda.current_device() names a GPU.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_factory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def allocate_on_cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = CPU
            # Pinned host memory needs a CUDA runtime; it only ever served a host-to-device copy.
            kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return allocate_on_cpu


class _MegatronTorchView(types.ModuleType):
    """torch as megatron-core sees it on CPU: the real module except ``cuda`` and the tensor factories."""

    def __init__(self, real_torch: types.ModuleType) -> None:
        super().__init__("torch")
        self.__dict__["_real_torch"] = real_torch
        self.cuda = _CpuCudaView(real_torch.cuda)
        for name in _TENSOR_FACTORIES:
            setattr(self, name, _cpu_factory(getattr(real_torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_real_torch"], name)


def _type_named_as_cuda(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    real_type = torch._C.TensorBase.type
    if dtype is None and not kwargs and self.device.type == "cpu":
        return real_type(self).replace("torch.", "torch.cuda.", 1)
    return real_type(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def _cpu_tensors_named_as_cuda() -> Iterator[None]:
    if torch.Tensor.__dict__.get("type") is _type_named_as_cuda:  # a wrapped function called another one
        yield
        return
    assert "type" not in torch.Tensor.__dict__, "Tensor.type is overridden by someone else"
    torch.Tensor.type = _type_named_as_cuda
    try:
        yield
    finally:
        del torch.Tensor.type


def _with_cpu_tensors_named_as_cuda(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _cpu_tensors_named_as_cuda():
            return function(*args, **kwargs)

    return run


def _cpu_split_sizes(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return maybe_move_tensor_to_cpu


class _DropMessage(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


# ----------------------------------------------------------------------------------------------------------
# The installable object
# ----------------------------------------------------------------------------------------------------------


class MegatronCpuCompat:
    """Redirects megatron-core's CUDA call sites to the CPU while installed (see the module docstring).

    ``MegatronCpuCompat(device).install()`` ... ``.remove()``, or ``with MegatronCpuCompat(device):``.
    For a CUDA device (or ``None``/``"auto"`` on a machine with CUDA) both calls do nothing. Only one
    instance can be installed at a time; ``remove()`` puts back exactly the objects that were there.
    """

    _active: "MegatronCpuCompat | None" = None

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = resolve_device(device)
        self.enabled = needs_cpu_compat(self.device)
        self._saved: list[tuple[Any, str, Any]] = []
        self._log_filter: _DropMessage | None = None

    @classmethod
    def active_instance(cls) -> "MegatronCpuCompat | None":
        return cls._active

    @property
    def installed(self) -> bool:
        return MegatronCpuCompat._active is self

    def patched_targets(self) -> list[tuple[Any, str]]:
        """(owner, attribute) for every attribute this instance has replaced; empty when not installed."""
        return [(owner, name) for owner, name, _ in self._saved]

    def install(self) -> "MegatronCpuCompat":
        if not self.enabled or self.installed:
            return self
        if MegatronCpuCompat._active is not None:
            raise RuntimeError("another MegatronCpuCompat is installed; remove() it before installing a new one")
        for name in CALL_SITE_MODULES:
            importlib.import_module(name)
        try:
            self._bind_torch_view()
            self._patch_module_functions()
        except BaseException:
            self._restore()
            raise
        self._log_filter = _DropMessage(_RNG_WARNING)
        logging.getLogger("megatron.core.tensor_parallel.random").addFilter(self._log_filter)
        MegatronCpuCompat._active = self
        return self

    def remove(self) -> None:
        if not self.installed:
            return
        self._restore()
        from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

        # The dispatcher caches its side stream on the class; drop ours so no CPU stand-in outlives us.
        if isinstance(MoEAlltoAllTokenDispatcher.cuda_dtoh_stream, _CpuStream):
            MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None
        logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(self._log_filter)
        self._log_filter = None
        MegatronCpuCompat._active = None

    def __enter__(self) -> "MegatronCpuCompat":
        return self.install()

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    # -- internals ---------------------------------------------------------------------------------------

    def _replace(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def _restore(self) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)

    def _bind_torch_view(self) -> None:
        view = _MegatronTorchView(torch)
        for module_name, module in sorted(sys.modules.items()):
            if (
                module is not None
                and (module_name == "megatron.core" or module_name.startswith("megatron.core."))
                and module.__dict__.get("torch") is torch
            ):
                self._replace(module, "torch", view)

    def _patch_module_functions(self) -> None:
        from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
        from megatron.core.tensor_parallel import random as tp_random
        from megatron.core.transformer.moe import moe_utils, token_dispatcher

        self._replace(tp_random, "_get_cuda_rng_state", _cpu_rng_state)
        self._replace(tp_random, "_set_cuda_rng_state", _set_cpu_rng_state)

        if "te_general_gemm" not in moe_utils.__dict__:
            self._replace(moe_utils, "te_general_gemm", None)

        split_sizes = _cpu_split_sizes(moe_utils.maybe_move_tensor_to_cpu)
        self._replace(moe_utils, "maybe_move_tensor_to_cpu", split_sizes)
        self._replace(token_dispatcher, "maybe_move_tensor_to_cpu", split_sizes)

        clip = _with_cpu_tensors_named_as_cuda(clip_grads.clip_grad_by_total_norm_fp32)
        self._replace(clip_grads, "clip_grad_by_total_norm_fp32", clip)
        self._replace(optimizer, "clip_grad_by_total_norm_fp32", clip)

        build_groups = distrib_optimizer.DistributedOptimizer.__dict__["_build_model_and_main_param_groups"]
        self._replace(
            distrib_optimizer.DistributedOptimizer,
            "_build_model_and_main_param_groups",
            classmethod(_with_cpu_tensors_named_as_cuda(build_groups.__func__)),
        )
        float16_init = optimizer.Float16OptimizerWithFloat16Params.__dict__["__init__"]
        self._replace(
            optimizer.Float16OptimizerWithFloat16Params,
            "__init__",
            _with_cpu_tensors_named_as_cuda(float16_init),
        )
