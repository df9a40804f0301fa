"""Measurements of the non-inferiority study during training (`ni.py`): held and peak
activation bytes per step, and the gradient probe (LASER's gradient against the exact one on
the same batch, next to the exact gradients of two batches as the noise reference)."""

from __future__ import annotations

import copy

import torch

from ..livebytes import LiveBytes

__all__ = ["grad_probe", "measure_steps", "probe_batches"]


def _flat_grad(trainer, batch: dict, with_laser: bool) -> torch.Tensor:
    from laser_triton.trm import act_loss

    model = trainer.model
    saved = model.laser
    model.laser = trainer.laser if with_laser else None
    params = [p for _, p in trainer._main_named() if p.requires_grad]
    try:
        model.train()
        carry = model.initial_carry(batch)
        gen = torch.Generator(device=trainer.device).manual_seed(12345)
        carry, out = model(carry, batch, generator=gen)
        loss, _ = act_loss(out["logits"], out["q_halt_logits"], carry.data["labels"],
                           carry.halted, carry.steps)
        grads = torch.autograd.grad(loss / batch["inputs"].shape[0], params, allow_unused=True)
    finally:
        model.laser = saved
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten().double()
                      for p, g in zip(params, grads)])


def grad_probe(trainer, probe_stream) -> dict[str, float]:
    """cos(g_LASER(A), g_exact(A)) and the noise reference cos(g_exact(A), g_exact(B)) on two
    fresh batches; LASER's state and torch's RNG are restored, so training is unchanged."""
    dev = trainer.device
    a = {k: v.to(dev) for k, v in next(probe_stream).items()}
    b = {k: v.to(dev) for k, v in next(probe_stream).items()}
    rng = torch.get_rng_state()
    # state_dict() does not copy its tensors, and the probe's steps update them in place.
    laser_state = (copy.deepcopy(trainer.laser.state_dict()) if trainer.laser is not None
                   else None)
    cos = torch.nn.functional.cosine_similarity
    try:
        g_a = _flat_grad(trainer, a, False)
        g_b = _flat_grad(trainer, b, False)
        out = {"grad_cos_noise": float(cos(g_a, g_b, dim=0))}
        if trainer.laser is not None:
            out["grad_cos"] = float(cos(_flat_grad(trainer, a, True), g_a, dim=0))
    finally:
        torch.set_rng_state(rng)
        if laser_state is not None:
            trainer.laser.load_state_dict(laser_state)
    return out


def _held_bytes(trainer, counter) -> int:
    if trainer.laser is not None:
        return int(trainer.laser.summary()["stored_bytes"])
    return int(counter.total_bytes())


def measure_steps(trainer, steps: int, memory_every: int = 1, peak_every: int = 1,
                  probe_every: int = 0, probe_stream=None, fork_step0: int = 0,
                  log=None) -> list[dict]:
    """Run `steps` training steps, recording held bytes, peak bytes (byte accounting) and
    gradient cosines at the declared intervals; one dict per step that recorded anything."""
    from laser_triton.trm.savecount import SavedTensorCounter

    rows = []
    for _ in range(steps):
        k = trainer.step - fork_step0  # fork steps done before this one
        row: dict = {"fork_step": k}
        if probe_every and k % probe_every == 0 and probe_stream is not None:
            row.update(grad_probe(trainer, probe_stream))
        counter = None
        if trainer.laser is None and (k + 1) % memory_every == 0:
            counter = SavedTensorCounter()
            trainer.model.laser = counter
        live = LiveBytes() if (k + 1) % peak_every == 0 else None
        try:
            if live is not None:
                with live:
                    out = trainer.train_step()
            else:
                out = trainer.train_step()
        finally:
            if counter is not None:
                trainer.model.laser = None
        row["loss"] = out["loss"]
        if (k + 1) % memory_every == 0:
            row["held_bytes"] = _held_bytes(trainer, counter)
        if live is not None:
            row["peak_bytes"] = live.peak
        if len(row) > 2:
            rows.append(row)
        if log and trainer.step % 25 == 0:
            log(f"  step {trainer.step}: loss {out['loss']:.3f}")
    return rows


def probe_batches(trainer, seed: int):
    """Fresh batches for the gradient probe, apart from the training stream (its own seed)."""
    from laser_triton.data.sudoku import PuzzleStream

    return PuzzleStream(trainer.data[0], trainer.data[1], trainer.cfg.batch_size,
                        seed=10_000 + seed, augment=trainer.cfg.augment)
