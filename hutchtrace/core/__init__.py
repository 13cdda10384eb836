"""Foundations every layer uses: the error types, state preservation (parameters, buffers,
``.grad``, modes, RNG), progress reporting, argument checks, the twice-differentiable mode.

Imports: nothing from hutchtrace outside ``core`` (the lowest layer).
"""
