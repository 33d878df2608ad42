"""The suite's process check (conftest.own_processes_end) catches a process that a call leaves
behind, even one orphaned on purpose, and ignores processes this test did not start."""

import os
import signal
import subprocess
import sys

import pytest

from conftest import live_descendants, own_processes_end

# The parent exits at once; its child sleeps on (a duration unique to this run names it).
ORPHAN = f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60.{os.getpid()})\n"


def test_an_orphaned_process_is_caught():
    with pytest.raises(AssertionError, match="processes outlived the call"):
        with own_processes_end(grace=0.5):
            subprocess.run([sys.executable, "-c", ORPHAN], check=True)  # the child survives its parent
    for pid in live_descendants():  # adopted while the check ran: end it and reap it here
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_process_that_ends_passes_and_others_processes_are_not_judged():
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # started before
    try:
        with own_processes_end(grace=0.5):
            subprocess.run([sys.executable, "-c", "print(1)"], check=True, capture_output=True)
    finally:
        other.kill()
        other.wait()
