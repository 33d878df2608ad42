"""The python tool: run a model-written snippet in a fresh, isolated process.

Each call gets a fresh interpreter (``python -I``: no user site, no PYTHON* variables, no
script directory on sys.path) with a minimal environment, inside a new bubblewrap sandbox
(``isolation.py``: namespaces, a read-only private root, a size-limited tmpfs working
directory, seccomp). In it, the child (``_sandbox_child.py``) lowers its resource limits and
installs an audit hook before running the snippet. This side enforces the wall-clock timeout
(killing the sandbox's PID namespace, hence every process of the call), bounds the captured
output and turns every outcome into a ``ToolResult``.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import select
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from at2po.tools.base import Tool, ToolResult, check_timeout, register_tool
from at2po.tools.isolation import CHILD_PATH, WORKDIR, Isolation, IsolationUnavailable, launch, probe

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
    (stdout keeps its start, stderr its end, where a traceback's exception is).

    Two layers contain the snippet (docs/architecture.md, "The python sandbox"): the kernel
    layer (``at2po.tools.isolation``: namespaces, a read-only private root, a ``disk_mb``
    tmpfs working directory, seccomp) and, inside it, the child's resource limits and audit
    hooks (``_sandbox_child.py``). Where the kernel layer cannot be set up, construction
    fails with what is missing, unless ``unsafe_allow_weak_isolation`` is true: then only
    the inner layer runs, in a temporary directory under ``workdir_root`` (default: the
    system temp dir).
    """

    name = "python"
    description = PYTHON_DESCRIPTION
    max_input_chars = 20000
    dedent_input = True  # keep code runnable when the whole block is indented
    # Tests switch this off to check that the kernel layer alone contains native code.
    _audit_hooks = True

    def __init__(
        self,
        timeout: float = 5.0,
        memory_mb: int = 512,
        max_output_chars: int = 2000,
        max_file_mb: int = 16,
        max_open_files: int = 64,
        # Processes and threads of one call. Memory is limited per process, so a call can
        # hold up to max_processes * memory_mb (8 GB by default).
        max_processes: int = 16,
        disk_mb: int = 64,
        workdir_root: str | Path | None = None,
        python: str = sys.executable,
        unsafe_allow_weak_isolation: bool = False,
    ) -> None:
        if os.name != "posix":
            raise RuntimeError("the python sandbox needs a POSIX system")
        self.timeout = check_timeout("tools.python.timeout", timeout)
        # Every limit is a positive integer: a zero or negative one would disable the limit (an
        # rlimit of -1 is RLIM_INFINITY) or mangle the output instead of bounding it.
        for field, value in (("memory_mb", memory_mb), ("max_output_chars", max_output_chars),
                             ("max_file_mb", max_file_mb), ("max_open_files", max_open_files),
                             ("max_processes", max_processes), ("disk_mb", disk_mb)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"python tool: {field} must be an integer >= 1, got {value!r}")
        self.memory_mb = memory_mb
        self.max_output_chars = max_output_chars
        self.max_file_mb = max_file_mb
        self.max_open_files = max_open_files
        self.max_processes = max_processes
        self.disk_mb = disk_mb
        self.workdir_root = workdir_root
        self.python = python
        try:
            self._isolation: Isolation | None = probe(python)
        except IsolationUnavailable as exc:
            if not unsafe_allow_weak_isolation:
                raise IsolationUnavailable(
                    f"the python tool cannot isolate model-written code on this host: {exc}. "
                    "Fix that, or accept running it with only in-process checks (not safe "
                    "against hostile code) by setting tools.python.unsafe_allow_weak_isolation=true"
                ) from None
            warnings.warn(
                f"python tool: running WITHOUT kernel-level isolation ({exc}); "
                "model-written code is contained only by audit hooks and resource limits",
                stacklevel=2,
            )
            self._isolation = None

    @property
    def isolated(self) -> bool:
        """Whether calls run in the kernel-level sandbox."""
        return self._isolation is not None

    def _limits(self, workdir: str) -> dict[str, object]:
        return {
            "workdir": workdir,
            "memory_bytes": self.memory_mb << 20,
            "cpu_seconds": math.ceil(self.timeout) + 1,  # backstop for the wall clock
            "file_bytes": self.max_file_mb << 20,
            "open_files": self.max_open_files,
            "processes": self.max_processes,
            "audit_hooks": self._audit_hooks,
        }

    def run(self, query: str) -> ToolResult:
        if self._isolation is None:
            return self._run_weak(query)
        return self._run_isolated(query, self._isolation)

    def _run_isolated(self, query: str, isolation: Isolation) -> ToolResult:
        started = time.monotonic()
        config = json.dumps(self._limits(WORKDIR))
        proc, sandbox_init = launch(
            isolation, self.python, ["-I", "-B", "-u", CHILD_PATH, config],
            child_source=Path(_CHILD_SCRIPT).read_bytes(),
            snippet=query.encode("utf-8", "surrogatepass"),
            disk_bytes=self.disk_mb << 20,
            env=_child_env(WORKDIR),
        )
        return self._supervise(proc, sandbox_init, started)

    def _run_weak(self, query: str) -> ToolResult:
        with tempfile.TemporaryDirectory(
            prefix="at2po-python-", dir=self.workdir_root, ignore_cleanup_errors=True
        ) as tmp:
            workdir = os.path.realpath(tmp)
            Path(workdir, "main.py").write_text(query, encoding="utf-8")
            proc = subprocess.Popen(
                [self.python, "-I", "-B", "-u", _CHILD_SCRIPT, json.dumps(self._limits(workdir))],
                cwd=workdir,
                env=_child_env(workdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group, killed as a whole
            )
            return self._supervise(proc, sandbox_init=None, started=time.monotonic())

    def _supervise(
        self, proc: subprocess.Popen[bytes], sandbox_init: int | None, started: float
    ) -> ToolResult:
        """Collect the output until exit or timeout, then make sure nothing of the call is left.

        ``sandbox_init`` is a pidfd of the sandbox's PID-namespace init: killing it makes the
        kernel kill every process in the namespace, however it was started. The timeout
        counts from ``started`` (before the sandbox was made), so that a call ends within its
        round's timeout when both are equal.
        """
        try:
            remaining = max(0.0, self.timeout - (time.monotonic() - started))
            out, err, timed_out = _collect(proc, remaining, self.max_output_chars)
        finally:
            if proc.returncode is None:  # still running (or not yet reaped): kill all
                if sandbox_init is not None:
                    _kill_and_wait(sandbox_init)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            if sandbox_init is not None:
                _kill_and_wait(sandbox_init)  # normally gone already; then this returns at once
                os.close(sandbox_init)
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()
            proc.stderr.close()
        returncode = proc.returncode
        if sandbox_init is not None and returncode > 128 and (returncode - 128) in _SIGNAL_NUMBERS:
            returncode = 128 - returncode  # bwrap reports death by signal N as exit 128 + N
        return self._result(out, err, returncode, timed_out)

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


_SIGNAL_NUMBERS = frozenset(int(sig) for sig in signal.Signals)


def _kill_and_wait(pidfd: int) -> None:
    """SIGKILL the process behind ``pidfd`` and wait (bounded) until it has exited."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return
    select.select([pidfd], [], [], 10.0)  # a pidfd turns readable when its process exits


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
