"""Single layers in depth: exact local Hessians, their spectrum summaries, snapshot recording,
CCA/PCA of snapshots.

Imports: ``estimate`` and below; never ``structure``, ``distributed``, ``monitor``.
"""
