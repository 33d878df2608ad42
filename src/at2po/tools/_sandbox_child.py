"""Child side of the python tool's sandbox; ``python_sandbox.PythonTool`` runs this file as

    python -I -B -u _sandbox_child.py CONFIG_JSON

with the snippet in ``<workdir>/main.py``. Before the snippet runs, this script

1. lowers the resource limits (memory, CPU time, file size, open files, processes). It does so
   here rather than in a ``preexec_fn``, which is unsafe when the parent has threads (tool
   calls run in threads), and it forbids raising them again;
2. installs an audit hook (PEP 578) that refuses, with a ``PermissionError`` saying why:
   creating processes (fork, exec, spawn, system, subprocess, multiprocessing), any socket,
   ctypes, changing limits or the working directory, signalling other processes, reading
   files outside the working directory and the Python installation, and writing outside the
   working directory;
3. patches the few process/file primitives that raise no audit event in Python 3.11
   (``_posixsubprocess.fork_exec``, ``os.mknod``, ``os.mkfifo``).

This is the inner layer. It gives clear errors for the common attempts, but it is not a
boundary against a determined attacker: native code (ctypes memory access without audit
events, a hand-made extension module) or a thread racing to change a pathlib object between
its check and its use can get around it. The boundary is the kernel layer around this
process (``isolation.py``: namespaces, read-only root, seccomp), which contains such code.
"""

from __future__ import annotations

import builtins
import json
import os
import pathlib
import posix
import resource
import sys
import sysconfig
import traceback
import types
from typing import Any

PROCESS_DENIED = "sandbox: creating processes is not allowed"
NETWORK_DENIED = "sandbox: network access is not allowed"

_PROCESS_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system",
    "subprocess.Popen", "pty.spawn",
})
_DENIED_EVENTS = {
    "resource.setrlimit": "changing resource limits",
    "resource.prlimit": "changing resource limits",
    "os.chdir": "changing the working directory",
    "os.symlink": "creating symbolic links",
    "os.killpg": "signalling other processes",
    "sqlite3.enable_load_extension": "loading sqlite extensions",
    "sqlite3.load_extension": "loading sqlite extensions",
    # The gc module could reach the hook's closure; without it nothing else can.
    "gc.get_objects": "inspecting the garbage collector",
    "gc.get_referrers": "inspecting the garbage collector",
    "gc.get_referents": "inspecting the garbage collector",
}
# Events that modify the file system -> positions of their path arguments.
_WRITE_PATH_ARGS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
    "os.link": (0, 1), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
    "os.truncate": (0,), "os.chflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
}
# Events that read a path without opening it (directory listings, extended attributes).
_READ_PATH_EVENTS = frozenset({"os.listdir", "os.scandir", "os.getxattr", "os.listxattr"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_READABLE_DEVICES = ("/dev/null", "/dev/urandom", "/dev/random")
_WRITABLE_DEVICES = ("/dev/null",)
# zoneinfo reads time zones from here when the tzdata package is absent.
_EXTRA_READABLE = ("/usr/share/zoneinfo",)


def _set_limits(config: dict[str, Any]) -> None:
    cpu = config["cpu_seconds"]
    limits = {
        resource.RLIMIT_AS: (config["memory_bytes"],) * 2,
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU first, SIGKILL a second later
        resource.RLIMIT_FSIZE: (config["file_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (config["open_files"],) * 2,
        resource.RLIMIT_NPROC: (config["processes"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, (soft, hard) in limits.items():
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:  # a non-root process cannot go above it
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))


def _within(path: str, roots: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root + os.sep) for root in roots)


def _python_roots() -> tuple[str, ...]:
    """Directories (and zip files) of the Python installation that imports read from."""
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    prefixes = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    roots.update(entry for entry in sys.path if _within(entry, prefixes))
    return tuple(sorted({os.path.realpath(root) for root in roots}))


def _deny_unaudited_primitives() -> None:
    # Python 3.11 raises no audit event for these, so replace them outright.
    import _posixsubprocess

    def deny_process(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(PROCESS_DENIED)

    def deny_special_file(*args: Any, **kwargs: Any) -> None:
        raise PermissionError("sandbox: creating special files is not allowed")

    _posixsubprocess.fork_exec = deny_process
    for module in (os, posix):
        module.mknod = deny_special_file
        module.mkfifo = deny_special_file


def _install_audit_hook(workdir: str, readable_roots: tuple[str, ...]) -> None:
    # Everything the hook uses is bound here, as closure variables, so that user code cannot
    # change its decisions by patching modules or builtins afterwards (an exception inside a
    # hook aborts the audited operation, so a broken hook fails closed).
    lstat, stat, readlink = posix.lstat, posix.stat, posix.readlink
    own_pid = posix.getpid()
    _type, _str, _bytes, _int = type, str, bytes, int
    _OSError, Denied = OSError, PermissionError
    s_ifmt, s_iflnk, s_ifreg, s_ifdir = 0o170000, 0o120000, 0o100000, 0o040000
    # pathlib paths are accepted too (Path.read_text, importlib.metadata pass them); other
    # path-like objects could name one path here and another when the call converts them.
    path_types = (pathlib.PurePath, pathlib.PurePosixPath, pathlib.Path, pathlib.PosixPath)
    path_str = pathlib.PurePath.__str__
    process_events, denied_events = _PROCESS_EVENTS, dict(_DENIED_EVENTS)
    write_path_args, read_path_events = dict(_WRITE_PATH_ARGS), _READ_PATH_EVENTS
    write_flags = _WRITE_FLAGS
    readable_devices, writable_devices = _READABLE_DEVICES, _WRITABLE_DEVICES

    def as_path(obj: Any) -> str | None:
        """The path an audit argument names; None for file descriptors and None."""
        kind = _type(obj)
        if obj is None or kind is _int:
            return None
        if kind is _str:
            return obj
        if kind is _bytes:
            return obj.decode("utf-8", "surrogateescape")
        for path_type in path_types:
            if kind is path_type:
                text = path_str(obj)
                if _type(text) is _str:
                    return text
        raise Denied(f"sandbox: paths must be str, bytes or pathlib paths, not {kind.__name__}")

    def resolve(path: str) -> str:
        """Absolute path with '.', '..' and symbolic links resolved (like os.path.realpath)."""
        pending = (path if path.startswith("/") else workdir + "/" + path).split("/")[::-1]
        parts: list[str] = []
        links = 0
        while pending:
            name = pending.pop()
            if name == "" or name == ".":
                continue
            if name == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(name)
            current = "/" + "/".join(parts)
            try:
                mode = lstat(current).st_mode
            except _OSError:
                continue  # does not exist (yet)
            if mode & s_ifmt == s_iflnk:
                links += 1
                if links > 40:
                    raise Denied(f"sandbox: too many symbolic links in {path!r}")
                target = readlink(current)
                parts.pop()
                if target.startswith("/"):
                    parts.clear()
                pending.extend(target.split("/")[::-1])
        return "/" + "/".join(parts)

    def climbs_out(relative: str) -> bool:
        depth = 0
        for name in relative.split("/"):
            if name == "..":
                depth -= 1
                if depth < 0:
                    return True
            elif name and name != ".":
                depth += 1
        return False

    def under(path: str, roots: tuple[str, ...]) -> bool:
        for root in roots:
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def file_type(path: str) -> int | None:
        try:
            return stat(path).st_mode & s_ifmt
        except _OSError:
            return None

    def check_path(obj: Any, write: bool, is_open: bool) -> None:
        path = as_path(obj)
        if path is None:  # a file descriptor, or the working directory
            return
        # The working directory is fixed (chdir is refused) and no symbolic links can be
        # made, so a relative path that never climbs above its start stays inside the
        # working directory even when resolved against a dir_fd.
        if not path.startswith("/") and climbs_out(path):
            raise Denied(f"sandbox: path {path!r} leaves the working directory")
        real = resolve(path)
        if under(real, (workdir,)):
            kind = file_type(real)
            if kind is not None and kind != s_ifreg and kind != s_ifdir:
                raise Denied(f"sandbox: opening special file {path!r} is not allowed")
            return
        if write:
            if real in writable_devices:
                return
            raise Denied(f"sandbox: writing {path!r} is not allowed (only the working directory is writable)")
        if real in readable_devices:
            return
        if under(real, readable_roots):
            kind = file_type(real)
            # Directories outside the working directory may be listed but not opened:
            # a directory descriptor would let relative paths (dir_fd=...) escape.
            if not is_open or kind is None or kind == s_ifreg:
                return
        raise Denied(f"sandbox: reading {path!r} is not allowed")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            flags = args[2]
            if _type(flags) is not _int:
                raise Denied("sandbox: open() without integer flags")
            check_path(args[0], write=(flags & write_flags) != 0, is_open=True)
        elif event in read_path_events:
            check_path(args[0], write=False, is_open=False)
        elif event in write_path_args:
            for position in write_path_args[event]:
                check_path(args[position], write=True, is_open=False)
        elif event in process_events:
            raise Denied(PROCESS_DENIED)
        elif event in denied_events:
            raise Denied(f"sandbox: {denied_events[event]} is not allowed")
        elif event.startswith("socket."):
            raise Denied(NETWORK_DENIED)
        elif event.startswith("ctypes."):
            # `import ctypes` itself opens the running process (dlopen(None)); everything
            # past that (symbol lookup, foreign calls, raw memory) is refused.
            if not (event == "ctypes.dlopen" and args[0] is None):
                raise Denied("sandbox: ctypes is not allowed")
        elif event == "os.kill":
            if args[0] != own_pid:
                raise Denied("sandbox: signalling other processes is not allowed")
        elif event == "sqlite3.connect":
            database = as_path(args[0])
            if database is not None and database != ":memory:":
                if database.startswith("file:"):
                    raise Denied("sandbox: sqlite URIs are not allowed")
                check_path(database, write=True, is_open=True)
        elif event == "import":
            if args[0] == "_posixsubprocess":  # a fresh copy would bring fork_exec back
                raise Denied(PROCESS_DENIED)
        elif event.startswith("syslog."):
            raise Denied(NETWORK_DENIED)

    sys.addaudithook(hook)


def _run_user_code(filename: str) -> None:
    with open(filename, encoding="utf-8") as f:
        source = f.read()
    # A fresh __main__ module: the snippet does not see this script's globals.
    module = types.ModuleType("__main__")
    module.__builtins__ = builtins
    module.__file__ = filename
    sys.modules["__main__"] = module
    sys.argv = [filename]
    try:
        exec(compile(source, filename, "exec"), module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        _hide_sandbox_frames(report)
        sys.stderr.write("".join(report.format()))
        sys.exit(1)


def _hide_sandbox_frames(report: traceback.TracebackException) -> None:
    """Drop this file's frames (the runner, the audit hook) from a traceback report."""
    pending, seen = [report], set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        item.stack = traceback.StackSummary.from_list(
            [frame for frame in item.stack if frame.filename != __file__]
        )
        pending.extend(x for x in (item.__cause__, item.__context__) if x is not None)
        pending.extend(item.exceptions or ())


def main() -> None:
    config = json.loads(sys.argv[1])
    workdir = config["workdir"]
    _set_limits(config)
    readable_roots = _python_roots() + _EXTRA_READABLE
    # Keep only import paths the snippet may read (drops e.g. editable-install source dirs).
    sys.path[:] = [entry for entry in sys.path if _within(entry, readable_roots)]
    if config["audit_hooks"]:
        _deny_unaudited_primitives()
        _install_audit_hook(workdir, readable_roots)
    _run_user_code("main.py")  # the parent started us in workdir


if __name__ == "__main__":
    main()
