"""The paper's progressive ablation in miniature, every row at the same generated-token budget.

    python benchmarks/ablation.py --quick                 # smoke run, about a minute on CPU
    python benchmarks/ablation.py                         # 6 rows x seeds 0 1 2 (hours on 2 CPU cores)
    python benchmarks/ablation.py --credit --seeds 0      # plus the credit variants of Table 5

The logic lives in at2po.ablation (importable, tested); see `--help` and benchmarks/README.md.
"""

from pathlib import Path

from at2po.ablation import main

if __name__ == "__main__":
    main(results_root=Path(__file__).resolve().parent / "results")
