"""The Python side of ``csrc/``: the op wrappers (compiled op or reference), the loader of
``hutchtrace._C``, the pure-PyTorch reference (the test oracle), fake kernels, CUDA arch logic.

Imports: ``core`` only. The compiled library itself stays at ``hutchtrace._C`` (its wheel name).
"""
