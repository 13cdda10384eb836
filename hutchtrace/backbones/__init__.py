"""Curvature-vector products: the backbone interface and registry (:mod:`.base`), the HVP
backbones (:mod:`.reverse`, :mod:`.forward`, the ``auto`` choice in :mod:`.auto`), the Gauss-Newton
products (:mod:`.ggn`), the matrix-free curvature operator and the exact dense references.

Imports: ``problem``, ``kernels``, ``core``. Importing the package registers every backbone.
"""

# Each module registers its backbones in base's registry on import. The order is the registry's
# order, and it matters: hvp="auto" takes the first family that works as its reference, which
# must be reverse-over-reverse (the symmetric Hessian) before forward mode; then the GGN.
# isort: off
from . import reverse  # noqa: F401
from . import forward  # noqa: F401
from . import ggn  # noqa: F401
# isort: on
