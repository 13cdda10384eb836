"""The HF TrainerCallback: a 2-step Trainer run on a tiny random GPT-2 (skipped without transformers)."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

import hutchtrace
from hutchtrace.monitor.sinks import read_log

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, T: int = 8, vocab: int = 32):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, vocab, (n, T), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_inner=32, vocab_size=32, n_positions=8,
                                  bos_token_id=0, eos_token_id=0)  # dropout 0.1: the RNG matters
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg)


def _train(tmp_path, callbacks, tag):
    model = _model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / tag), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, losses


def test_two_step_trainer_run_records_traces_and_trains_as_without(tmp_path):
    from hutchtrace.monitor.hf import HutchtraceTrainerCallback

    cb = HutchtraceTrainerCallback(every=1, K=3, overhead=None, detector=None, seed=0,
                                   sinks=[tmp_path / "curv.jsonl"])
    assert isinstance(cb, transformers.TrainerCallback)
    with_cb, losses_cb = _train(tmp_path, [cb], "with")
    without, losses = _train(tmp_path, [], "without")

    rows = read_log(tmp_path / "curv.jsonl", as_dataframe=False)
    assert [r["step"] for r in rows] == [1, 2]  # after each optimiser step
    traces = {k for k in rows[0] if k.startswith("trace/")}
    modules = hutchtrace.resolve_blocks(with_cb, "module").block_names  # the Monitor's default blocks
    assert traces == {f"trace/{m}" for m in modules} | {"trace/total"}
    assert "transformer.wte" in modules and "lm_head" not in modules  # tied: one block
    for r in rows:
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in traces)
        assert all(r[f"se/{m}"] > 0 for m in modules)
        assert r["loss"] is not None and r["grad_norm"] > 0
    assert rows[0]["trace/transformer.ln_f"] != rows[1]["trace/transformer.ln_f"]  # the model moved
    # the measurement batch is the first 4 training examples, fixed for the run
    assert torch.equal(cb.batch["input_ids"], TokenDataset().ids[:4])

    # training unaffected: same losses and bit-identical weights as a run without the callback
    assert losses_cb == losses and len(losses) == 2
    for (n, a), (_, b) in zip(with_cb.named_parameters(), without.named_parameters()):
        assert torch.equal(a, b), n


def test_explicit_batch_and_loss(tmp_path):
    from hutchtrace.monitor.hf import HutchtraceTrainerCallback

    ids = TokenDataset().ids[4:6]
    seen = []

    def loss(model, batch):
        seen.append(batch["input_ids"].shape)
        logits = model(input_ids=batch["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), batch["input_ids"][:, 1:].reshape(-1))

    cb = HutchtraceTrainerCallback(loss=loss, batch={"input_ids": ids}, every=2, K=2, overhead=None,
                                   detector=None, blocks="param")
    _train(tmp_path, [cb], "explicit")
    assert len(cb.monitor.history) == 1 and seen and all(s == (2, 8) for s in seen)
    assert "transformer.wte.weight" in cb.monitor.history[0]["blocks"]
    assert cb.load_state_dict(cb.state_dict()) is None


def test_clear_errors(tmp_path):
    import hutchtrace.monitor.hf as hf

    cb = hf.HutchtraceTrainerCallback(every=1, K=2, batch={"input_ids": TokenDataset().ids[:2]}, overhead=None,
                                      detector=None)
    with pytest.raises(ValueError, match="include 'labels'"):
        _train(tmp_path, [cb], "nolabels")
    with pytest.raises(ValueError, match="pass batch="):
        hf.first_examples(None)


def test_clear_import_error_without_transformers(monkeypatch):
    import sys

    import hutchtrace.monitor.hf as hf

    monkeypatch.setattr(hf, "_CLASS", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        _ = hf.HutchtraceTrainerCallback
