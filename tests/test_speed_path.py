"""The fast path's choices, checked without timing anything."""

import math
import os
import sys

import pytest
import torch

from genlab import device as device_mod
from genlab.device import resolve_precision
from genlab.errors import GenlabError
from genlab.nets import dropout
from genlab.parts import build_model, build_optimizers
from genlab.trainer import Trainer

from conftest import compose_train, make_trainer


@pytest.mark.parametrize("has_bf16,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_the_bf16_units(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: has_bf16)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice wins


@pytest.mark.parametrize("capability,expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_cuda_means_native_bf16_on_that_gpu(monkeypatch, capability, expected):
    """A V100 (7.0) or T4 (7.5) runs bf16 only emulated, slowly, though torch.cuda.is_bf16_supported() says True:
    auto picks fp16 there. Only the hardware query is replaced; genlab's decision runs as it is."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    capabilities = {0: (8, 0), 1: capability}  # a machine with an A100 as cuda:0 and the GPU under test as cuda:1
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capabilities[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_precision("auto", torch.device("cuda:1")) == expected  # the trainer's own GPU decides
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"  # plain cuda: the current GPU, cuda:0


def test_unknown_precision_is_refused():
    with pytest.raises(GenlabError, match="trainer.precision=fp8"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("model", ["gan", "vae"])
def test_no_host_sync_between_log_rows(model, tmp_path, monkeypatch):
    """30 steps with log_every=10: the losses reach the host 3 times, and no step calls .item()."""
    t = make_trainer([f"model={model}", "dataset=synthetic", "dataset.n=320", "trainer.precision=bf16",
                      "trainer.max_steps=30", "trainer.batch_size=10", "trainer.log_every=10"], tmp_path)
    reads = []
    real_log = Trainer._log
    monkeypatch.setattr(Trainer, "_log", lambda self: reads.append(self.step) or real_log(self))
    real_item = torch.Tensor.item

    def item(self):  # genlab's own code must not read a tensor back per step (torch's internals may)
        caller = sys._getframe(1).f_code.co_filename
        if f"{os.sep}genlab{os.sep}" in caller and f"{os.sep}tests{os.sep}" not in caller:
            pytest.fail(f".item() in {caller}: a host sync inside the loop")
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    t.fit()
    assert reads == [10, 20, 30]
    assert [r["step"] for r in t.history] == [10, 20, 30]


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here")
def test_compile_path_trains_and_keeps_checkpoints_interchangeable(tmp_path):
    """trainer.compile=true: the networks are compiled in place, train, and their state dict keys are
    the eager ones, so a compiled run's checkpoint loads into an eager model."""
    overrides = ["model=gan", "dataset=synthetic", "dataset.n=64", "trainer.max_steps=3", "trainer.batch_size=16",
                 "trainer.log_every=1", "trainer.n_samples=4", "trainer.ema.decay=0.9"]
    cfg = compose_train(overrides)
    eager_keys = list(build_model(cfg).state_dict())
    t = make_trainer([*overrides, "trainer.compile=true"], tmp_path)
    m = t.model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    t.fit()
    assert all(net._compiled_call_impl is not None for net in m.children())  # really compiled
    assert all(net._compiled_call_impl is None for net in t.ema.model.children())  # the average never is
    assert list(m.state_dict()) == eager_keys == list(t.ema.model.state_dict())
    assert all(not torch.equal(before[k], v) for k, v in m.state_dict().items() if k.endswith("weight"))
    assert all(math.isfinite(r[k]) for r in t.history for k in ("train/loss_d", "train/loss_g"))
    eager = build_model(cfg)
    eager.load_state_dict(torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"])


@pytest.mark.parametrize("model", ["gan", "vae"])
def test_default_optimizers_are_fused(model):
    cfg = compose_train([f"model={model}"])
    opts = build_optimizers(cfg.optimizer, build_model(cfg))
    assert opts and all(o.defaults["fused"] for o in opts.values())


def test_cheap_dropout_mask_is_dropout():
    """genlab.nets.Dropout draws its CPU mask from 16-bit lanes: the keep rate, the scale, the gradient and
    eval mode must be those of nn.Dropout."""
    torch.manual_seed(0)
    for p in (0.1, 0.3, 0.5):
        keep = dropout.keep_mask((1000, 1000), p)
        assert keep.dtype == torch.bool and abs(keep.float().mean().item() - (1 - p)) < 0.002
        lanes = keep.view(-1, 4).float().mean(0)  # every lane, the 15-bit one too, keeps 1 - p
        assert torch.allclose(lanes, torch.full((4,), 1 - p), atol=0.004)
    d = dropout.Dropout(0.3)
    x = torch.ones(200, 500, requires_grad=True)
    y = d(x)
    assert y.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the mask times the scale
    assert torch.equal(d.eval()(x), x)
    assert not torch.equal(dropout.keep_mask((64,), 0.5), dropout.keep_mask((64,), 0.5))  # fresh draws
