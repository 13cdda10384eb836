"""The estimator: probe plans and coloring, the probe runner, accumulation, variance and
statistics, the result type, data-parallel collectives, and ``block_traces`` itself.

Imports: ``backbones``, ``problem``, ``kernels``, ``core``.
"""
