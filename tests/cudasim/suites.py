"""Which test files exercise the CUDA kernels: one list for the emulated CI step and the mutation check."""

# the kernel tests proper: a planted kernel defect must fail one of these (mutation_check.py)
KERNEL_TESTS = [
    "tests/test_kernels_probes.py",
    "tests/test_kernels_welford.py",
    "tests/test_kernels_block_dot.py",
]

# every test with emulated-CUDA cases: the emulator's own tests, the kernels, the op registration
CUDA_TESTS = ["tests/test_cudasim.py", *KERNEL_TESTS, "tests/test_opcheck.py"]
