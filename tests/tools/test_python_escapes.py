"""Escape attempts against the python tool's kernel-level sandbox, each judged by its effect
on the host (files unchanged, victim process alive and running, no connection accepted, no
process left), never by the error text.

Most attacks run with the inner layer (audit hooks) switched off, as native code that got
past the hooks would: the kernel layer must contain them on its own. The routes the review
found past the hooks (ctypes memory access, readline, sqlite, descriptor calls, pidfds) also
run with the hooks on.
"""

import errno
import os
import random
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from at2po.tools import PythonTool, ToolResult, build_tool
from at2po.tools import isolation
from conftest import own_processes_end

pytestmark = pytest.mark.sandbox  # every test here runs the real sandbox (conftest: skipped or failed without it)

# Python source kept in a .txt file so that nothing imports (and runs) it by accident.
EXPLOIT = Path(__file__).with_name("native_exploit.txt").read_text()
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


def tool(**options) -> PythonTool:
    options.setdefault("timeout", 10.0)
    return PythonTool(**options)


def kernel_only(**options) -> PythonTool:
    """The tool with its audit hooks off: what native code past the hooks would face."""
    t = tool(**options)
    t._audit_hooks = False
    return t


def processes_with(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path("/proc", entry, "cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def unique() -> str:
    return f"{random.randrange(10**9)}{os.getpid()}"


def sleep_marker() -> str:
    """A `sleep` duration that names one test's processes in the host's process list."""
    return f"987.{unique()}"


def run_contained(t: PythonTool, code: str) -> ToolResult:
    """Run ``code`` and check that no process of the sandbox outlives the call (only this
    test's own processes are judged)."""
    with own_processes_end():
        return t(code)


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def victim():
    """A host process the snippet tries to stop or kill; afterwards alive and not stopped."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    try:
        assert proc.poll() is None, "the victim was killed"
        assert process_state(proc.pid) not in ("T", "t", "Z", "X"), "the victim was stopped"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock
        readable, _, _ = select.select([sock], [], [], 0.5)
        assert readable == [], "a connection reached the host's loopback listener"


# --- ordinary code still works ---------------------------------------------------------------


def test_ordinary_code_gives_the_same_results():
    t = build_tool("python", timeout=10)
    assert t.isolated
    assert t("import math\nprint(math.factorial(20), round(math.pi, 6))") == ToolResult(
        "2432902008176640000 3.141593", ok=True
    )
    assert t("for i in range(3):\n    print(i * i)") == ToolResult("0\n1\n4", ok=True)
    code = "import numpy as np\na = np.arange(12).reshape(3, 4)\nprint(a.sum(), a.T.shape, float(a.mean()))"
    assert t(code) == ToolResult("66 (4, 3) 5.5", ok=True)
    code = "import json, tempfile, os\nwith tempfile.NamedTemporaryFile('w', delete=False) as f:\n" \
           "    json.dump([1, 2], f)\nprint(json.load(open(f.name)), os.getcwd())"
    assert t(code) == ToolResult("[1, 2] /sandbox", ok=True)


# --- native code -----------------------------------------------------------------------------


def test_native_exploit_past_the_audit_hooks_is_contained(tmp_path, victim):
    """The review's route: ctypes memory access (no audit event) finds libc's system() and
    calls it. The shell it starts must find no host file, no host process, and die with the
    call."""
    marker = sleep_marker()
    host_file = tmp_path / "escaped"
    command = (
        "echo native-code-ran\n"
        f"echo pwned > {host_file}\n"
        f"kill -STOP {victim.pid}; kill -KILL {victim.pid}\n"
        f"(setsid sleep {marker} &)\n"
    )
    code = EXPLOIT.replace('COMMAND = "echo native-code-ran\\n"', f"COMMAND = {command!r}")
    assert code != EXPLOIT
    result = run_contained(tool(), code)
    assert result.text.startswith("native-code-ran\n"), result.text  # the exploit did run
    assert not host_file.exists()
    assert processes_with(marker) == []


def test_libc_system_without_audit_hooks(tmp_path, victim):
    marker = sleep_marker()
    host_file = tmp_path / "escaped"
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        f"print(libc.system(b'echo pwned > {host_file}') != 0)\n"
        f"libc.system(b'kill -KILL {victim.pid}')\n"
        f"libc.system(b'(setsid sleep {marker} &)')\n"
        "print('done')"
    )
    result = run_contained(kernel_only(), code)
    assert result.ok and result.text.startswith("True\ndone\n"), result.text  # system() ran
    assert not host_file.exists()
    assert processes_with(marker) == []


def test_seccomp_refuses_what_no_snippet_needs():
    """Native calls the namespaces alone would allow: each must fail and change nothing."""
    code = (
        "import ctypes, os, socket\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "ns = os.readlink('/proc/self/ns/user')\n"
        "results = {\n"
        "    'unshare': libc.unshare(0x10000000),\n"  # CLONE_NEWUSER
        "    'ptrace': libc.ptrace(0, 0, None, None),\n"  # PTRACE_TRACEME
        "    'bpf': libc.syscall(321, 0, None, 0),\n"
        "    'keyctl': libc.syscall(250, 0, 0, 0, 0, 0),\n"
        "    'pidfd_open': libc.syscall(434, os.getpid(), 0),\n"
        "}\n"
        "try:\n"
        "    socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "    results['socket'] = 0\n"
        "except OSError:\n"
        "    results['socket'] = -1\n"
        "print(sorted(name for name, value in results.items() if value != -1))\n"
        "print(os.readlink('/proc/self/ns/user') == ns)\n"
        "print(socket.socketpair()[0].family.name)\n"  # AF_UNIX stays allowed
        # Every process in the sandbox is filtered (mode 2), bwrap's init included: an
        # unfiltered one would be a way around the filter (the snippet can write /proc/1/mem).
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "print(len(pids), {open(f'/proc/{p}/status').read().split('Seccomp:')[1].split()[0] for p in pids})"
    )
    result = run_contained(kernel_only(), code)
    assert result == ToolResult("[]\nTrue\nAF_UNIX\n2 {'2'}", ok=True), result.text


# --- processes outliving the call --------------------------------------------------------------


@pytest.mark.parametrize("hooks", [False, True])
def test_daemons_do_not_outlive_the_call(hooks):
    marker = sleep_marker()
    code = (
        "import os, subprocess\n"
        f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    os._exit(0)\n"
        "print('parent exits')"
    )
    t = tool() if hooks else kernel_only()
    result = run_contained(t, code)
    assert processes_with(marker) == []
    if not hooks:
        assert result == ToolResult("parent exits", ok=True)


def test_sleeping_child_is_killed_at_the_timeout():
    marker = sleep_marker()
    code = f"import subprocess\nsubprocess.run(['sleep', '{marker}'])"
    start = time.monotonic()
    result = run_contained(kernel_only(timeout=1.0), code)
    assert result.error == "timeout"
    assert time.monotonic() - start < 15
    assert processes_with(marker) == []


# --- C-level file APIs and persistence --------------------------------------------------------


@pytest.fixture
def host_file_in_site_packages():
    """A file inside the (read-only mounted) interpreter installation, with known metadata."""
    path = SITE_PACKAGES / f"at2po_victim_{unique()}.txt"
    path.write_text("precious")
    path.chmod(0o644)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    before = path.stat()
    yield path
    try:
        after = path.stat()
        assert path.read_text() == "precious"
        assert (after.st_mode, after.st_mtime, after.st_uid) == (before.st_mode, before.st_mtime, before.st_uid)
        assert os.listxattr(path) == []
    finally:
        path.unlink()


@pytest.mark.parametrize("hooks", [True, False])
def test_descriptor_calls_cannot_change_host_files(host_file_in_site_packages, hooks):
    path = host_file_in_site_packages
    code = (
        "import os\n"
        f"fd = os.open({str(path)!r}, os.O_RDONLY)\n"
        "for name, call in [('fchmod', lambda: os.fchmod(fd, 0o777)),\n"
        "                   ('utime', lambda: os.utime(fd, (0, 0))),\n"
        "                   ('setxattr', lambda: os.setxattr(fd, 'user.x', b'1')),\n"
        "                   ('ftruncate', lambda: os.ftruncate(fd, 0))]:\n"
        "    try:\n"
        "        call()\n"
        "    except OSError as e:\n"
        "        print(name, 'failed')\n"
        "print(open(fd).read())"
    )
    result = run_contained(tool() if hooks else kernel_only(), code)
    assert result.text.splitlines()[-1] == "precious"  # the descriptor was really open


@pytest.mark.parametrize("hooks", [True, False])
def test_pth_persistence_is_impossible(hooks):
    """A .pth file in site-packages would run code in every later interpreter start."""
    name = f"at2po_escape_{unique()}"
    targets = [SITE_PACKAGES / f"{name}_{i}.pth" for i in range(3)]
    payload = "import os; os.system('touch /tmp/at2po-pwned')"
    code = (
        "import readline, sqlite3\n"
        # The same APIs writing inside the working directory show that they do work here.
        "readline.add_history(" + repr(payload) + ")\n"
        "readline.write_history_file('inside.hist')\n"
        "sqlite3.connect(':memory:').execute(\"VACUUM INTO 'inside.db'\")\n"
        "import os\nprint(os.path.getsize('inside.hist') > 0, os.path.getsize('inside.db') > 0)\n"
        "for attempt in [\n"
        f"    lambda: readline.write_history_file({str(targets[0])!r}),\n"
        f"    lambda: sqlite3.connect(':memory:').execute(\"VACUUM INTO '{targets[1]}'\"),\n"
        f"    lambda: open({str(targets[2])!r}, 'w').write({payload!r}),\n"
        "]:\n"
        "    try:\n"
        "        attempt()\n"
        "    except Exception:\n"
        "        pass\n"
    )
    try:
        result = run_contained(tool() if hooks else kernel_only(), code)
        assert result.text.splitlines()[0] == "True True", result.text
        assert [t for t in targets if t.exists()] == []
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


@pytest.mark.parametrize("hooks", [True, False])
def test_sqlite_attach_and_shared_memory_stay_inside(tmp_path, hooks):
    host_db = tmp_path / "attached.db"
    shm_name = f"at2po_{unique()}"
    code = (
        "import os, sqlite3, _posixshmem\n"
        "db = sqlite3.connect(':memory:')\n"
        "for attempt in [\n"
        f"    lambda: db.execute(\"ATTACH DATABASE '{host_db}' AS x\").execute('CREATE TABLE x.t (a)'),\n"
        f"    lambda: db.execute(\"VACUUM INTO '{tmp_path / 'vacuum.db'}'\"),\n"
        f"    lambda: os.write(_posixshmem.shm_open('/{shm_name}', os.O_CREAT | os.O_RDWR, 0o666), b'x'),\n"
        "]:\n"
        "    try:\n"
        "        attempt()\n"
        "    except Exception:\n"
        "        pass\n"
        "print('ran')"
    )
    result = run_contained(tool() if hooks else kernel_only(), code)
    assert result == ToolResult("ran", ok=True), result.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert not Path("/dev/shm", shm_name).exists()


# --- signals to other processes ---------------------------------------------------------------


@pytest.mark.parametrize("hooks", [True, False])
def test_host_processes_cannot_be_signalled(victim, hooks):
    pid = victim.pid
    code = (
        "import os, signal\n"
        "for attempt in [\n"
        f"    lambda: signal.pidfd_send_signal(os.pidfd_open({pid}), signal.SIGSTOP),\n"
        f"    lambda: signal.pidfd_send_signal(os.pidfd_open({pid}), signal.SIGKILL),\n"
        f"    lambda: os.kill({pid}, signal.SIGSTOP),\n"
        f"    lambda: os.kill({pid}, signal.SIGKILL),\n"
        f"    lambda: os.killpg(os.getpgid({pid}), signal.SIGKILL),\n"
        f"    lambda: os.kill({os.getpid()}, signal.SIGSTOP),\n"  # the host process running the tool
        "]:\n"
        "    try:\n"
        "        attempt()\n"
        "    except Exception:\n"
        "        pass\n"
        "print('survived')\n"
        "os.kill(-1, signal.SIGKILL)"  # every process this one may signal
    )
    result = run_contained(tool() if hooks else kernel_only(), code)
    assert process_state(os.getpid()) not in ("T", "t")
    assert result.text.startswith("survived"), result.text


# --- network ------------------------------------------------------------------------------------


@pytest.mark.parametrize("hooks", [True, False])
def test_no_network_at_all(listener, hooks):
    port = listener.getsockname()[1]
    code = (
        "import socket\n"
        "for attempt in [\n"
        f"    lambda: socket.create_connection(('127.0.0.1', {port}), timeout=2),\n"
        f"    lambda: socket.create_connection(('::1', {port}), timeout=2),\n"
        f"    lambda: socket.create_connection(('localhost', {port}), timeout=2),\n"
        "    lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),\n"
        "    lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0),\n"
        "]:\n"
        "    try:\n"
        "        attempt()\n"
        "        print('connected')\n"
        "    except Exception:\n"
        "        pass\n"
        "print('done')"
    )
    result = run_contained(tool() if hooks else kernel_only(), code)
    assert result == ToolResult("done", ok=True), result.text


def test_an_abstract_unix_socket_on_the_host_is_out_of_reach():
    """Pins the network namespace. seccomp lets AF_UNIX through (snippets may use socketpairs),
    and an abstract-namespace socket has no file that the private root could hide: only the
    sandbox's own network namespace separates it from the host's. A host listener on one, a
    snippet with its audit hooks off that tries to connect and send: the listener, not the
    snippet's output, judges. Without --unshare-net the snippet gets through."""
    name = f"at2po-test-{unique()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
        host.bind("\0" + name)
        host.listen()
        host.setblocking(False)
        code = (
            "import socket\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "try:\n"
            f"    s.connect('\\0{name}')\n"
            "    s.sendall(b'escaped')\n"
            "    print('connected')\n"
            "except OSError as exc:\n"
            "    print('refused', exc.errno)\n"
        )
        result = run_contained(kernel_only(), code)
        readable, _, _ = select.select([host], [], [], 0.5)
        assert readable == [], "a sandboxed snippet connected to the host's abstract unix socket"
    assert result.ok and result.text.startswith("refused"), result.text  # the call itself ran


# --- information leaks through /proc -------------------------------------------------------------


def test_proc_shows_nothing_of_the_host(monkeypatch, tmp_path):
    secret = f"secret-{unique()}"
    monkeypatch.setenv("AT2PO_TEST_SECRET", secret)
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "open-in-host.txt", "w"):  # an open file of the host process
        code = (
            "import os\n"
            "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
            "print('pids', pids)\n"
            "for pid in pids:\n"
            "    for name in ['cmdline', 'environ', 'cwd', 'root', 'fd', 'maps', 'mountinfo']:\n"
            "        path = f'/proc/{pid}/{name}'\n"
            "        try:\n"
            "            if name in ('cwd', 'root'):\n"
            "                print(path, os.readlink(path))\n"
            "            elif name == 'fd':\n"
            "                print(path, [os.readlink(f'{path}/{fd}') for fd in os.listdir(path)])\n"
            "            else:\n"
            "                print(path, open(path, 'rb').read().replace(b'\\0', b' '))\n"
            "        except OSError as e:\n"
            "            print(path, 'denied')\n"
        )
        t = kernel_only(max_output_chars=200_000)
        result = run_contained(t, code)
    assert result.text.startswith("pids [1, 2]"), result.text[:300]  # bwrap's init and the snippet
    for leak in (secret, str(tmp_path), "open-in-host.txt", "pytest", str(Path.cwd())):
        assert leak not in result.text, leak


# --- resource exhaustion --------------------------------------------------------------------


def test_fork_bomb_leaves_nothing_behind():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_contained(kernel_only(timeout=2.0), code)
    assert result.error == "timeout"


def test_process_count_is_bounded():
    # RLIMIT_NPROC, which the kernel enforces because the sandbox is not root on the host.
    code = (
        "import os, time\nforks = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        forks += 1\n"
        "except OSError as e:\n"
        "    print(forks, e.errno)"
    )
    result = run_contained(kernel_only(max_processes=8), code)
    forks, error = result.text.split()
    assert 0 < int(forks) < 8 and int(error) == errno.EAGAIN, result.text


def test_memory_is_limited():
    result = run_contained(kernel_only(memory_mb=256), "x = bytearray(10**9)")
    assert not result.ok and result.text.rstrip().endswith("MemoryError")


def test_disk_is_limited():
    code = (
        "import errno\nwritten = 0\n"
        "try:\n"
        "    with open('fill', 'wb') as f:\n"
        "        while True:\n"
        "            f.write(b'x' * (1 << 20))\n"
        "            f.flush()\n"
        "            written += 1\n"
        "except OSError as e:\n"
        "    print(written, errno.errorcode[e.errno])\n"
        "for path in ['/dev/shm/fill', '/fill', '/usr/fill']:\n"
        "    try:\n"
        "        open(path, 'wb').write(b'x')\n"
        "        print('wrote', path)\n"
        "    except OSError:\n"
        "        pass\n"
    )
    result = run_contained(kernel_only(disk_mb=8, max_file_mb=64), code)
    written, error = result.text.split()
    assert int(written) <= 8 and error == "ENOSPC", result.text


def test_endless_output_is_bounded():
    start = time.monotonic()
    result = run_contained(kernel_only(timeout=2.0), "while True:\n    print('x' * 10000)")
    assert result.error == "timeout" and len(result.text) < 2200
    assert time.monotonic() - start < 15


# --- refusing to start without the kernel layer ---------------------------------------------


def test_python_timeout_is_capped_at_the_round_timeout():
    from at2po.config import load_config
    from at2po.factory import build_tools

    cfg = load_config(overrides=["tools.enabled=[python]", "tools.python.timeout=60", "rollout.tool_timeout=2"])
    with pytest.warns(UserWarning, match="capped at rollout.tool_timeout=2"):
        (python,) = build_tools(cfg, task=None)
    assert python.timeout == 2.0 and python.isolated
    cfg = load_config(overrides=["tools.enabled=[python]", "tools.python.timeout=1.5"])
    (python,) = build_tools(cfg, task=None)
    assert python.timeout == 1.5
    python._audit_hooks = False  # let it start a process that would outlive a longer timeout
    marker = sleep_marker()
    start = time.monotonic()
    result = run_contained(python, f"import subprocess\nsubprocess.run(['sleep', '{marker}'])")
    assert result.error == "timeout" and time.monotonic() - start < 10
    assert processes_with(marker) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the other path is the one a non-root host always takes")
def test_sandbox_made_by_bwrap_alone(tmp_path, victim):
    """The path of a non-root host (bwrap makes the user namespace) is contained too."""
    iso = isolation.Isolation(bwrap=isolation.probe(sys.executable).bwrap, unshare=None)
    t = kernel_only()
    t._isolation = iso
    marker = sleep_marker()
    code = (
        "import os, signal, subprocess\n"
        f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
        "for attempt in [\n"
        f"    lambda: open({str(tmp_path / 'escaped')!r}, 'w'),\n"
        f"    lambda: os.kill({victim.pid}, signal.SIGKILL),\n"
        "]:\n"
        "    try:\n"
        "        attempt()\n"
        "    except OSError:\n"
        "        pass\n"
        "print(os.getuid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
    )
    result = run_contained(t, code)
    assert result == ToolResult("65534 [1, 2, 3]", ok=True), result.text
    assert list(tmp_path.iterdir()) == [] and processes_with(marker) == []
