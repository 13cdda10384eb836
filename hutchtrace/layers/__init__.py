"""Single layers in depth: exact local Hessians, their spectrum summaries, snapshot recording and
storage, CCA/PCA of snapshots.

Imports: ``estimate`` and below; never ``structure``, ``distributed``, ``monitor``.
"""
