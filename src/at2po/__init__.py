"""AT²PO: Agentic Turn-based Policy Optimization via Tree Search (arXiv 2601.04767).

Layout:
  at2po.algorithms.tree, at2po.algorithms.expansion, at2po.algorithms.credit, at2po.algorithms.losses  -- pure algorithms (no models, no tools)
  at2po.rollout                                             -- generator backends and the tree rollout engine
  at2po.tools, at2po.rewards, at2po.agent                   -- the agent environment
"""

__version__ = "0.1.0"
