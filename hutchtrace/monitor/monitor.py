"""Online monitoring of per-block Hessian traces from a plain training loop.

:class:`Monitor` is called once per training step. Every ``every`` steps (or at an
interval set by an overhead budget) it measures, on the current batch,

* the per-block traces ``tr H_bb`` with standard errors (:func:`hutchtrace.block_traces`,
  ``K`` probes, seed derived from ``(seed, step)`` so a measurement is reproducible),
* the loss and the gradient norm ``||grad L||`` of the same batch,

feeds the traces to a :class:`~hutchtrace.monitor.cusum.CUSUMDetector` and writes one record per
measurement to its sinks (:mod:`hutchtrace.monitor.sinks`).

**Overhead budget.** With ``overhead=b`` the interval adapts so that measuring takes at most
a fraction ``b`` of the wall time. With ``T_m`` the (EWMA) duration of one measurement and
``T_s`` the (EWMA) time between two ``step()`` calls *excluding* measurements, measuring
every ``n`` steps costs the fraction ``T_m / (T_m + n T_s)``, which is ``<= b`` iff

.. math:: n \\ge \\frac{T_m (1 - b)}{b\\, T_s},

so the next interval is ``max(every, min(max_every, ceil(T_m (1-b) / (b T_s))))``. ``every`` is
then the *minimum* interval. ``T_m`` counts everything the monitor does at a measurement
(the estimate, the gradient norm, ``extra`` fields, the sink writes). The clock is
injectable (``clock=``) for testing.

**Gradient norm without side effects.** Unless the caller passes ``grad_norm=`` (e.g. the
norm it already computed), the monitor runs one extra forward/backward on the measured
batch with ``torch.autograd.grad`` inside :class:`~hutchtrace.core.state.PreservedState`:
``.grad`` fields, parameters, buffers (BatchNorm statistics), train/eval modes and the
global RNG are left untouched. It measures after the optimiser step when ``step()`` is
called after ``optimizer.step()`` (the recommended place).

**Resume.** :meth:`Monitor.state_dict` / :meth:`load_state_dict` carry the step counter,
the next measurement step, the timing estimates and the detector; with a fixed interval
(``overhead=None``) a resumed run produces bit-identical records and alarms.

Example:
    >>> import torch, hutchtrace
    >>> from hutchtrace import Monitor
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> ce = torch.nn.CrossEntropyLoss()
    >>> mon = Monitor(net, ce, every=5, K=4, overhead=None, warmup=5, seed=0)
    >>> for step in range(50):
    ...     opt.zero_grad(); ce(net(x), y).backward(); opt.step()
    ...     rec = mon.step(data=(x, y))
    >>> len(mon.history), sorted(mon.history[-1]["blocks"])[:2]
    (10, ['0', '2'])
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import distributed
from ..core.state import PreservedState
from ..problem.blocks import unwrap_model
from ..problem.loss import check_loss_value, make_loss_spec
from .cusum import Alarm, CUSUMDetector

__all__ = ["Monitor", "derive_seed"]

_MASK63 = (1 << 63) - 1


def derive_seed(seed: int, step: int) -> int:
    """A 63-bit probe seed for measurement ``step`` of a run seeded ``seed`` (splitmix64)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(step) + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK63


def _make_sinks(sinks) -> list:
    from . import sinks as sinks_mod

    out = []
    for s in sinks or []:
        if isinstance(s, str) or hasattr(s, "__fspath__"):
            out.append(sinks_mod.sink_for_path(s))
        elif hasattr(s, "write"):
            out.append(s)
        elif callable(s):
            out.append(sinks_mod.CallbackSink(s))
        else:
            raise TypeError(
                f"a sink must be a path, an object with write(record) or a callable, got {type(s).__name__}"
            )
    return out


class Monitor:
    """Per-block trace monitor with CUSUM alarms (see the module docstring).

    Args:
        model: the ``nn.Module`` being trained.
        loss: a criterion ``loss(outputs, targets)`` (with batches passed as ``data``) or a
            closure ``loss(model) -> scalar`` (then ``data`` is not needed).
        every: measurement interval in steps (fixed when ``overhead=None``, the minimum
            interval otherwise).
        K: probes per measurement (docs/maths.md section 3: ``K ~ K*..3K*``; 5-10 is typical online).
        blocks, probing, probe, hvp, curvature: passed to :func:`hutchtrace.block_traces`. With
            ``hvp="auto"`` the backbone chosen at the first measurement is kept for the run.
        overhead: the budget, a fraction of wall time in (0, 1), or ``None`` for a fixed interval.
        max_every: the largest interval the budget may choose.
        detector: a :class:`CUSUMDetector`, ``"auto"`` (two-sided, ``arl0=1000`` measurements,
            detrended with ``halflife=4*warmup``, calibrated on the first ``warmup``
            measurements), or ``None`` (no alarms).
        sinks: paths (``.jsonl``, ``.csv``, a directory -> TensorBoard), sink objects with
            ``write(record)``, or callables ``f(record)``.
        warmup: calibration length (measurements) for ``detector="auto"``.
        seed: base seed of the probes (each measurement uses ``derive_seed(seed, step)``).
        data: a fixed monitoring batch (used when ``step()`` gets no ``data``).
        grad_norm: compute the gradient norm when the caller does not pass one.
        on_alarm: optional callable ``f(alarm)`` called for every alarm.
        clock: time source (default ``time.perf_counter``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable,
        every: int = 50,
        K: int = 8,
        blocks="module",
        probing="global",
        *,
        overhead: float | None = 0.05,
        max_every: int = 100_000,
        detector: CUSUMDetector | str | None = "auto",
        sinks: Sequence = (),
        warmup: int = 30,
        seed: int = 0,
        data: Any = None,
        probe: str = "rademacher",
        hvp: str = "auto",
        curvature: str = "hessian",
        grad_norm: bool = True,
        on_alarm: Callable[[Alarm], Any] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError("loss must be a criterion loss(outputs, targets) or a closure loss(model)")
        for name, v in (("every", every), ("max_every", max_every), ("K", K)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if max_every < every:
            raise ValueError(f"max_every ({max_every}) must be >= every ({every})")
        if overhead is not None and not (0 < overhead < 1):
            raise ValueError(
                f"overhead must be a fraction in (0, 1) (e.g. 0.05 for 5%) or None, got {overhead!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.model = model
        self.loss = loss
        self.min_every = every
        self.max_every = max_every
        self.K = K
        self.blocks = blocks
        self.probing = probing
        self.probe = probe
        self.hvp = hvp
        self.curvature = curvature
        self.overhead = overhead
        self.seed = seed
        self.data = data
        self.compute_grad_norm = grad_norm
        self.on_alarm = on_alarm
        self.clock = clock
        if detector == "auto":
            detector = CUSUMDetector(k=0.5, arl0=1000, direction="both", warmup=warmup, halflife=4.0 * warmup)
        elif detector is not None and not isinstance(detector, CUSUMDetector):
            raise TypeError(
                f"detector must be a CUSUMDetector, 'auto' or None, got {type(detector).__name__}"
            )
        self.detector = detector
        self.sinks = _make_sinks(sinks)
        # progress state (all of it goes into state_dict)
        self.step_count = 0  # steps seen
        self.next_measure = 0  # step index of the next measurement
        self.every = every  # current interval
        self.n_measurements = 0
        self.t_meas: float | None = None  # EWMA seconds per measurement
        self.t_step: float | None = None  # EWMA seconds per training step (between calls)
        self.total_meas_s = 0.0
        self.total_s = 0.0
        self._last_exit: float | None = None
        self.hvp_used: str | None = None  # the backbone of the first measurement, then pinned
        self.history: list[dict] = []
        self.alarms: list[Alarm] = []

    # ------------------------------------------------------------------ public
    def step(
        self,
        step: int | None = None,
        data: Any = None,
        loss_value=None,
        grad_norm=None,
        extra: dict | Callable[[], dict] | None = None,
    ) -> dict | None:
        """Record one training step; measure if it is due. Returns the record or ``None``.

        Args:
            step: the caller's step number (default: the monitor's own counter). Measurement
                scheduling always uses the monitor's counter.
            data: the batch to measure on, ``(inputs, targets)``; default: ``Monitor(data=...)``.
            loss_value: the training loss of this step, recorded as given (tensor or float).
            grad_norm: the gradient norm, if the caller has it (skips the extra backward).
            extra: more fields for the record (a dict, or a callable returning one, evaluated
                only when a measurement is taken, e.g. a validation accuracy).
        """
        now = self.clock()
        if self._last_exit is not None:
            dt = now - self._last_exit
            self.total_s += dt
            self.t_step = dt if self.t_step is None else 0.9 * self.t_step + 0.1 * dt
        idx = self.step_count
        label = idx if step is None else int(step)
        self.step_count += 1
        record = None
        if idx >= self.next_measure:
            t0 = self.clock()
            record = self._measure(label, data, loss_value, grad_norm)
            record["meas_s"] = self.clock() - t0  # the estimate alone
            if extra is not None:
                more = extra() if callable(extra) else extra
                record.update({k: v for k, v in more.items() if k not in record})
            record["every"] = self.every  # the interval that scheduled this measurement
            self.n_measurements += 1
            self._emit(record)
            # the budget counts everything the monitor did: estimate, extra fields, sink writes
            dt_m = self.clock() - t0
            self.total_meas_s += dt_m
            self.total_s += dt_m
            self.t_meas = dt_m if self.t_meas is None else 0.7 * self.t_meas + 0.3 * dt_m
            self.every = self._interval()
            self.next_measure = idx + self.every
        self._last_exit = self.clock()
        return record

    __call__ = step

    def _interval(self) -> int:
        """The next measurement interval from the budget (module docstring)."""
        if self.overhead is None or self.t_meas is None or self.t_step is None:
            return self.min_every
        b = self.overhead
        if self.t_step <= 0:
            return self.max_every
        need = self.t_meas * (1.0 - b) / (b * self.t_step)
        n = math.ceil(need - 1e-9) if math.isfinite(need) else self.max_every
        n = int(max(self.min_every, min(self.max_every, n)))
        # under torch.distributed every rank must measure at the same steps (the measurement
        # is collective), but each rank timed itself: rank 0's interval is used everywhere
        return distributed.agree_int(n)

    @property
    def overhead_fraction(self) -> float:
        """Measured fraction of wall time spent measuring since the first call."""
        return self.total_meas_s / self.total_s if self.total_s > 0 else 0.0

    def close(self) -> None:
        """Flush and close every sink."""
        for s in self.sinks:
            close = getattr(s, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ measurement
    def _measure(self, step: int, data, loss_value, grad_norm) -> dict:
        from ..estimate.estimator import block_traces

        data = self.data if data is None else data
        if isinstance(data, list) and len(data) == 2 and torch.is_tensor(data[0]):
            data = tuple(data)  # a DataLoader yields [inputs, targets] lists
        spec = make_loss_spec(self.loss, data)  # validates loss/data before any work
        res = block_traces(
            self.model,
            self.loss,
            K=self.K,
            data=data,
            blocks=self.blocks,
            probing=self.probing,
            probe=self.probe,
            seed=derive_seed(self.seed, step),
            hvp=self.hvp_used or self.hvp,
            curvature=self.curvature,
            progress=False,
        )
        if self.hvp_used is None:
            # pin the backbone "auto" picked: backbones differ in rounding, and a series (or a
            # resumed run) should not switch between them on timing noise
            self.hvp_used = res.meta.get("hvp") or self.hvp
        if grad_norm is None and self.compute_grad_norm:
            loss_fresh, grad_norm = self._loss_and_grad_norm(spec)
            if loss_value is None:
                loss_value = loss_fresh
        record: dict[str, Any] = {
            "step": step,
            "measurement": self.n_measurements,
            "time": time.time(),
            "loss": _to_float(loss_value),
            "grad_norm": _to_float(grad_norm),
            "K": self.K,
            "blocks": {b.name: {"trace": b.mean, "se": b.se} for b in res.blocks},
            "total": {"trace": res.total.mean, "se": res.total.se},
        }
        alarms: list[Alarm] = []
        if self.detector is not None:
            values = {b.name: b.mean for b in res.blocks}
            ses = {b.name: b.se for b in res.blocks}
            alarms = self.detector.update(values, ses, step=step)
            stats = self.detector.statistics()
            for name, st in stats.items():
                if name in record["blocks"]:
                    record["blocks"][name].update(
                        cusum_up=st["up"], cusum_down=st["down"], baseline=st["baseline"]
                    )
            record["calibrating"] = self.detector.in_warmup
            record["threshold"] = self.detector.h
        record["alarms"] = [a.to_dict() for a in alarms]
        self.alarms.extend(alarms)
        if self.on_alarm is not None:
            for a in alarms:
                self.on_alarm(a)
        return record

    def _loss_and_grad_norm(self, spec) -> tuple[float, float]:
        # the unwrapped module: a DDP forward/backward would all-reduce gradients
        model = unwrap_model(self.model)
        params = [p for p in model.parameters() if p.requires_grad]
        with PreservedState(model):
            total, count = None, 0.0
            for batch in spec.batches():
                val = check_loss_value(batch.fn(model)) * batch.weight
                total = val if total is None else total + val
                count += batch.count
            total = total / count
            grads = torch.autograd.grad(total, params, allow_unused=True)
            sq = sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None)
        return float(total.detach()), math.sqrt(sq)

    def _emit(self, record: dict) -> None:
        self.history.append(record)
        if distributed.is_main_process():  # under DDP only rank 0 writes the logs
            for s in self.sinks:
                s.write(record)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Counters, interval, timing estimates, alarms and the detector state (plain types)."""
        return {
            "version": 1,
            "step_count": self.step_count,
            "next_measure": self.next_measure,
            "every": self.every,
            "n_measurements": self.n_measurements,
            "t_meas": self.t_meas,
            "t_step": self.t_step,
            "total_meas_s": self.total_meas_s,
            "total_s": self.total_s,
            "seed": self.seed,
            "hvp_used": self.hvp_used,
            "alarms": [a.to_dict() for a in self.alarms],
            "detector": None if self.detector is None else self.detector.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` (the model/optimiser are restored by the caller)."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a Monitor state_dict (version 1)")
        self.step_count = int(state["step_count"])
        self.next_measure = int(state["next_measure"])
        self.every = int(state["every"])
        self.n_measurements = int(state["n_measurements"])
        self.t_meas, self.t_step = state["t_meas"], state["t_step"]
        self.total_meas_s, self.total_s = float(state["total_meas_s"]), float(state["total_s"])
        self.seed = int(state["seed"])
        self.hvp_used = state.get("hvp_used")
        self.alarms = [Alarm(**a) for a in state["alarms"]]
        if state["detector"] is not None:
            if self.detector is None:
                self.detector = CUSUMDetector()
            self.detector.load_state_dict(state["detector"])
        self._last_exit = None  # the pause between runs is not a training step

    def __repr__(self) -> str:
        mode = f"overhead<={self.overhead:.0%}" if self.overhead is not None else "fixed"
        return (
            f"Monitor(K={self.K}, every={self.every} ({mode}), steps={self.step_count}, "
            f"measurements={self.n_measurements}, alarms={len(self.alarms)})"
        )


def _to_float(v) -> float | None:
    if v is None:
        return None
    if torch.is_tensor(v):
        return float(v.detach().reshape(-1)[0])
    return float(v)
