"""Weight sharing: the de-duplicated block is the true Hessian; the unrolled sum misses
exactly the cross-use terms (docs/maths.md section 2)."""

import pytest
import torch
from helpers import make_case

from hutchtrace.backbones.exact import block_slices, exact_hessian
from hutchtrace.kernels.reference import probes
from hutchtrace.problem.blocks import resolve_blocks
from hutchtrace.structure.sharing import count_uses, unrolled_hessian, unrolled_traces

CASES = [("rnn", {}), ("lm_tied", {"copy_task": True})]


@pytest.mark.parametrize("case,kw", CASES)
def test_unrolled_bias_equals_the_exact_cross_use_sum(case, kw):
    model, crit, data = make_case(case, **kw)
    H, layout = exact_hessian(model, crit, data=data)
    sl = block_slices(layout)
    K = 40
    out = unrolled_traces(model, crit, K=K, data=data, seed=3)
    assert out, "the model has shared tensors"
    for s in out:
        Hu = unrolled_hessian(model, crit, s.name, data=data)
        m, n = Hu.shape[0], Hu.shape[1]
        assert m == s.uses
        true_block = Hu.sum((0, 2))
        b = layout.names.index(s.name)
        # sum_ij H_ij is the Hessian of the shared tensor
        assert torch.allclose(true_block, H[sl[b]][:, sl[b]], atol=1e-12)
        within = sum(torch.diagonal(Hu[i, :, i, :]).sum() for i in range(m))
        cross = torch.diagonal(true_block).sum() - within
        # every per-probe sample against the exact unrolled Hessian
        off = layout.offsets[b]
        for k in range(K):
            zs = [probes(3, k, off + i * layout.total_numel, n, dtype=torch.float64)[0] for i in range(m)]
            same = sum(zs[0] @ Hu[i, :, j, :] @ zs[0] for i in range(m) for j in range(m))
            indep = sum(zs[i] @ Hu[i, :, j, :] @ zs[j] for i in range(m) for j in range(m))
            assert s.samples[k, 0] == pytest.approx(float(same), rel=1e-10, abs=1e-12)
            assert s.samples[k, 1] == pytest.approx(float(indep), rel=1e-10, abs=1e-12)
        # the paired difference estimates the cross-use sum
        assert abs(s.cross[0] - float(cross)) < 4 * s.cross[1] + 1e-12
        assert abs(s.true[0] - float(torch.diagonal(true_block).sum())) < 4 * s.true[1] + 1e-12


def test_copy_task_flips_the_sign_of_the_tied_embedding_trace():
    model, crit, data = make_case("lm_tied", copy_task=True)
    Hu = unrolled_hessian(model, crit, "emb.weight", data=data)
    true = torch.diagonal(Hu.sum((0, 2))).sum()
    within = sum(torch.diagonal(Hu[i, :, i, :]).sum() for i in range(Hu.shape[0]))
    assert true < 0 < within  # the unrolled view reports the wrong sign


def test_use_counts():
    model, crit, (x, y) = make_case("rnn")
    lay = resolve_blocks(model)
    uses = {n: count_uses(model, lambda m: crit(m(x), y), t) for n, t in zip(lay.names, lay.tensors)}
    assert uses == {"inp.weight": 5, "inp.bias": 5, "rec.weight": 5, "out.weight": 1, "out.bias": 1}
    model, crit, (x, y) = make_case("lm_tied")
    lay = resolve_blocks(model)
    t = lay.tensors[lay.names.index("emb.weight")]
    assert count_uses(model, lambda m: crit(m(x), y), t) == 2
