"""The Lightning callback completes a 2-epoch fit on a tiny model (skipped without Lightning)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import snapshot

from hutchtrace.monitor.sinks import read_log

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError:
        pl = None

needs_pl = pytest.mark.skipif(pl is None, reason="needs lightning or pytorch_lightning")
if pl is not None:
    from hutchtrace.monitor.lightning import HutchtraceCallback


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_class():
    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
            with torch.no_grad():
                for p in self.net.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.crit = torch.nn.CrossEntropyLoss()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.crit(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny


def Tiny():
    return _tiny_class()()


def _loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)


def _trainer(tmp_path, cb, epochs=2):
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
    )


@needs_pl
def test_callback_two_epoch_fit(tmp_path):
    module = Tiny()
    cb = HutchtraceCallback(
        torch.nn.CrossEntropyLoss(),
        every=2,
        K=3,
        overhead=None,
        warmup=3,
        sinks=[tmp_path / "curv.jsonl"],
        seed=0,
    )
    assert isinstance(cb, pl.Callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, cb).fit(module, _loader())
    mon = cb.monitor
    assert mon.step_count == 8  # 2 epochs x 4 batches
    rows = read_log(tmp_path / "curv.jsonl", as_dataframe=False)
    # measured on the 1st, 3rd, ... batch; stamped with trainer.global_step (optimiser steps taken)
    assert [r["step"] for r in rows] == [1, 3, 5, 7]
    assert {"trace/net.0", "trace/net.2", "se/net.0", "loss", "grad_norm"} <= set(rows[0])
    assert all(r["loss"] is not None and r["grad_norm"] > 0 for r in rows)
    assert rows[-1]["calibrating"] is False  # warm-up of 3 measurements done
    # checkpoint round trip of the callback state
    state = cb.state_dict()
    cb2 = HutchtraceCallback(torch.nn.CrossEntropyLoss(), every=2, K=3, overhead=None, warmup=3)
    cb2.load_state_dict(state)
    cb2.setup(None, Tiny())
    assert cb2.monitor.state_dict() == mon.state_dict()


@needs_pl
def test_callback_leaves_model_alone(tmp_path):
    """Same weights with and without the callback (the monitor never touches grads/params/RNG)."""
    finals = []
    for use in (False, True):
        module = Tiny()
        cbs = (
            [HutchtraceCallback(torch.nn.CrossEntropyLoss(), every=1, K=2, overhead=None, detector=None)]
            if use
            else []
        )
        trainer = pl.Trainer(
            max_epochs=1,
            callbacks=cbs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
            accelerator="cpu",
            devices=1,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, _loader())
        finals.append(snapshot(module))
    for a, b in zip(finals[0]["params"], finals[1]["params"]):
        assert torch.equal(a, b)


def test_clear_import_error_without_lightning(monkeypatch):
    import sys

    import hutchtrace.monitor.lightning as hl

    monkeypatch.setattr(hl, "_CLASS", None)
    for mod in (
        "lightning",
        "lightning.pytorch",
        "lightning.pytorch.callbacks",
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
    ):
        monkeypatch.setitem(sys.modules, mod, None)  # import of these now raises ImportError
    with pytest.raises(ImportError, match="pip install lightning"):
        _ = hl.HutchtraceCallback
