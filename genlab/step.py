"""The step API: what a model's ``training_step(batch, ctx)`` gets as ``ctx``.

A model owns its step: it computes its losses and calls ``ctx.backward``, ``ctx.clip`` and ``ctx.step`` in the
order it needs, while the StepContext handles precision, gradient scaling, averaging over processes and the
NaN policy behind those calls. The loop that calls the step is genlab.trainer.
"""

import hashlib

import torch
from torch import Tensor

from genlab import dist
from genlab.device import autocast, resolve_precision
from genlab.errors import GenlabError

ON_NAN = ("stop", "skip")


def check_on_nan(value: str) -> None:
    if value not in ON_NAN:
        raise GenlabError(f"trainer.on_nan={value} is not one of {', '.join(ON_NAN)}.")


class StepContext:
    """What ``training_step`` gets: the run's precision and the optimizers, by name.

    - ``autocast()``: the mixed-precision context for forward passes.
    - ``backward(loss, name)``: gradients of ``loss`` into the parameters of optimizer ``name`` only (every
      parameter without a name), scaled under fp16. Several losses may be backpropagated before any
      step, so that every gradient is taken before any weight changes (``retain_graph=True`` for a
      shared graph).
    - ``clip(name, max_norm)``: clip that optimizer's gradient norm (unscaled first under fp16); returns the norm.
    - ``step(name)``: apply that optimizer's update, then clear its gradients.
    - ``applied(name)``: whether the last ``step(name)`` changed the weights (false when the fp16 scaler
      skipped it for overflowing gradients, or on_nan=skip dropped the step). Under fp16 it reads the
      scaler's verdict from the device, a sync, so it is computed only when asked.
    - ``step_index``: the optimisation steps done before this one.
    - ``chunks(*tensors)``: the step's micro-batches (``accumulate``, trainer.accumulate): the tensors (a batch and
      what was drawn for it; None passes through) split along their first dimension. While one is out, ``backward``
      scales each loss by its ``share`` of the batch, so that the gradients sum to those of the whole batch's mean
      loss, and ``tally(out, name=loss)`` adds its share of a loss to the step's logged mean. Draw a step's noise for
      the whole batch before splitting it: the step then computes what one batch of that size computes.

    A training step is all or nothing: ``on_nan=skip`` reads each loss, and without a scaler each
    gradient, on the host before it is used, and a non-finite one drops the whole step; under fp16, an
    update the scaler skips for overflowing gradients drops the whole step too. The updates a dropped step
    had already applied are undone (each optimizer's weights and state are copied before its update, when
    a later one could still drop the step), and the loop puts back the batch-norm statistics of its start.
    Under fp16 that happens on the device, with no host sync.

    An optimizer may be stepped several times in one training step (an inner critic loop): each update is
    averaged over the ranks, and a dropped step puts back the weights and states of the training step's start.

    Under several processes (genlab.dist) each optimizer's gradients are averaged over the ranks, in one
    flat all-reduce, before it clips or steps (the ranks need not agree on which parameters have gradients);
    a non-finite loss on any rank (``on_nan=skip``) rides along
    in that all-reduce, so that every rank drops the same steps. No network is wrapped (no
    DistributedDataParallel), so a model's step may take several backward passes, ``inputs=`` and
    ``retain_graph`` as it likes: what is averaged is what each optimizer is about to apply.
    """

    def __init__(self, optimizers: dict, precision: str = "fp32", device="cpu", schedulers: dict | None = None,
                 on_nan: str = "stop", accumulate: int = 1):
        check_on_nan(on_nan)
        self.accumulate, self.share = accumulate, 1.0  # micro-batches a step; the share of the one in progress
        self.chunked = False  # whether the step in progress split its batch (chunks)
        self.optimizers, self.schedulers, self.on_nan = optimizers, schedulers or {}, on_nan
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.params = {k: [p for group in o.param_groups for p in group["params"]] for k, o in optimizers.items()}
        self.step_index = 0
        self.dropped = False  # on_nan=skip found a non-finite loss or gradient in this training step (every rank agrees)
        self._bad = False  # this rank saw a non-finite loss (on_nan=skip), not yet shared with the others
        self._reduced: set[str] = set()  # optimizers whose gradients were averaged over the ranks in this step
        self._applied: dict[str, bool | Tensor] = {}  # name -> applied (a device flag under fp16)
        # an update may have to be undone when a later one of the same step can still drop it: another
        # optimizer's, or a second update of the same one (an inner critic loop); copies are taken once a step
        self.undoable = on_nan == "skip" or self.scaler is not None
        self._saved: list[tuple] = []  # (optimizer, param, copies of the param and its state) at this step's start
        self._kept: set[int] = set()  # ids of the parameters copied in ``_saved``
        self._unsettled: set[str] = set()  # the optimizers the scaler unscaled or stepped since its last update

    def autocast(self):
        return autocast(self.device, self.precision)

    def chunks(self, *tensors):
        """The micro-batches of ``tensors`` (one: the tensors as they are), each a tuple; ``share`` meanwhile."""
        self.chunked = True
        sizes = {len(t) for t in tensors if t is not None}
        if len(sizes) != 1:
            raise GenlabError(f"ctx.chunks takes tensors of one batch, of the same first size; got sizes {sorted(sizes)}.")
        n = sizes.pop()
        parts = max(1, min(self.accumulate, n))
        if parts == 1:
            yield tensors
            return
        pieces = [t.tensor_split(parts) if t is not None else (None,) * parts for t in tensors]
        try:
            for piece in zip(*pieces):
                self.share = len(next(t for t in piece if t is not None)) / n
                yield piece
        finally:
            self.share = 1.0

    def tally(self, out: dict, **losses: Tensor) -> dict:
        """``out`` with each loss's share of the step's mean added (detached)."""
        for k, v in losses.items():
            v = v.detach() * self.share if self.share != 1 else v.detach()
            out[k] = out[k] + v if k in out else v
        return out

    def backward(self, loss: Tensor, name: str | None = None, retain_graph: bool = False) -> None:
        if self.on_nan == "skip" and not self.dropped and not self._bad and not torch.isfinite(loss):
            self._bad = True
            self.dropped = dist.world() == 1  # alone, drop at once; else the step's all-reduce tells every rank
        if self.dropped:
            return
        if self.scaler is not None:
            if self._unsettled and (name is None or name in self._unsettled):
                self._settle()  # new gradients for an optimizer already stepped (an inner loop): at the next scale
            loss = self.scaler.scale(loss)
        if self.share != 1:
            loss = loss * self.share
        inputs = None
        if name is not None:  # a frozen parameter (requires_grad=False) in an optimizer's group gets no gradient
            inputs = [p for p in self.params[name] if p.requires_grad]
            if not inputs:
                raise GenlabError(f"ctx.backward(loss, {name!r}): every parameter of optimizer {name!r} has "
                                  "requires_grad=False, so there is nothing to train; unfreeze some, or leave that "
                                  "optimizer out of optimizer_groups().")
        loss.backward(inputs=inputs, retain_graph=retain_graph)

    def clip(self, name: str, max_norm: float) -> Tensor:
        self._average(name)
        if self.scaler is not None and not self.dropped:
            self.scaler.unscale_(self.optimizers[name])
            self._unsettled.add(name)
        return torch.nn.utils.clip_grad_norm_(self.params[name], max_norm)

    def step(self, name: str) -> None:
        opt = self.optimizers[name]
        self._average(name)
        if self.dropped:
            self._applied[name] = False
        elif self.scaler is None and self.on_nan == "skip" and not grads_finite(self.params[name]):
            self.dropped, self._applied[name] = True, False
        else:
            if self.undoable:
                self._save(opt)
            if self.scaler is not None:  # the scaler skips an update whose gradients overflowed, on the device
                self.scaler.step(opt)
                self._unsettled.add(name)
                applied = sum(self.scaler._found_inf_per_device(opt).values()) == 0
                self._applied[name] = applied & self._applied.get(name, True)  # every update of it applied
            else:
                opt.step()
                self._applied[name] = True
        opt.zero_grad(set_to_none=True)
        self._reduced.discard(name)  # a second step of this optimizer in this training step is averaged again

    def _average(self, name: str) -> None:
        """Several processes: this optimizer's gradients averaged over the ranks (once a step), and whether any
        rank saw a non-finite loss (on_nan=skip) agreed with the same all-reduce."""
        if dist.world() == 1 or self.dropped or name in self._reduced:
            return
        self._reduced.add(name)
        flag = torch.tensor([float(self._bad)], device=self.device) if self.on_nan == "skip" else None
        bad = dist.average_gradients(self.params[name], flag)
        if bad is not None and bad.item() > 0:
            self.dropped = True

    def _save(self, opt) -> None:
        """Copies of what ``opt``'s update is about to change: its parameters that have gradients, and their state,
        as they were at the start of the training step (a parameter updated twice is copied before the first)."""
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None and id(p) not in self._kept:
                    self._kept.add(id(p))
                    state = opt.state.get(p)
                    self._saved.append((opt, p, p.detach().clone(), {k: v.clone() if isinstance(v, Tensor) else v
                                                                     for k, v in state.items()} if state else None))

    def _undo(self, undo: bool | Tensor) -> None:
        """Put back what this step's updates changed: at once when ``undo`` is True; under fp16 where the device
        flag ``undo`` says so, with no host sync (lerp by 0 or 1 is exact at both ends)."""
        if isinstance(undo, Tensor) and any(state is None for *_, state in self._saved):
            undo = bool(undo)  # a first update created the state: whether to remove it is decided on the host
        with torch.no_grad():
            if not isinstance(undo, Tensor):
                for opt, p, before, state in self._saved if undo else ():
                    p.copy_(before)
                    if state is None:
                        opt.state.pop(p, None)
                    else:
                        opt.state[p] = state
                return
            now, then = [], []
            for opt, p, before, state in self._saved:
                pairs = [(p, before)] + [(opt.state[p][k], v) for k, v in state.items() if isinstance(v, Tensor)]
                for a, b in pairs:
                    if a.is_floating_point():
                        now.append(a)
                        then.append(b)
                    else:
                        a.copy_(torch.where(undo, b, a))
            if now:
                torch._foreach_lerp_(now, then, [undo.to(t.dtype) for t in now])

    def _settle(self) -> None:
        """The scaler's update (its scale backs off after an overflow, or grows), between a training step's updates
        of one optimizer as well as at its end: a scaler steps each optimizer once between updates."""
        self.scaler.update()
        self._unsettled.clear()

    def applied(self, name: str) -> bool:
        return bool(self._applied.get(name, False))

    def begin(self, step_index: int) -> None:
        self.step_index, self.dropped, self._applied, self._unsettled = step_index, False, {}, set()
        self._bad, self._reduced, self._saved, self._kept, self.chunked = False, set(), [], set(), False

    def end(self) -> Tensor | bool:
        """Close a training step: the scaler's update, each schedule's step. Returns whether every update
        was applied: False when the step was dropped; under fp16 a device flag (no sync)."""
        if self._unsettled:
            self._settle()
        for s in self.schedulers.values():
            s.step()
        if self.dropped:
            for o in self.optimizers.values():  # nothing of the dropped step carries over, gradients included
                o.zero_grad(set_to_none=True)
            if self._saved:
                self._undo(True)
            return False
        flags = [f for f in self._applied.values() if isinstance(f, Tensor)]
        if not flags:
            return True
        applied = torch.stack(flags).all()
        if self._saved:  # fp16: an update skipped for overflow drops the whole step
            self._undo(~applied)
        return applied

    def state_dict(self) -> dict:
        return {"optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            if k in state.get("schedulers", {}):
                s.load_state_dict(state["schedulers"][k])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of a training step's random draws (noise, latents, timesteps, dropout): a function of the run's
    seed, the process's rank and the step alone, so that a resumed run draws what an uninterrupted one would,
    whatever ran in between, and each rank draws its own."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest(), "little")


def grads_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())
