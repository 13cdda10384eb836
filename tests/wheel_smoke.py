"""Smoke test of an installed hutchtrace wheel (CI runs it from outside the checkout).

    cd /somewhere/else && /path/to/fresh-venv/bin/python /path/to/checkout/tests/wheel_smoke.py

Checks that ``hutchtrace`` comes from the installed wheel (not a source tree), that its
compiled extension loaded with CPU and CUDA kernels for the GPUs people own, that the
compiled ops match the reference, and that a small estimate runs.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    import torch

    import hutchtrace
    from hutchtrace import info, zoo
    from hutchtrace.kernels import loader, ops, reference
    where = os.path.dirname(os.path.abspath(hutchtrace.__file__))
    print(f"hutchtrace {hutchtrace.__version__} from {where}")
    assert "site-packages" in where, f"imported a source tree, not the wheel: {where}"
    assert loader.HAS_EXT, f"the compiled extension did not load: {loader.LOAD_ERROR}"
    assert loader.cuda_compiled(), "the wheel has no CUDA kernels"
    build = loader.build_info()
    assert build is not None, "the wheel has no _build_info.json"
    wanted = {"sm_80", "sm_86", "sm_89", "sm_90"}
    assert wanted <= set(build["cuda_sass"]) and build["cuda_ptx"], (build["cuda_sass"], build["cuda_ptx"])
    assert build["torch"] == torch.__version__, (build["torch"], torch.__version__)

    for kind in ("rademacher", "gaussian"):
        got = ops.probes(3, 2**32 + 1, 2**33 + 3, 1001, num_probes=2, kind=kind, dtype=torch.float64)
        want = reference.probes(3, 2**32 + 1, 2**33 + 3, 1001, num_probes=2, kind=kind, dtype=torch.float64)
        assert torch.equal(got, want), kind
    assert ops.backend_name("cpu") == "compiled-cpu"

    model, criterion, data = zoo.make_mlp(dtype=torch.float64)
    res = hutchtrace.block_traces(model, criterion, K=64, data=data, seed=0, progress=False)
    H, layout = hutchtrace.exact_hessian(model, criterion, data=data)
    exact = hutchtrace.exact_block_traces(H, layout)
    print(res.table())
    for est, tr in zip(res.blocks, exact.tolist()):  # 6 SE: a bound the estimate misses w.p. < 1e-8
        assert abs(est.mean - tr) <= 6 * est.se + 1e-9, (est.name, est.mean, tr, est.se)
    info.main([])
    print("wheel smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
