"""The agent's tools. Importing this package registers the built-in ones (``search``, ``python``).

A tool is a :class:`Tool` subclass (or a builder function returning one) decorated with
``@register_tool``; ``build_tool(name, **options)`` constructs it from the config.
"""

from at2po.tools.base import TOOLS, Tool, ToolResult, build_tool, register_tool, run_tool_calls
from at2po.tools.python_sandbox import PythonTool
from at2po.tools.search import HTTPSearchTool, LocalSearchTool, format_passages

__all__ = [
    "HTTPSearchTool",
    "LocalSearchTool",
    "PythonTool",
    "TOOLS",
    "Tool",
    "ToolResult",
    "build_tool",
    "format_passages",
    "register_tool",
    "run_tool_calls",
]
