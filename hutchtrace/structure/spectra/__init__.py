"""Per-block spectra: extreme eigenvalues, stable rank, spectral density (SLQ) and Hutch++.

Everything here works on the **block operator** of a diagonal block (docs/maths.md sections
6(c), 8)

.. math:: A_b : v \\mapsto (M\\,[v \\text{ on } I_b])_b = M_{bb} v, \\qquad M \\in \\{H, G\\},

at one Hessian- (or GGN-) vector product per matvec, prepared once per batch. All blocks
advance **in lockstep**: one batched product serves one step of every block's recurrence.
Float64 throughout, whatever the model dtype. One module per job:

==================  ==========================================================================
``operators``       the multi-lane operator interface; :class:`BlockOperator`, :class:`DenseOperator`
``krylov``          Lanczos with full re-orthogonalisation on many lanes (:func:`lanczos`)
``eigenlanes``      the ``which`` orders and per-lane results shared by the two eigensolvers
``thick_restart``   top-``k`` eigenpairs: thick-restart Lanczos with locking (:func:`eigsh`)
``power``           top-``k`` eigenvalues: power iteration with deflation (:func:`power_iteration`)
``session``         model -> block operators and block-restricted counter-based probes
``eigenvalues``     :func:`block_eigenvalues` of a model's blocks
``rank``            :func:`stable_rank` ``||M_bb||_F^2 / ||M_bb||_2^2``
``density``         SLQ nodes and weights (:func:`slq`), :func:`spectral_density`
``hutch_plus_plus`` Hutch++ traces (:func:`hutchpp`) and when they win (:func:`hutchpp_wins`)
==================  ==========================================================================

Example:
    >>> import torch
    >>> from hutchtrace import stable_rank
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> sr = stable_rank(net, torch.nn.CrossEntropyLoss(), K=4, data=(x, y), seed=0)
    >>> sr.names, sr.D.shape
    (['0.weight', '0.bias', '2.weight', '2.bias'], torch.Size([4]))
"""

from .density import SpectralDensity, slq, spectral_density
from .eigenvalues import BlockEigenvalues, block_eigenvalues
from .hutch_plus_plus import HutchppTraces, energy_fraction, hutchpp, hutchpp_trace, hutchpp_wins
from .krylov import LanczosRun, lanczos
from .operators import BlockOperator, DenseOperator
from .power import power_iteration
from .rank import StableRank, stable_rank
from .thick_restart import eigsh

__all__ = [
    "BlockEigenvalues",
    "BlockOperator",
    "DenseOperator",
    "HutchppTraces",
    "LanczosRun",
    "SpectralDensity",
    "StableRank",
    "block_eigenvalues",
    "eigsh",
    "energy_fraction",
    "hutchpp",
    "hutchpp_trace",
    "hutchpp_wins",
    "lanczos",
    "power_iteration",
    "slq",
    "spectral_density",
    "stable_rank",
]
