"""The fast path's choices, checked without timing anything."""

import os
import sys

import pytest
import torch

from genlab import trainer as trainer_mod
from genlab.build import build_dataset, build_model, build_optimizers
from genlab.errors import GenlabError
from genlab.trainer import Trainer, resolve_precision

from conftest import compose_train


@pytest.mark.parametrize("has_bf16,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_the_bf16_units(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(trainer_mod, "cpu_has_fast_bf16", lambda: has_bf16)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice wins


@pytest.mark.parametrize("bf16_gpu,expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda(monkeypatch, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert resolve_precision("auto", torch.device("cuda")) == expected


def test_unknown_precision_is_refused():
    with pytest.raises(GenlabError, match="trainer.precision=fp8"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("model", ["gan", "vae"])
def test_no_host_sync_between_log_rows(model, tmp_path, monkeypatch):
    """30 steps with log_every=10: the losses reach the host 3 times, and no step calls .item()."""
    cfg = compose_train([f"model={model}", "dataset=synthetic", "dataset.n=320", "trainer.precision=bf16"])
    m = build_model(cfg)
    t = Trainer(m, build_optimizers(cfg.optimizer, m), build_dataset(cfg.dataset).images, tmp_path,
                precision="bf16", max_steps=30, batch_size=10, log_every=10, progress=False)
    reads = []
    real_log_row = Trainer._log_row
    monkeypatch.setattr(Trainer, "_log_row", lambda self, *a: reads.append(self.step_index) or real_log_row(self, *a))
    real_item = torch.Tensor.item

    def item(self):  # genlab's own code must not read a tensor back per step (torch's internals may)
        caller = sys._getframe(1).f_code.co_filename
        if f"{os.sep}genlab{os.sep}" in caller and f"{os.sep}tests{os.sep}" not in caller:
            pytest.fail(f".item() in {caller}: a host sync inside the loop")
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    t.fit()
    assert reads == [10, 20, 30]
    assert [r["step"] for r in t.rows] == [10, 20, 30]
