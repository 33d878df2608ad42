"""Tasks (environments): each turns data rows into prompts and owns its reward.

Importing this package registers the built-in tasks: ``search_qa`` (the paper's search-augmented
QA, also the quickstart's synthetic multi-hop world) and ``arithmetic`` (word problems solved
with the ``<python>`` tool).
"""

from at2po.tasks.arithmetic import ArithmeticTask
from at2po.tasks.base import TASKS, Sample, Score, Task, build_task, register_task
from at2po.tasks.search_qa import SearchQATask

__all__ = ["ArithmeticTask", "SearchQATask", "Sample", "Score", "TASKS", "Task", "build_task", "register_task"]
