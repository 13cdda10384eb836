"""Which test files exercise the CUDA kernels: one list for the emulated CI step and the mutation check."""

# the kernel tests proper: a planted kernel defect must fail one of these (mutation_check.py)
KERNEL_TESTS = [
    "tests/kernels/test_probes.py",
    "tests/kernels/test_welford.py",
    "tests/kernels/test_block_dot.py",
]

# every test with emulated-CUDA cases: the emulator's own tests, the kernels, the op registration
CUDA_TESTS = ["tests/kernels/test_cudasim.py", *KERNEL_TESTS, "tests/kernels/test_opcheck.py"]
