"""Evidence at equal budget: paired-seed sweeps (``runner``) and their statistics (``stats``).

``benchmarks/ablation.py`` defines the rows and task variants of the paper's ablations and runs
them with this package; docs in ``benchmarks/README.md``.
"""
