"""Where the kernel-level sandbox cannot be set up, the python tool refuses to start and names
what is missing, unless the user accepts weak isolation explicitly. These run on any host: the
missing layer is simulated, so they need no bubblewrap."""

import sys

import pytest

from at2po.tools import ToolResult, build_tool
from at2po.tools import isolation, python_sandbox
from at2po.tools.isolation import IsolationUnavailable


def test_missing_bubblewrap_is_named(monkeypatch):
    monkeypatch.setattr(isolation.shutil, "which", lambda name: None)
    with pytest.raises(IsolationUnavailable, match=r"apt install bubblewrap"):
        isolation.probe.__wrapped__(sys.executable)


def test_tool_refuses_without_isolation_unless_unsafe(monkeypatch, tmp_path):
    def unavailable(python):
        raise IsolationUnavailable("bubblewrap (`bwrap`) is not installed")

    monkeypatch.setattr(python_sandbox, "probe", unavailable)
    with pytest.raises(IsolationUnavailable, match="unsafe_allow_weak_isolation=true"):
        build_tool("python", timeout=5)
    with pytest.warns(UserWarning, match="WITHOUT kernel-level isolation"):
        weak = build_tool("python", timeout=5, unsafe_allow_weak_isolation=True, workdir_root=tmp_path)
    assert not weak.isolated
    assert weak("print(6 * 7)") == ToolResult("42", ok=True)
    # The config field reaches the tool.
    from at2po.config import load_config
    from at2po.factory import build_tools

    with pytest.raises(IsolationUnavailable, match="bubblewrap"):
        build_tools(load_config(overrides=["tools.enabled=[python]"]), task=None)
    cfg = load_config(overrides=["tools.enabled=[python]", "tools.python.unsafe_allow_weak_isolation=true"])
    with pytest.warns(UserWarning, match="WITHOUT kernel-level isolation"):
        (weak,) = build_tools(cfg, task=None)
    assert not weak.isolated
