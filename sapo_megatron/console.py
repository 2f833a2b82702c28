"""The training console: our messages on the terminal, everything else in the run's log file.

A training process writes three kinds of output:

* ours: the ``[data]`` / ``[warm-up]`` / ``[resume]`` lines, the progress bar, the summary, warnings and
  log records of ``sapo_megatron`` code, tracebacks;
* third-party Python output: logging records (vLLM's INFO lines, its tcmalloc hints), ``warnings.warn``
  (Apex / Transformer Engine fallbacks, deprecations), prints and progress bars of libraries;
* output below Python: C++ (torch's NUMA-binding note) and child processes.

:class:`QuietConsole` keeps the first kind on the terminal and sends all three to the log file. It works at
two levels, because the third kind never passes through Python:

* file descriptors 1 and 2 of the process are pointed at the log file (``dup2``), so C++ code and children
  write there; the terminal survives as two duplicated descriptors that only this object writes to;
* ``sys.stdout`` / ``sys.stderr`` become routers that decide per write: when the nearest caller outside the
  printing machinery (logging, warnings, tqdm, traceback, threading) is a ``sapo_megatron`` module or
  ``__main__``, the text goes to the terminal and the log, otherwise to the log only;
* ``warnings.showwarning`` decides by the file the warning is attributed to (ours: terminal and log);
* the root logger passes INFO and above of every library to the log file, and ``sapo_megatron`` records of
  WARNING and above to the terminal (as Python's last-resort handler did before);
* an uncaught exception in a thread and a fatal signal (faulthandler) print on the terminal and in the log.

Everything is undone by :meth:`QuietConsole.remove` (or leaving the ``with`` block); nothing happens at import.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional, TextIO

_PACKAGE = __name__.split(".")[0]
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# Modules that only carry text on behalf of a caller: a write is attributed to the first frame outside them.
_MACHINERY = frozenset({"logging", "warnings", "tqdm", "traceback", "threading", "codecs", "contextlib"})


def log_path(run_dir: str | os.PathLike, rank: int) -> Path:
    """Where a training rank's log goes: ``<run_dir>/logs/train.log`` for rank 0, ``train.rank<r>.log`` else."""
    name = "train.log" if rank == 0 else f"train.rank{rank}.log"
    return Path(run_dir) / "logs" / name


def run_console(
    run_dir: str | os.PathLike, *, rank: int, world_size: int, verbose: bool
) -> contextlib.AbstractContextManager:
    """The console policy of a training rank: quiet (:class:`QuietConsole`; rank 0 says where the logs go), or
    unchanged when ``verbose``."""
    if verbose:
        return contextlib.nullcontext()
    where = str(log_path(run_dir, 0))
    if world_size > 1:
        where += f" (rank r > 0: {log_path(run_dir, 1).with_name('train.rank<r>.log').name})"
    return QuietConsole(log_path(run_dir, rank), announce=where if rank == 0 else None)


def terminal(stream: TextIO) -> TextIO:
    """The terminal behind ``stream`` when a :class:`QuietConsole` routes it, else ``stream`` itself: for output
    that is ours by construction and would only clutter the log, such as a progress bar's redraws."""
    return stream.terminal if isinstance(stream, _Router) and stream.active else stream


def log_only(stream: TextIO, line: str) -> None:
    """Writes ``line`` to the log file when ``stream`` is routed by a :class:`QuietConsole`; else nothing."""
    if isinstance(stream, _Router) and stream.active:
        stream.log.write(line.rstrip("\n") + "\n")


def is_ours(module: Optional[str]) -> bool:
    return module is not None and (module == "__main__" or module == _PACKAGE or module.startswith(_PACKAGE + "."))


def writer_module(frame) -> Optional[str]:
    """The module of the first frame from ``frame`` outwards that is not printing machinery, or None."""
    while frame is not None:
        name = frame.f_globals.get("__name__")
        if name is None or (name.partition(".")[0] not in _MACHINERY and name != __name__):
            return name
        frame = frame.f_back
    return None


def is_our_file(filename: str) -> bool:
    """Whether a warning attributed to ``filename`` is about our code (the package, or the script being run)."""
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR):
        return True
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is not None and path == os.path.abspath(main_file)


class _Router:
    """Stands in for ``sys.stdout`` or ``sys.stderr`` while a :class:`QuietConsole` is installed.

    Libraries keep references to the stream they found at import time (vLLM's and transformers' log handlers),
    so after :meth:`deactivate` a router passes everything to the stream it replaced, which by then writes to
    the terminal again."""

    def __init__(self, replaced: TextIO, terminal: TextIO, log: TextIO):
        self.replaced = replaced
        self.terminal = terminal
        self.log = log
        self.active = True

    def deactivate(self) -> None:
        self.active = False

    def write(self, text: str) -> int:
        if not self.active:
            return self.replaced.write(text)
        if is_ours(writer_module(sys._getframe(1))):
            self.terminal.write(text)
        self.log.write(text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.active:
            self.replaced.flush()
            return
        for stream in (self.terminal, self.log):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()

    def isatty(self) -> bool:
        # What reaches this stream from libraries lands in the log file: no colours, no cursor control.
        return False if self.active else self.replaced.isatty()

    def fileno(self) -> int:
        # Descriptor 1 or 2, which points at the log file while active.
        return self.replaced.fileno()

    def __getattr__(self, name):  # encoding, errors, buffer, name, mode, closed, ...
        return getattr(self.replaced, name)


def _text_stream(fd: int, encoding: str) -> io.TextIOWrapper:
    # Flushed at every newline or carriage return: our lines, library lines and C++ lines keep their order, and
    # a progress bar's redraws show at once.
    return io.TextIOWrapper(io.BufferedWriter(io.FileIO(fd, "w", closefd=True)), encoding=encoding,
                            errors="backslashreplace", line_buffering=True, write_through=True)


class _OursFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_ours(record.name)


class QuietConsole:
    """Sends third-party output of this process to ``log_file`` and keeps ours on the terminal (module docstring).

    Use as a context manager, or :meth:`install` / :meth:`remove`. An exception that leaves the ``with`` block
    is written to the log, and the terminal is told where the log is; the traceback itself is printed by
    whoever handles the exception (the interpreter, for an uncaught one), after the terminal is restored.
    ``announce``: where the logs go, said in one line on the terminal (rank 0 of a job; the others pass None).
    """

    def __init__(self, log_file: str | os.PathLike, *, announce: Optional[str] = ""):
        self.log_file = Path(log_file)
        self.announce = str(self.log_file) if announce == "" else announce
        self._installed = False

    # -- install / remove ---------------------------------------------------------------------------------

    def install(self) -> "QuietConsole":
        assert not self._installed, "QuietConsole installed twice"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        log_fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.log = _text_stream(log_fd, "utf-8")
        self.terminal_out = _text_stream(os.dup(1), encoding)
        self.terminal_err = _text_stream(os.dup(2), encoding)
        self.log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}\n")
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)

        self._replaced = (sys.stdout, sys.stderr)
        self._routers = (
            _Router(sys.stdout, self.terminal_out, self.log),
            _Router(sys.stderr, self.terminal_err, self.log),
        )
        sys.stdout, sys.stderr = self._routers

        self._showwarning = warnings.showwarning
        warnings.showwarning = self._show_warning

        root = logging.getLogger()
        self._root_level = root.level
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)
        self._log_handler = logging.StreamHandler(self.log)
        self._log_handler.setLevel(logging.INFO)
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        # Without a handler of its own, a record would have reached the terminal through Python's last-resort
        # handler (WARNING and above, the bare message); ours still do.
        self._terminal_handler = logging.StreamHandler(self.terminal_err)
        self._terminal_handler.setLevel(logging.WARNING)
        self._terminal_handler.addFilter(_OursFilter())
        root.addHandler(self._log_handler)
        root.addHandler(self._terminal_handler)

        self._thread_excepthook = threading.excepthook
        threading.excepthook = self._thread_exception
        self._faulthandler_was_enabled = faulthandler.is_enabled()
        faulthandler.enable(file=self.terminal_err, all_threads=True)

        self._installed = True
        if self.announce:
            self.terminal_out.write(
                f"[console] library output, warnings and INFO lines go to {self.announce} (--verbose shows them here)\n"
            )
        return self

    def remove(self) -> None:
        if not self._installed:
            return
        self._installed = False
        for router in self._routers:
            router.flush()
        if faulthandler.is_enabled():
            faulthandler.disable()
        if self._faulthandler_was_enabled:  # its earlier file is not known: the restored stderr is the best guess
            with contextlib.suppress(Exception):
                faulthandler.enable(file=self._replaced[1], all_threads=True)
        threading.excepthook = self._thread_excepthook
        root = logging.getLogger()
        root.removeHandler(self._log_handler)
        root.removeHandler(self._terminal_handler)
        root.setLevel(self._root_level)
        warnings.showwarning = self._showwarning
        sys.stdout, sys.stderr = self._replaced
        for router in self._routers:
            router.deactivate()
        os.dup2(self.terminal_out.fileno(), 1)
        os.dup2(self.terminal_err.fileno(), 2)
        for stream in (self.terminal_out, self.terminal_err, self.log):
            stream.close()

    def __enter__(self) -> "QuietConsole":
        return self.install()

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                self.log.write("".join(traceback.format_exception(exc_type, exc, tb)))
                self.terminal_err.write(
                    f"[error] this process stopped on {exc_type.__name__}; its full log, library output included: "
                    f"{self.log_file}\n"
                )
        finally:
            self.remove()
        return False

    # -- hooks ----------------------------------------------------------------------------------------------

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        if file is not None:  # the caller chose the destination
            with contextlib.suppress(OSError, ValueError):
                file.write(text)
            return
        if is_our_file(filename):
            self.terminal_err.write(text)
        self.log.write(text)

    def _thread_exception(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        text = f"Exception in thread {name}:\n" + "".join(
            traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
        )
        self.terminal_err.write(text)
        self.log.write(text)


class Progress:
    """One line per step on the driver: step, reward, loss and the step-time breakdown."""

    def __init__(self, total: int, done: int, *, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.bar = None
        if enabled:
            from tqdm import tqdm

            # The bar's redraws go to the terminal only; the log gets one plain line per step instead.
            self.bar = tqdm(
                total=total, initial=done, desc="sapo", unit="step", dynamic_ncols=True, file=terminal(sys.stdout)
            )

    def update(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        parts = {
            "reward": f"{m.get('reward/mean', float('nan')):.3f}",
            "loss": f"{m.get('loss/loss', float('nan')):+.4f}",
            "t(roll/old/upd/sync)": "/".join(
                f"{m.get(f'time/{k}', 0.0):.1f}" for k in ("rollout", "old_logprob", "update", "sync")
            ),
        }
        if "reward/val_mean" in m:
            parts["val"] = f"{m['reward/val_mean']:.3f}"
        self.bar.set_postfix(parts, refresh=False)
        self.bar.update(1)
        log_only(sys.stdout, f"[step {step}/{self.total}] " + ", ".join(f"{k}={v}" for k, v in parts.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

