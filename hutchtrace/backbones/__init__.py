"""Curvature-vector products: the HVP backbones (reverse, forward, auto choice), the
Gauss-Newton products, the matrix-free curvature operator, and the exact dense references.

Imports: ``problem``, ``kernels``, ``core``.
"""
