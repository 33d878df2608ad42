"""The pure algorithms of AT²PO (docs/method.md §2-§4): no models, no tools, no I/O.

* ``tree``: turn trees (nodes = turns), their leaves' token arrays;
* ``expansion``: entropy-guided selection of the turns to branch from;
* ``credit``: turn-wise credit assignment (leaf normalisation, bootstrapped values, advantages);
* ``advantages``: advantage estimators by name (tree credit, GRPO-style);
* ``losses``: token (GRPO), sequence (GSPO) and turn (ATPO) policy objectives, KL penalties.
"""
