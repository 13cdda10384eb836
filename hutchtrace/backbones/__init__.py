"""Curvature-vector products: the backbone interface and registry (:mod:`.base`), the HVP
backbones (:mod:`.reverse`, :mod:`.forward`, the ``auto`` choice in :mod:`.auto`), the Gauss-Newton
products (:mod:`.ggn`), the matrix-free curvature operator and the exact dense references.

Imports: ``problem``, ``kernels``, ``core``. Importing the package registers every backbone.
"""

from . import forward, ggn, reverse  # noqa: F401  (each registers its backbones in base's registry)
