"""The quiet console (sapo_megatron/console.py): what reaches the terminal and what only the log file.

Each case runs a small script in a fresh interpreter, because the console replaces file descriptors 1 and 2,
``sys.stdout`` / ``sys.stderr`` and process-wide hooks, which pytest's own capture also holds."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

from sapo_megatron import console
from sapo_megatron.console import QuietConsole, log_path, run_console

REPO = Path(__file__).resolve().parents[2]

# A stand-in for a third-party library: every way such code writes.
FAKELIB = '''
import logging, os, subprocess, sys, warnings

def noise():
    print("lib-print")
    print("lib-print-stderr", file=sys.stderr)
    warnings.warn("lib-userwarning", UserWarning)
    warnings.warn("lib-deprecation", DeprecationWarning)
    logging.getLogger("fakelib").info("lib-info")
    logging.getLogger("fakelib").warning("lib-logwarning")
    os.write(1, b"lib-fd1\\n")
    os.write(2, b"lib-fd2\\n")
    subprocess.run([sys.executable, "-c", "import sys; print('child-out'); print('child-err', file=sys.stderr)"])
'''

SCRIPT = '''
import logging, os, sys, threading, warnings
import fakelib
from sapo_megatron.console import QuietConsole

warnings.simplefilter("default")
OUR_FILE = os.path.join(os.path.dirname(__import__("sapo_megatron").__file__), "trainer.py")

print("before-install")
with QuietConsole(sys.argv[1]):
    print("ours-stdout")
    print("ours-stderr", file=sys.stderr)
    fakelib.noise()
    warnings.warn_explicit("ours-userwarning", UserWarning, OUR_FILE, 1)
    logging.getLogger("sapo_megatron.somewhere").warning("ours-logwarning")
    logging.getLogger("sapo_megatron.somewhere").info("ours-info")
    def crash():
        raise ValueError("thread-boom")
    t = threading.Thread(target=crash, name="crasher")
    t.start(); t.join()
print("after-remove")
os.write(1, b"after-remove-fd1\\n")
warnings.warn("lib-after", UserWarning)
'''


def _run(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "fakelib.py").write_text(FAKELIB)
    (tmp_path / "script.py").write_text(textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(tmp_path / "script.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60,
    )


def test_ours_on_the_terminal_everything_in_the_log(tmp_path):
    log = tmp_path / "logs" / "train.log"
    proc = _run(tmp_path, SCRIPT, str(log))
    assert proc.returncode == 0, proc.stderr
    out, err, text = proc.stdout, proc.stderr, log.read_text()

    assert out.splitlines() == [
        "before-install",
        f"[console] library output, warnings and INFO lines go to {log} (--verbose shows them here)",
        "ours-stdout",
        "after-remove",
        "after-remove-fd1",
    ]
    # stderr: our line, our warning, our logger's warning, the thread's traceback; then, restored, the library's.
    assert "ours-stderr" in err and "ours-userwarning" in err and "ours-logwarning" in err
    assert "Exception in thread crasher" in err and "ValueError: thread-boom" in err
    assert "lib-after" in err
    for line in ("lib-print", "lib-userwarning", "lib-deprecation", "lib-info", "lib-logwarning", "lib-fd",
                 "child-out", "child-err", "ours-info"):
        assert line not in out and line not in err, line

    for line in ("ours-stdout", "ours-stderr", "lib-print", "lib-print-stderr", "UserWarning: lib-userwarning",
                 "DeprecationWarning: lib-deprecation", "INFO fakelib: lib-info", "WARNING fakelib: lib-logwarning",
                 "lib-fd1", "lib-fd2", "child-out", "child-err", "ours-userwarning", "ours-logwarning",
                 "INFO sapo_megatron.somewhere: ours-info", "ValueError: thread-boom"):
        assert line in text, line
    assert "after-remove" not in text and "lib-after" not in text


def test_an_exception_reaches_the_terminal_with_its_traceback(tmp_path):
    log = tmp_path / "logs" / "train.log"
    script = '''
    import sys, warnings
    import fakelib
    from sapo_megatron.console import QuietConsole

    def fail():
        fakelib.noise()
        raise RuntimeError("boom")

    with QuietConsole(sys.argv[1]):
        fail()
    '''
    proc = _run(tmp_path, script, str(log))
    assert proc.returncode == 1
    err = proc.stderr
    assert f"[error] this process stopped on RuntimeError; its full log, library output included: {log}" in err
    assert "Traceback (most recent call last):" in err and 'in fail\n    raise RuntimeError("boom")' in err
    assert err.rstrip().endswith("RuntimeError: boom")
    assert "lib-" not in err and "lib-" not in proc.stdout
    text = log.read_text()
    assert "lib-userwarning" in text and "Traceback (most recent call last):" in text and "RuntimeError: boom" in text


def test_remove_restores_the_process(tmp_path):
    """In this process (pytest's capture underneath): every hook is back after the block."""

    def state():
        root = logging.getLogger()
        return (sys.stdout, sys.stderr, warnings.showwarning, threading.excepthook, root.level, list(root.handlers),
                os.fstat(1).st_ino, os.fstat(2).st_ino)

    before = state()
    with QuietConsole(tmp_path / "x.log", announce=None):
        assert console.terminal(sys.stdout) is not sys.stdout
        assert os.fstat(1).st_ino == os.fstat(2).st_ino == (tmp_path / "x.log").stat().st_ino
    assert state() == before


def test_policy_helpers(tmp_path):
    assert log_path(tmp_path, 0) == tmp_path / "logs" / "train.log"
    assert log_path(tmp_path, 3) == tmp_path / "logs" / "train.rank3.log"
    assert isinstance(run_console(tmp_path, rank=0, world_size=2, verbose=True), contextlib.nullcontext)
    quiet = run_console(tmp_path, rank=1, world_size=2, verbose=False)
    assert isinstance(quiet, QuietConsole) and quiet.log_file == log_path(tmp_path, 1) and quiet.announce is None
    assert "train.rank<r>.log" in run_console(tmp_path, rank=0, world_size=2, verbose=False).announce
    # Not routed: the helpers leave a plain stream alone.
    plain = io.StringIO()
    assert console.terminal(plain) is plain
    console.log_only(plain, "x")
    assert plain.getvalue() == ""
    assert console.is_ours("sapo_megatron.trainer") and console.is_ours("__main__")
    assert not console.is_ours("sapo_megatron_other") and not console.is_ours("vllm.engine")
    assert not console.is_ours(None)
    assert console.is_our_file(console.__file__) and not console.is_our_file(logging.__file__)
