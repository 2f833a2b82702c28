"""Per-token log-probs (+ entropy) from vocab-parallel logits: sapo_megatron vs megatron-core's stock path.

    python tools/bench_logprobs.py [--tokens 2048] [--vocab 151936] [--repeats 5] [--threads 1]

TP=1, in-process: a one-rank gloo group and megatron-core's ``parallel_state`` for the stock path.

Peak extra memory: each (scenario, implementation) runs forward + backward once in a fresh subprocess, so
that memory freed by one variant cannot hide another's peak. It is the resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` once the logits exist) minus the resident set at that
moment. torch on CPU has no caching allocator, so the resident set follows the live tensors. The
gradient w.r.t. the logits is still alive when the peak is read and counts for every variant (the stock
path writes it into the logits' storage; ours does so only with ``inplace_backward=True``).

Time: one more subprocess per scenario runs the implementations in turn, ``--repeats`` rounds, and reports
the median wall time and the median CPU time of forward + backward. Alternating the implementations
within one process keeps a change in machine load from favouring one of them; CPU time is less
sensitive to other processes than wall time.

The logits come from a stand-in for the output layer (``hidden @ W.T``, hidden size 32): a non-leaf tensor
that its producer does not keep, as in the actor. Its backward only receives the gradient w.r.t. the
logits, so the time and memory measured are those of the log-prob path, including what autograd does
between it and the output layer (e.g. the backward of the stock path's in-place temperature division).

Scenarios:
  logprobs          fp32 logits, log-probs only.
                    stock: ``-tensor_parallel.vocab_parallel_cross_entropy(logits, target)``; for fp32 logits
                    it overwrites them in place with their softmax and then with their gradient.
  logprobs+entropy  fp32 logits, temperature T, log-probs and entropy.
                    stock, the way RL frameworks on megatron-core do it (verl's megatron actor):
                    ``logits.div_(T)``; ``logits.clone()`` for the cross entropy (it destroys its input);
                    entropy from an explicit softmax of the shard (verl's ``_VocabParallelEntropy``:
                    ``exp(logits - max)``, normalised in place, kept for backward with the logits).
                    verl fuses ``sum(p * logits)`` with ``torch.compile`` so that no [tokens, vocab]
                    product is materialised; here that reduction runs over blocks of 64 rows, which
                    materialises none either (a batched matmul would not, but fp32 BLAS dot products over
                    151,936 terms were off by ~3e-3 in the entropy).
  logprobs-bf16     bf16 logits, log-probs only. stock: ``vocab_parallel_cross_entropy`` upcasts to a full
                    fp32 copy and keeps it for backward.
Implementations: ``stock``; ``ours`` (``vocab_parallel_logprobs`` defaults); ``ours-inplace``
(``inplace_backward=True``: the gradient reuses the logits' storage, as the stock path's does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SCENARIOS = ("logprobs", "logprobs+entropy", "logprobs-bf16")
IMPLS = ("stock", "ours", "ours-inplace")
HIDDEN = 32


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens (rows of the logits)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen3: 151936)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per scenario (medians reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the entropy scenario")
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk for ours (default: automatic)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ", ".join(SCENARIOS))
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ", ".join(IMPLS))
    p.add_argument("--worker", nargs=3, metavar=("MODE", "SCENARIO", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, allowed in (("scenarios", SCENARIOS), ("impls", IMPLS)):
        chosen = [s for s in getattr(args, name).split(",") if s]
        bad = sorted(set(chosen) - set(allowed))
        if bad or not chosen:
            p.error(f"--{name}: unknown {bad}; choose from {', '.join(allowed)}")
        setattr(args, name, chosen)
    if args.tokens < 1 or args.vocab < 2 or args.repeats < 1 or args.threads < 1 or args.temperature <= 0:
        p.error("--tokens, --repeats and --threads must be >= 1, --vocab >= 2, --temperature > 0")
    if args.chunk_size is not None and args.chunk_size < 1:
        p.error("--chunk-size must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------- worker --


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Sets the resident-set high-water mark to the current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Returns freed heap memory to the OS, so that the resident set is the memory in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _stock_entropy_cls():
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    class StockVocabParallelEntropy(torch.autograd.Function):
        """verl's ``_VocabParallelEntropy``: an explicit softmax of the shard, kept for backward."""

        @staticmethod
        def forward(ctx, logits):
            group = mpu.get_tensor_model_parallel_group()
            logits_max = logits.max(dim=-1, keepdim=True).values
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
            softmax = (logits - logits_max).exp_()
            sum_exp = softmax.sum(dim=-1, keepdim=True)
            dist.all_reduce(sum_exp, group=group)
            softmax.div_(sum_exp)
            sum_p_logits = torch.empty_like(logits_max)
            for start in range(0, logits.shape[0], 64):
                rows = slice(start, start + 64)
                torch.sum(softmax[rows] * logits[rows], dim=-1, keepdim=True, out=sum_p_logits[rows])
            dist.all_reduce(sum_p_logits, group=group)
            entropy = logits_max + sum_exp.log() - sum_p_logits
            ctx.save_for_backward(logits, softmax, sum_p_logits)
            return entropy.squeeze(-1)

        @staticmethod
        def backward(ctx, grad_output):
            logits, softmax, sum_p_logits = ctx.saved_tensors
            logits.sub_(sum_p_logits)
            softmax.mul_(logits)
            softmax.mul_(grad_output.unsqueeze(-1))
            logits.add_(sum_p_logits)
            softmax.mul_(-1)
            return softmax

    return StockVocabParallelEntropy


def _output_layer_cls():
    import torch

    class OutputLayer(torch.autograd.Function):
        """Stands in for the actor's output layer: makes the logits (``hidden @ W.T``) in forward; its
        backward receives the gradient w.r.t. them (through whatever the log-prob path did to them, e.g.
        an in-place temperature division) and hands it to ``sink`` instead of multiplying it further."""

        @staticmethod
        def forward(ctx, anchor, hidden, weight, dtype, sink):
            ctx.sink = sink
            logits = hidden @ weight.T
            return logits.to(dtype) if dtype != logits.dtype else logits

        @staticmethod
        def backward(ctx, grad):
            ctx.sink.append(grad)
            return torch.zeros(()), None, None, None, None

    return OutputLayer


class _Bench:
    """Inputs of one scenario and forward + backward of each implementation on them."""

    def __init__(self, args, scenario, impls):
        import torch

        torch.set_num_threads(args.threads)
        self.torch = torch
        self.args = args
        if "stock" in impls:
            import torch.distributed as dist
            from megatron.core import parallel_state, tensor_parallel

            from sapo_megatron.launch import free_port

            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
            self.stock_cross_entropy = tensor_parallel.vocab_parallel_cross_entropy
            self.stock_entropy = _stock_entropy_cls()
        if any(impl != "stock" for impl in impls):
            from sapo_megatron.actor.logprobs import vocab_parallel_logprobs

            self.ours = vocab_parallel_logprobs
        n, v = args.tokens, args.vocab
        self.dtype = torch.bfloat16 if scenario == "logprobs-bf16" else torch.float32
        self.temperature = args.temperature if scenario == "logprobs+entropy" else 1.0
        self.with_entropy = scenario == "logprobs+entropy"
        gen = torch.Generator().manual_seed(1234)
        self.output_layer = _output_layer_cls()
        self.anchor = torch.zeros((), requires_grad=True)
        self.grad_sink = []
        self.hidden = torch.randn(n, HIDDEN, generator=gen)
        self.weight = torch.randn(v, HIDDEN, generator=gen) * (2.0 / HIDDEN**0.5)
        self.target = torch.randint(0, v, (n,), generator=gen)
        self.grad_lp = torch.randn(n, generator=gen)
        self.grad_ent = torch.randn(n, generator=gen)

    def logits(self, rows=slice(None)):
        return self.output_layer.apply(self.anchor, self.hidden[rows], self.weight, self.dtype, self.grad_sink)

    def fwd_bwd(self, impl, logits, rows=slice(None)):
        """Returns (log-probs, entropy or None, gradient w.r.t. logits)."""
        target = self.target[rows]
        if impl == "stock":
            if self.with_entropy:
                logits.div_(self.temperature)
                logits_for_ce = logits.clone()
                entropy = self.stock_entropy.apply(logits)
            else:
                logits_for_ce, entropy = logits, None
            logprobs = -self.stock_cross_entropy(logits_for_ce, target)
        else:
            logprobs, entropy = self.ours(
                logits,
                target,
                temperature=self.temperature,
                with_entropy=self.with_entropy,
                chunk_size=self.args.chunk_size,
                inplace_backward=impl == "ours-inplace",
            )
        loss = (logprobs * self.grad_lp[rows]).sum()
        if entropy is not None:
            loss = loss + (entropy * self.grad_ent[rows]).sum()
        self.torch.autograd.grad(loss, self.anchor)
        grad = self.grad_sink.pop()
        return logprobs.detach(), None if entropy is None else entropy.detach(), grad

    def warm_up(self, impl):
        # Two tokens: the first call of each kernel maps code pages of libtorch, which would otherwise
        # count as resident memory of the measured run.
        self.fwd_bwd(impl, self.logits(slice(0, 2)), slice(0, 2))


def _memory_worker(args, scenario, impl, out_path) -> None:
    bench = _Bench(args, scenario, [impl])
    bench.warm_up(impl)
    logits = bench.logits()
    _malloc_trim()
    baseline = _status_kib("VmRSS")
    have_reset = _reset_peak_rss()
    logprobs, entropy, grad = bench.fwd_bwd(impl, logits)
    peak_extra_kib = _status_kib("VmHWM") - baseline  # read while the gradient is alive
    bench.torch.save(
        {"logprobs": logprobs, "entropy": entropy, "grad_rows": grad[:8].detach().float().clone()},
        out_path + ".pt",
    )
    with open(out_path, "w") as f:
        json.dump({"peak_extra_mib": peak_extra_kib / 1024 if have_reset else None}, f)


def _timing_worker(args, scenario, out_path) -> None:
    bench = _Bench(args, scenario, args.impls)
    for impl in args.impls:
        bench.warm_up(impl)
    times = {impl: {"wall": [], "cpu": []} for impl in args.impls}
    for _ in range(args.repeats):
        for impl in args.impls:
            logits = bench.logits()  # new every time: the stock path overwrites them
            wall, cpu = time.perf_counter(), time.process_time()
            out = bench.fwd_bwd(impl, logits)
            times[impl]["wall"].append(time.perf_counter() - wall)
            times[impl]["cpu"].append(time.process_time() - cpu)
            del logits, out
    result = {impl: {k: statistics.median(v) for k, v in t.items()} for impl, t in times.items()}
    with open(out_path, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------------- parent --


def _spawn(args, mode, scenario, out, impls=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, scenario, out]
    cmd += ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads), "--temperature", str(args.temperature)]
    cmd += ["--impls", ",".join(impls or args.impls)]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {scenario} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    with open(out) as f:
        return json.load(f)


def _max_diff(a, b):
    if a is None or b is None:
        return None
    return float((a.double() - b.double()).abs().max())


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> None:
    args = _parse(argv)
    if args.worker:
        mode, scenario, out = args.worker
        if mode == "memory":
            (impl,) = args.impls
            _memory_worker(args, scenario, impl, out)
        else:
            _timing_worker(args, scenario, out)
        return

    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"tokens={args.tokens} vocab={args.vocab} repeats={args.repeats} threads={args.threads} "
          f"temperature(logprobs+entropy)={args.temperature} chunk_size={args.chunk_size or 'auto'}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {cpu}, {os.cpu_count()} cpus")
    ref = args.impls[0]
    header = (
        f"{'scenario':<17} {'impl':<13} {'logits MiB':>10} {'peak extra MiB':>14} {'wall s':>7} {'cpu s':>7} "
        f"{'mem stock/ours':>14} {'wall ours/stock':>15} {'cpu ours/stock':>14}  max|diff| vs {ref}: lp, ent, grad"
    )
    print(header)
    print("-" * len(header), flush=True)
    with tempfile.TemporaryDirectory() as tmpdir:
        for scenario in args.scenarios:
            mem, outs = {}, {}
            for impl in args.impls:
                path = os.path.join(tmpdir, f"{scenario}-{impl}.json")
                mem[impl] = _spawn(args, "memory", scenario, path, [impl])["peak_extra_mib"]
                outs[impl] = torch.load(path + ".pt")
            timing = _spawn(args, "timing", scenario, os.path.join(tmpdir, f"{scenario}-timing.json"))
            element = 2 if scenario == "logprobs-bf16" else 4
            for impl in args.impls:
                stock = "stock" in args.impls and impl != "stock"
                mem_ratio = (mem["stock"] / mem[impl] if stock and mem[impl] and mem["stock"] is not None else None)
                wall_ratio = timing[impl]["wall"] / timing["stock"]["wall"] if stock else None
                cpu_ratio = timing[impl]["cpu"] / timing["stock"]["cpu"] if stock else None
                diffs = [_max_diff(outs[impl][k], outs[ref][k]) for k in ("logprobs", "entropy", "grad_rows")]
                print(f"{scenario:<17} {impl:<13} {args.tokens * args.vocab * element / 2**20:>10.0f} "
                      f"{_fmt(mem[impl], '.0f'):>14} {timing[impl]['wall']:>7.3f} {timing[impl]['cpu']:>7.3f} "
                      f"{_fmt(mem_ratio, '.1f'):>14} {_fmt(wall_ratio, '.2f'):>15} {_fmt(cpu_ratio, '.2f'):>14}  "
                      + ", ".join(_fmt(d, '.1e') for d in diffs), flush=True)


if __name__ == "__main__":
    main()
