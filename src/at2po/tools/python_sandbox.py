"""The python tool: run a model-written snippet in a separate, restricted process.

Each call gets a fresh interpreter (``python -I``: no user site, no PYTHON* variables, no
script directory on sys.path) in a new session, started in a throw-away working directory
with a minimal environment. The child (``_sandbox_child.py``) lowers its resource limits and
installs an audit hook before running the snippet; see that file for what is refused. This
side enforces the wall-clock timeout (killing the whole process group), bounds the captured
output and turns every outcome into a ``ToolResult``.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from at2po.tools.base import Tool, ToolResult, register_tool

_CHILD_SCRIPT = str(Path(__file__).with_name("_sandbox_child.py"))
_SIGNAL_HINTS = {
    signal.SIGXCPU: " (CPU time limit exceeded)",
    signal.SIGXFSZ: " (file size limit exceeded)",
    signal.SIGSEGV: " (the interpreter crashed)",
}


class _Capture:
    """Keeps the first and the last ``limit`` characters of a byte stream, counting the rest."""

    def __init__(self, limit: int) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._limit = limit
        self._head = ""
        self._tail = ""  # the end of what did not fit in the head
        self.total = 0  # characters seen

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self._decoder.decode(data, final)
        self.total += len(text)
        room = self._limit - len(self._head)
        if room > 0:
            self._head += text[:room]
            text = text[room:]
        if text:
            self._tail = (self._tail + text)[-self._limit :]

    def head(self) -> str:
        """The start of the stream, with a marker when cut."""
        cut = self.total - len(self._head)
        return self._head + (f"\n...[truncated {cut} chars]" if cut else "")

    def tail(self) -> str:
        """The end of the stream (where a traceback's exception is), with a marker when cut."""
        if self.total <= self._limit:
            return self._head
        end = (self._head + self._tail)[-self._limit :]
        return f"...[truncated {self.total - self._limit} chars]\n{end}"


def _collect(
    proc: subprocess.Popen[bytes], timeout: float, limit: int
) -> tuple[_Capture, _Capture, bool]:
    """Read stdout/stderr until both close and the process exits, or the timeout passes.

    Reads as the output arrives (keeping only bounded parts), so a snippet printing without
    end can neither fill the host's memory nor block on a full pipe. Returns timed_out.
    """
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    out, err = _Capture(limit), _Capture(limit)
    captures = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    with selectors.DefaultSelector() as selector:
        for fd in captures:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out, err, True
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                captures[key.fd].feed(chunk, final=not chunk)
                if not chunk:
                    selector.unregister(key.fd)
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return out, err, True
    return out, err, False


PYTHON_DESCRIPTION = (
    "You can also run Python code by writing it within <python> </python> tags; whatever the "
    "code prints is returned to you within <result> </result> tags, so use print() to see values."
)


@register_tool()
class PythonTool(Tool):
    """Runs the query as Python source; the observation is its output.

    ``timeout`` is wall-clock seconds; output streams are cut to ``max_output_chars`` each
    (stdout keeps its start, stderr its end, where a traceback's exception is). Temporary
    working directories are made under ``workdir_root`` (default: the system temp dir).
    """

    name = "python"
    description = PYTHON_DESCRIPTION
    max_input_chars = 20000
    dedent_input = True  # keep code runnable when the whole block is indented

    def __init__(
        self,
        timeout: float = 5.0,
        memory_mb: int = 512,
        max_output_chars: int = 2000,
        max_file_mb: int = 16,
        max_open_files: int = 64,
        max_processes: int = 64,
        workdir_root: str | Path | None = None,
        python: str = sys.executable,
    ) -> None:
        if os.name != "posix":
            raise RuntimeError("the python sandbox needs a POSIX system")
        if not timeout > 0:
            raise ValueError(f"tools.python.timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.max_output_chars = max_output_chars
        self.max_file_mb = max_file_mb
        self.max_open_files = max_open_files
        self.max_processes = max_processes
        self.workdir_root = workdir_root
        self.python = python

    def run(self, query: str) -> ToolResult:
        with tempfile.TemporaryDirectory(
            prefix="at2po-python-", dir=self.workdir_root, ignore_cleanup_errors=True
        ) as tmp:
            workdir = os.path.realpath(tmp)
            Path(workdir, "main.py").write_text(query, encoding="utf-8")
            config = {
                "workdir": workdir,
                "memory_bytes": self.memory_mb << 20,
                "cpu_seconds": math.ceil(self.timeout) + 1,  # backstop for the wall clock
                "file_bytes": self.max_file_mb << 20,
                "open_files": self.max_open_files,
                "processes": self.max_processes,
            }
            proc = subprocess.Popen(
                [self.python, "-I", "-B", "-u", _CHILD_SCRIPT, json.dumps(config)],
                cwd=workdir,
                env=_child_env(workdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group, killed as a whole
            )
            try:
                out, err, timed_out = _collect(proc, self.timeout, self.max_output_chars)
            finally:
                if proc.returncode is None:  # still running (or not yet reaped): kill all
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
                assert proc.stdout is not None and proc.stderr is not None
                proc.stdout.close()
                proc.stderr.close()
        return self._result(out, err, proc.returncode, timed_out)

    def _result(self, out: _Capture, err: _Capture, returncode: int, timed_out: bool) -> ToolResult:
        sections = []
        if out.total:
            sections.append(out.head().rstrip("\n"))
        if err.total:
            sections.append("[stderr]\n" + err.tail().rstrip("\n"))
        if timed_out:
            sections.append(f"python timed out after {self.timeout:g}s (process killed)")
        elif returncode < 0:
            signum = -returncode
            try:
                name = signal.Signals(signum).name
            except ValueError:
                name = str(signum)
            sections.append(f"python was killed by signal {name}{_SIGNAL_HINTS.get(signum, '')}")
        elif returncode > 0 and not err.total:
            sections.append(f"python exited with code {returncode}")
        ok = not timed_out and returncode == 0
        return ToolResult(
            text="\n".join(sections) or "(no output)",
            ok=ok,
            error=None if ok else ("timeout" if timed_out else "exit_code"),
        )


def _child_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,  # tempfile in the snippet then works, inside the working directory
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # One thread for numeric libraries: the memory limit covers every thread's stack.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
