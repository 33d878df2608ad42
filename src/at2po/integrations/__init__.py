"""Adapters that put at2po's algorithms inside other training frameworks.

* ``verl``: registers the ATPO turn-level policy loss and the tree-credit advantage estimator in
  verl's registries (docs/verl.md). Needs the ``verl`` extra, in its own environment.
"""
