"""The steps of ``block_traces`` (hutchtrace.estimate.resolve / rounds / plan_choice) and what
their orchestration must keep: the call's warnings name the caller's line."""

import inspect
import itertools
import math
import warnings

import torch

import hutchtrace
from hutchtrace import zoo
from hutchtrace.core.errors import NonFiniteWarning
from hutchtrace.estimate.rounds import next_round_size


def _warnings_of(fn, category, text):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    return [w for w in rec if issubclass(w.category, category) and text in str(w.message)]


def test_the_calls_warnings_name_the_callers_line():
    """block_traces warns from helpers two calls down: the stack level must still point at the
    line that called block_traces (and the once-per-location filters key on it)."""
    model, crit, data = zoo.make_mlp(dtype=torch.float64)
    here = inspect.currentframe().f_lineno

    def short_budget():
        hutchtrace.block_traces(model, crit, K=4, data=data, seed=0, rtol=1e-6, max_K=8, hvp="reverse",
                                progress=False)

    def nan_loss():
        hutchtrace.block_traces(model, lambda m: crit(m(data[0]), data[1]) * math.nan, K=2, seed=0,
                                hvp="reverse", progress=False)

    [w] = _warnings_of(short_budget, RuntimeWarning, "adaptive stopping did not reach")
    assert (w.filename, w.lineno) == (__file__, here + 3)
    [w] = _warnings_of(nan_loss, NonFiniteWarning, "non-finite Hessian-vector products")
    assert (w.filename, w.lineno) == (__file__, here + 7)


def test_next_round_size_stays_within_its_bounds():
    """At least 8 (or what max_K leaves), at most max(done, 8), never past max_K, and the probes
    missing to 1.1 x the need when that lies in between."""
    for done, need, max_K in itertools.product([2, 8, 16, 40], [0.0, 5.0, 30.0, 1e4, math.inf, math.nan],
                                               [20, 64, 10_000]):
        if done >= max_K:
            continue
        n = next_round_size(done, need, max_K)
        assert isinstance(n, int)
        assert 1 <= n <= max(done, 8)
        assert done + n <= max_K
        assert n >= min(8, max_K - done)
        missing = math.ceil(1.1 * need) - done if math.isfinite(need) else None
        if missing is not None and 8 <= missing <= min(max(done, 8), max_K - done):
            assert n == missing, (done, need, max_K)
        if not math.isfinite(need):
            assert n == min(max(done, 8), max_K - done), (done, need, max_K)
