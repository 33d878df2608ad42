"""The agent's tools: search (local BM25 or Search-R1's HTTP retriever) and a Python sandbox."""

from at2po.tools.base import Tool, ToolResult, build_tool, run_tool_calls
from at2po.tools.python_sandbox import PythonTool
from at2po.tools.search import (
    BM25Index,
    HTTPSearchTool,
    LocalSearchTool,
    format_passages,
    load_corpus,
)

__all__ = [
    "BM25Index",
    "HTTPSearchTool",
    "LocalSearchTool",
    "PythonTool",
    "Tool",
    "ToolResult",
    "build_tool",
    "format_passages",
    "load_corpus",
    "run_tool_calls",
]
