"""Exact local Hessians of single layers (docs/maths.md section 7; seed paper 003, sections 2-3).

A network is a composition of blocks ``C_i(z) = A_i(P_i(z; theta_i))``. With the block
input ``z_i`` held fixed, the *local scalar function* and the *local Hessian* are

.. math::

    S_i(\\theta_i) = \\varphi\\big(A_i(P_i(z_i; \\theta_i))\\big), \\qquad
    LH_i = \\nabla^2_{\\theta_i} S_i \\in \\mathbb{R}^{p_i \\times p_i},

with ``phi = sum`` by default (summed over the output units *and* over the samples of the
batch). ``LH_i`` is **not** a block of the loss Hessian: it ignores the layers above, the
loss and the targets, and it holds ``z_i`` constant. For the loss Hessian use
:func:`hutchtrace.block_traces` / :func:`hutchtrace.backbones.exact.exact_hessian`.

Modules, in the order a call runs through them:

.. code-block:: text

    compute      local_hessian / local_hessian_rows: resolve, capture, choose the path, flag
    activation   A_i: "auto" (the next module in an nn.Sequential), names, modules, callables
    capture      the layer, theta_i and the block input z_i (one no-grad forward hook)
    prepare      S_i's pieces validated and cast: phi, theta_i, dtype, budget, N
    closed_form  nn.Linear / nn.Conv2d with elementwise A: m unit blocks of size n+1
    rows         the dense paths: rows of LH_i by jvp(grad S) or double backward
    budget       p_i^2 / m (n+1)^2 against max_memory; rows per batched pass
    result       LocalHessian: blocks or matrix, dense(), eigenvalues(), trace(), summary()
    errors       LocalHessianError, DegenerateLocalHessianWarning

Example:
    >>> import torch
    >>> from hutchtrace import local_hessian
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> x = torch.randn(8, 3, dtype=torch.float64)
    >>> lh = local_hessian(net.double(), x, "0")                 # A = the Tanh that follows
    >>> lh.method, lh.activation, lh.numel, tuple(lh.blocks.shape)
    ('closed_form', 'tanh', 16, (4, 4, 4))
    >>> lh.dense().shape                                         # (W row-major, then b)
    torch.Size([16, 16])
"""

from .compute import local_hessian, local_hessian_rows
from .errors import DegenerateLocalHessianWarning, LocalHessianError
from .result import LocalHessian

__all__ = [
    "DegenerateLocalHessianWarning",
    "LocalHessian",
    "LocalHessianError",
    "local_hessian",
    "local_hessian_rows",
]
