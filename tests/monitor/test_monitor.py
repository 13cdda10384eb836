"""Monitor: records, overhead budget logic (fake clock), resume, no side effects, sinks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import assert_same_snapshot, snapshot

import hutchtrace
from hutchtrace import zoo
from hutchtrace.monitor.cusum import CUSUMDetector
from hutchtrace.monitor.monitor import Monitor, derive_seed
from hutchtrace.monitor.sinks import read_log


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: intra-op threads only add contention (80 ms vs 0.5 ms per HVP on a loaded
    # 2-core machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mlp(seed=0):
    model, crit, (x, y) = zoo.make_mlp(n=32, seed=seed)
    return model, crit, x, y


def _train(model, crit, x, y, mon, steps, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    recs = []
    for _ in range(steps):
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
        r = mon.step(data=(x, y))
        if r is not None:
            recs.append(r)
    return opt, recs


def test_records_match_direct_block_traces_and_grad_norm():
    model, crit, x, y = _mlp()
    mon = Monitor(
        model, crit, every=3, K=4, blocks="param", overhead=None, detector=None, seed=7, hvp="reverse"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = 0
    for t in range(10):
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
        rec = mon.step(data=(x, y))
        if t % 3 != 0:
            assert rec is None
            continue
        seen += 1
        ref = hutchtrace.block_traces(
            model, crit, K=4, data=(x, y), blocks="param", seed=derive_seed(7, t), hvp="reverse"
        )
        assert rec["step"] == t
        assert list(rec["blocks"]) == ref.names
        for b in ref.blocks:
            assert rec["blocks"][b.name]["trace"] == b.mean
            assert rec["blocks"][b.name]["se"] == b.se
        assert rec["total"]["trace"] == ref.total.mean
        params = [p for p in model.parameters()]
        g = torch.autograd.grad(crit(model(x), y), params)
        assert rec["grad_norm"] == pytest.approx(
            math.sqrt(sum(float((gi.double() ** 2).sum()) for gi in g)), rel=1e-6
        )
        with torch.no_grad():
            assert rec["loss"] == pytest.approx(float(crit(model(x), y)), rel=1e-6)
        assert rec["alarms"] == []
    assert seen == 4 and len(mon.history) == 4


def test_caller_values_are_recorded_and_closure_loss_works():
    model, crit, x, y = _mlp()
    mon = Monitor(model, lambda m: crit(m(x), y), every=1, K=2, overhead=None, detector=None, seed=0)
    rec = mon.step(step=100, loss_value=torch.tensor(0.25), grad_norm=3.5, extra={"lr": 0.1})
    assert rec["step"] == 100 and rec["loss"] == 0.25 and rec["grad_norm"] == 3.5 and rec["lr"] == 0.1


def test_no_side_effects_on_model_bn_grads_rng():
    model, crit, (x, y) = zoo.make_cnn(n=8)
    model.train()
    crit(model(x), y).backward()  # populated .grad
    before = snapshot(model)
    mon = Monitor(model, crit, every=1, K=3, overhead=None, detector="auto", warmup=3, seed=1)
    for _ in range(2):
        assert mon.step(data=(x, y)) is not None
    assert_same_snapshot(before, snapshot(model))


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _fake_monitor(clock, t_meas, **kw):
    model, crit, x, y = _mlp()
    mon = Monitor(model, crit, K=2, detector=None, clock=clock, **kw)

    def fake_measure(step, data, loss_value, grad_norm):
        clock.t += t_meas[0]
        return {"step": step, "blocks": {}, "alarms": []}

    mon._measure = fake_measure
    return mon


def test_overhead_budget_sets_interval_from_timings():
    clock, t_meas, t_step, b = FakeClock(), [0.05], 0.01, 0.05
    mon = _fake_monitor(clock, t_meas, every=1, overhead=b)
    N = 5000
    steps_measured = []
    for i in range(N):
        clock.t += t_step  # the training step
        if mon.step() is not None:
            steps_measured.append(i)
    # n >= T_m (1 - b) / (b T_s) = 0.05 * 0.95 / (0.05 * 0.01) = 95
    assert mon.every == 95
    gaps = [b_ - a for a, b_ in zip(steps_measured[1:], steps_measured[2:])]
    assert set(gaps) == {95}
    # every full interval obeys the budget: T_m / (T_m + n T_s) <= b
    assert t_meas[0] / (t_meas[0] + 95 * t_step) <= b
    # cumulatively at most two measurements beyond it: the one before the step time was known
    # (interval 1) and the one opening the last, partial interval
    assert mon.overhead_fraction <= b + 2 * t_meas[0] / (N * t_step)
    # the first call has no preceding training step
    assert mon.overhead_fraction == pytest.approx(mon.total_meas_s / (mon.total_meas_s + (N - 1) * t_step))


def test_overhead_budget_adapts_and_respects_bounds():
    clock, t_meas = FakeClock(), [0.02]
    mon = _fake_monitor(clock, t_meas, every=5, max_every=50, overhead=0.1)
    for _ in range(2000):
        clock.t += 0.01
        mon.step()
    assert mon.every == 18  # ceil(0.02 * 0.9 / (0.1 * 0.01)) = 18
    t_meas[0] = 0.2  # measurements got 10x slower: the interval hits max_every
    for _ in range(3000):
        clock.t += 0.01
        mon.step()
    assert mon.every == 50
    t_meas[0] = 0.0001  # very cheap: the interval hits the minimum
    for _ in range(3000):
        clock.t += 0.01
        mon.step()
    assert mon.every == 5


def test_fixed_interval_without_budget():
    clock = FakeClock()
    mon = _fake_monitor(clock, [10.0], every=7, overhead=None)
    hits = [i for i in range(50) if (clock.__setattr__("t", clock.t + 0.001) or mon.step()) is not None]
    assert hits == list(range(0, 50, 7))


@pytest.mark.parametrize("cut", [12, 31])
def test_resume_equals_uninterrupted(cut, tmp_path):
    def fresh():
        model, crit, x, y = _mlp(seed=3)
        det = CUSUMDetector(k=0.5, arl0=50, direction="both", warmup=4, halflife=8.0)
        mon = Monitor(model, crit, every=2, K=3, overhead=None, detector=det, seed=11, hvp="reverse")
        return model, crit, x, y, mon

    def strip(recs):
        return [{k: v for k, v in r.items() if k not in ("time", "meas_s")} for r in recs]

    model, crit, x, y, mon = fresh()
    _, full = _train(model, crit, x, y, mon, 60)

    model, crit, x, y, mon = fresh()
    opt, part = _train(model, crit, x, y, mon, cut)
    # checkpoint: model, optimiser, monitor (through JSON)
    m_state = copy.deepcopy(model.state_dict())
    o_state = copy.deepcopy(opt.state_dict())
    mon_state = json.loads(json.dumps(mon.state_dict()))
    model2, crit2, x2, y2, mon2 = fresh()
    model2.load_state_dict(m_state)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    opt2.load_state_dict(o_state)
    mon2.load_state_dict(mon_state)
    _, rest = _train(model2, crit2, x2, y2, mon2, 60 - cut, opt=opt2)
    assert strip(part + rest) == strip(full)
    assert [a.to_dict() for a in mon2.alarms] == [a.to_dict() for r in full for a in []] + [
        a for r in full for a in r["alarms"]
    ]


def test_sinks_from_paths_and_alarm_callback(tmp_path):
    model, crit, x, y = _mlp()
    got = []
    det = CUSUMDetector(k=0.5, h=0.01, direction="both", warmup=3)  # a hair trigger: alarms for sure
    mon = Monitor(
        model,
        crit,
        every=1,
        K=2,
        overhead=None,
        detector=det,
        seed=0,
        sinks=[tmp_path / "m.jsonl", tmp_path / "m.csv"],
        on_alarm=got.append,
    )
    _train(model, crit, x, y, mon, 8)
    mon.close()
    js = read_log(tmp_path / "m.jsonl", as_dataframe=False)
    cs = read_log(tmp_path / "m.csv", as_dataframe=False)
    assert len(js) == len(cs) == 8
    for a, b in zip(js, cs):
        for k in a:
            if k.startswith(("trace/", "se/")):
                assert a[k] == b[k]
        assert a["alarms"] == b["alarms"]
    assert got and [a.to_dict() for a in got] == [a for r in js for a in r["alarms"]]
    assert js[0]["calibrating"] is True and js[-1]["calibrating"] is False


def test_bad_arguments():
    model, crit, x, y = _mlp()
    with pytest.raises(ValueError, match="overhead"):
        Monitor(model, crit, overhead=5)
    with pytest.raises(ValueError, match="every"):
        Monitor(model, crit, every=0)
    with pytest.raises(TypeError, match="detector"):
        Monitor(model, crit, detector="cusum")
    mon = Monitor(model, crit, overhead=None, detector=None)
    with pytest.raises(hutchtrace.DataFormatError, match="no data"):
        mon.step()
