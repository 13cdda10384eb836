"""Structure of the whole-model curvature built on the estimator: Gauss-Newton/tensor split,
inter-block coupling, per-block spectra, weight sharing, mini-batch variance.

Imports: ``estimate`` and below; never ``layers``, ``distributed``, ``monitor``.
"""
