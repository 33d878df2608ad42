"""Evaluation: the one greedy evaluator (``evaluator``) and ``at2po eval`` on the paper's
benchmarks (``benchmarks``: datasets, resumable per-sample files, Table-1 reports)."""
