"""Kernel-level isolation of the python tool: bubblewrap namespaces plus a seccomp filter.

Every call runs in a fresh sandbox made by ``bwrap`` (bubblewrap):

* new user, mount, PID, network, IPC, UTS (and, where supported, cgroup) namespaces: the
  network namespace has nothing but its own loopback device (no route to the host or
  anywhere), the PID namespace shows only the sandbox's own processes, and the sandbox's
  ``/proc`` is a fresh procfs of that namespace;
* a private root (a tmpfs made read-only) holding only ``/usr`` (with the usual ``/bin``,
  ``/lib`` links), the interpreter's installation (stdlib and site-packages, read-only: the
  snippet may import numpy but cannot plant files there), a minimal read-only ``/dev`` and a
  size-limited writable tmpfs ``/sandbox`` that is the working directory and ``$HOME``;
* uid/gid 65534 (nobody), no supplementary groups, no capabilities. When the host process
  is root, the sandbox is uid 65534 on the host too (a user namespace made per call with
  util-linux's ``unshare``), so RLIMIT_NPROC holds (the kernel exempts root from it) and host
  files and processes are foreign to it; otherwise it is the host user, as bwrap maps it;
* a seccomp filter (built with libseccomp, handed to bwrap as a compiled BPF program) that
  refuses the system calls no snippet needs: tracing and reading other processes' memory,
  pidfd signalling, mounting, namespaces, kernel keyrings, BPF, perf, io_uring, modules,
  clocks, and sockets other than AF_UNIX (see ``DENIED_SYSCALLS``);
* every process inside runs under the filter, bwrap's own init (PID 1) included;
* the sandbox dies with its parent, and killing its PID-namespace init kills every process
  in it, so nothing outlives the call.

``probe()`` checks once per process that all of this works here and says what is missing
when it does not.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

SANDBOX_UID = 65534  # "nobody": no file on the host is owned by it
WORKDIR = "/sandbox"  # the snippet's writable working directory inside the sandbox
CHILD_PATH = "/at2po/sandbox_child.py"  # where the child script is placed inside

# System calls refused with EPERM: none is needed to compute and print, each is a route out
# of the sandbox or into the kernel's less-trodden paths.
DENIED_SYSCALLS = (
    # other processes: tracing, reading/writing their memory, pidfd signals and fd theft
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    # file systems and namespaces
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init", "quotactl", "acct",
    # kernel facilities a snippet never needs
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "syslog", "vhangup", "iopl", "ioperm",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname", "lookup_dcookie",
)
# clone() flags that would create namespaces (the clone3 call is refused as a whole: its
# flags live in memory, where seccomp cannot look, and libc falls back to clone on ENOSYS).
_CLONE_NAMESPACE_FLAGS = (
    0x00000080,  # CLONE_NEWTIME
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
_AF_UNIX = 1
_TIOCSTI = 0x5412  # push characters into a terminal's input


class IsolationUnavailable(ValueError):
    """The kernel-level sandbox cannot be set up on this host; the message says why.

    A ValueError, like a bad config value, so the CLI reports it in one line."""


def _seccomp_module():
    # libseccomp's own binding (Debian: python3-seccomp) when present, else pyseccomp from
    # PyPI, a ctypes binding with the same API over the system's libseccomp.
    try:
        import seccomp  # type: ignore[import-not-found]
    except ImportError:
        try:
            import pyseccomp as seccomp  # type: ignore[import-not-found,no-redef]
        except (ImportError, RuntimeError) as exc:  # RuntimeError: libseccomp.so not found
            raise IsolationUnavailable(
                f"no libseccomp binding ({exc}); install it with `pip install pyseccomp` "
                "(part of at2po[agent]) and the library with `apt install libseccomp2`"
            ) from None
    return seccomp


@functools.lru_cache(maxsize=1)
def seccomp_program() -> bytes:
    """The compiled BPF program of the filter (the format bwrap's ``--seccomp`` reads)."""
    sc = _seccomp_module()
    deny = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(sc.ALLOW)  # other architectures' calls (x32, i386) kill the process
    for name in DENIED_SYSCALLS:
        f.add_rule(deny, name)
    for flag in _CLONE_NAMESPACE_FLAGS:
        f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(deny, "socket", sc.Arg(0, sc.NE, _AF_UNIX))
    f.add_rule(deny, "socketpair", sc.Arg(0, sc.NE, _AF_UNIX))
    f.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, _TIOCSTI))
    fd = os.memfd_create("at2po-seccomp")
    try:
        with open(fd, "wb", closefd=False) as out:
            f.export_bpf(out)
        os.lseek(fd, 0, os.SEEK_SET)
        return _read_all(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def data_fd(data: bytes, name: str) -> int:
    """A memory-backed file descriptor holding ``data``, positioned at its start (for bwrap's
    ``--file``, ``--ro-bind-data`` and ``--seccomp``, which read their argument from an fd)."""
    fd = os.memfd_create(name)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _root_binds(python: str) -> list[str]:
    """bwrap arguments for the read-only part of the root: /usr, its links, the interpreter."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    # The interpreter's installation: prefixes outside /usr (pyenv, conda, venvs) and the
    # directory of the (resolved) executable.
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    roots.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    for root in sorted(roots):
        if root != "/" and not (root == "/usr" or root.startswith("/usr/")):
            args += ["--ro-bind", root, root]
    # A venv's bin/python is a link to the base interpreter; keep its path valid inside.
    exe_dir = os.path.dirname(os.path.abspath(python))
    if not any(exe_dir == r or exe_dir.startswith(r + "/") for r in roots | {"/usr"}):
        args += ["--ro-bind", exe_dir, exe_dir]
    return args


@dataclass(frozen=True)
class Isolation:
    """How sandboxes are made on this host (see ``probe``)."""

    bwrap: str
    # On a root host, the path of util-linux's `unshare`: each call's user namespace is made
    # with it and owned by uid 65534, so that the sandbox's processes are not root on the
    # host (for the kernel, RLIMIT_NPROC limits nothing for root). None: bwrap makes it.
    unshare: str | None


def _user_namespace(unshare: str) -> int:
    """A new user namespace owned by uid 65534, mapping 65534 and root onto themselves.

    65534 is the sandbox's uid; root is mapped so that bwrap (running as 65534, with
    capabilities in this namespace only) can reach bind-mount sources under root-only
    directories such as /root/.pyenv. The sandbox itself never holds those capabilities.
    """
    helper = subprocess.Popen(
        [unshare, "--user", "sh", "-c", "echo ready && exec cat"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        user=SANDBOX_UID, group=SANDBOX_UID, extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"},
    )
    assert helper.stdin is not None and helper.stdout is not None and helper.stderr is not None
    try:
        if helper.stdout.readline() != b"ready\n":
            helper.wait()
            detail = helper.stderr.read().decode(errors="replace").strip() or f"exit code {helper.returncode}"
            raise IsolationUnavailable(f"`unshare --user` failed: {detail}")
        mapping = f"0 0 1\n{SANDBOX_UID} {SANDBOX_UID} 1\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{helper.pid}/{name}", "w") as f:
                f.write(mapping)
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        helper.stdin.close()  # cat exits; the namespace lives on in the returned descriptor
        helper.wait()
        helper.stdout.close()
        helper.stderr.close()


def launch(
    isolation: Isolation,
    python: str,
    argv: list[str],
    *,
    child_source: bytes,
    snippet: bytes,
    disk_bytes: int,
    env: dict[str, str],
) -> tuple[subprocess.Popen[bytes], int | None]:
    """Start ``python argv...`` in a fresh sandbox with ``snippet`` as ``WORKDIR/main.py`` and
    ``child_source`` as ``CHILD_PATH``; stdout and stderr are pipes.

    Returns the bwrap process and a pidfd of the sandbox's PID-namespace init (None when bwrap
    failed before starting it): SIGKILL to it ends every process of the sandbox.
    """
    fds: list[int] = []
    info_read = -1
    try:
        seccomp = data_fd(seccomp_program(), "at2po-seccomp")
        fds.append(seccomp)
        child = data_fd(child_source, "at2po-child")
        fds.append(child)
        main = data_fd(snippet, "at2po-snippet")
        fds.append(main)
        info_read, info_write = os.pipe()
        fds.append(info_write)
        if isolation.unshare is not None:
            userns_fd = _user_namespace(isolation.unshare)
            fds.append(userns_fd)
            userns = ["--userns", str(userns_fd)]
            ids: dict = {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}
        else:
            userns = ["--unshare-user", "--disable-userns",
                      "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
            ids = {}
        cmd = [
            isolation.bwrap,
            *userns,
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            *_root_binds(python),
            "--proc", "/proc",
            "--dev", "/dev",
            "--remount-ro", "/dev",  # its tmpfs (and /dev/shm) would be writable without a size limit
            "--size", str(disk_bytes), "--perms", "0700", "--tmpfs", WORKDIR,
            "--ro-bind-data", str(child), CHILD_PATH,
            "--file", str(main), WORKDIR + "/main.py",
            "--remount-ro", "/",
            "--chdir", WORKDIR,
            "--seccomp", str(seccomp),
            "--info-fd", str(info_write),
            "--clearenv",
        ]
        for key, value in env.items():
            cmd += ["--setenv", key, value]
        cmd += ["--", python, *argv]
        proc = subprocess.Popen(
            cmd,
            # bwrap becomes the sandbox's init, whose /proc entries the snippet can read:
            # give it nothing of the host's environment or working directory.
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            **ids,
        )
    except BaseException:
        if info_read >= 0:
            os.close(info_read)
        raise
    finally:
        for fd in fds:  # the child has its copies
            os.close(fd)
    with os.fdopen(info_read, "rb") as info:
        return proc, _init_pidfd(info.read())


def _init_pidfd(info: bytes) -> int | None:
    """A pidfd of the sandbox's init, named by bwrap's --info-fd JSON."""
    try:
        pid = json.loads(info or b"{}").get("child-pid")
        return os.pidfd_open(pid) if isinstance(pid, int) else None
    except (ValueError, OSError):  # bwrap failed first, or the sandbox is already gone
        return None


_USERNS_HINT = (" (user namespaces may be disabled: check the sysctls user.max_user_namespaces and "
                "kernel.unprivileged_userns_clone, or the container's seccomp/AppArmor profile)")


@functools.lru_cache(maxsize=None)
def probe(python: str) -> Isolation:
    """Check once that a sandbox starts here and runs ``python``; raise IsolationUnavailable
    naming what is missing."""
    if not sys.platform.startswith("linux"):
        raise IsolationUnavailable(f"the kernel-level sandbox needs Linux (this is {sys.platform})")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise IsolationUnavailable(
            "bubblewrap (`bwrap`) is not installed; Debian/Ubuntu: `apt install bubblewrap`"
        )
    unshare = None
    if os.geteuid() == 0:
        unshare = shutil.which("unshare")
        if unshare is None:
            raise IsolationUnavailable("util-linux's `unshare` is not installed; Debian/Ubuntu: `apt install util-linux`")
    isolation = Isolation(bwrap=bwrap, unshare=unshare)
    check = f"import os; print(os.getuid(), os.getgid(), os.getgroups(), open('{WORKDIR}/main.py').read())"
    try:
        proc, init = launch(isolation, python, ["-I", "-c", check], child_source=b"", snippet=b"ok",
                            disk_bytes=1 << 20, env={"PATH": "/usr/bin:/bin"})
    except IsolationUnavailable as exc:  # the user namespace could not be made
        raise IsolationUnavailable(f"{exc}{_USERNS_HINT}") from None
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise IsolationUnavailable("a trial sandbox did not finish within 60 s") from None
    finally:
        if init is not None:
            os.close(init)
    if proc.returncode != 0 or out.decode().split() != [str(SANDBOX_UID), str(SANDBOX_UID), "[]", "ok"]:
        lines = err.decode(errors="replace").strip().splitlines()
        detail = lines[-1] if lines else f"exit code {proc.returncode}, output {out[:200]!r}"
        hint = _USERNS_HINT if "namespace" in detail or "Operation not permitted" in detail else ""
        raise IsolationUnavailable(f"a trial bubblewrap sandbox failed: {detail}{hint}")
    return isolation
