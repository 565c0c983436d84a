"""Train several models in lockstep on the same batches: same tokens, same steps, same schedule.

Each step draws one batch and gives it to every model in turn (LCKV and its plain twin), so the token
budget is equal by construction. The step count is either fixed (`steps`) or fitted to a wall-clock
budget: the first `calib_steps` steps are timed and the total is set so training ends inside the budget.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.data import RowSampler
from training.model import CausalLM


@dataclass
class TrainSettings:
    batch_rows: int = 64
    seq_len: int = 1024
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    steps: int | None = None          # fixed number of steps, or None = fit to time_budget
    time_budget: float = 420.0        # seconds of training (time_budget mode)
    calib_steps: int = 12
    log_every: int = 20
    seed: int = 0


def lr_at(step: int, total: int, st: TrainSettings) -> float:
    """Linear warmup, then cosine from lr to lr*min_lr_ratio at `total`."""
    if step < st.warmup_steps:
        return st.lr * (step + 1) / st.warmup_steps
    frac = min(1.0, (step - st.warmup_steps) / max(1, total - st.warmup_steps))
    return st.lr * (st.min_lr_ratio + (1 - st.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model: torch.nn.Module, st: TrainSettings, device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": st.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=st.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=torch.device(device).type == "cuda")


def train_lockstep(models: dict[str, CausalLM], sampler: RowSampler, st: TrainSettings, device,
                   log=print, log_file: str | None = None) -> dict:
    """Trains every model of `models` on the same batches. Returns per-model stats and the step count."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    opts = {k: make_optimizer(m, st, device) for k, m in models.items()}
    for m in models.values():
        m.train()
    total = st.steps or 10**9
    busy = {k: 0.0 for k in models}            # seconds each model's steps took (synchronized)
    recent = {k: [] for k in models}
    history = []
    t_start = time.perf_counter()
    t_calib = None
    sink = open(log_file, "a") if log_file else None
    step = 0
    while step < total:
        if st.steps is None and step == 2:
            t_calib = time.perf_counter()      # steps 0-1 include warm-up (allocator, cuBLAS plans)
        if st.steps is None and step == st.calib_steps:
            per_step = (time.perf_counter() - t_calib) / (st.calib_steps - 2)
            left = st.time_budget - (time.perf_counter() - t_start)
            total = step + max(1, int(0.97 * left / per_step))
            log(f"calibrated: {per_step * 1000:.0f} ms/step -> {total} steps "
                f"({total * st.batch_rows * st.seq_len / 1e6:.1f}M tokens per model)")
        lr = lr_at(step, total, st)
        x, y = sampler.batch(st.batch_rows)
        losses = {}
        for name, model in models.items():
            for g in opts[name].param_groups:
                g["lr"] = lr
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), st.grad_clip)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            losses[name] = loss.item()
            busy[name] += time.perf_counter() - t0
            recent[name] = (recent[name] + [losses[name]])[-50:]
            if not math.isfinite(losses[name]):
                raise FloatingPointError(f"{name}: loss {losses[name]} at step {step} (grad norm {gnorm})")
        step += 1
        if step % st.log_every == 0 or step == total or step == 1:
            elapsed = time.perf_counter() - t_start
            rec = {"step": step, "of": total if total < 10**9 else None, "lr": lr, "elapsed_s": round(elapsed, 1),
                   "tokens": step * st.batch_rows * st.seq_len,
                   **{f"loss_{k}": round(v, 4) for k, v in losses.items()},
                   **{f"tok_s_{k}": round(step * st.batch_rows * st.seq_len / busy[k]) for k in models}}
            history.append(rec)
            log(json.dumps(rec))
            if sink:
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
        if st.steps is None and time.perf_counter() - t_start > st.time_budget * 1.08:
            log(f"stopping at step {step}: over the time budget")
            break
    if sink:
        sink.close()
    tokens = step * st.batch_rows * st.seq_len
    return {
        "steps": step, "tokens_per_model": tokens, "train_seconds": round(time.perf_counter() - t_start, 1),
        "models": {k: {"final_train_loss_mean50": round(sum(recent[k]) / len(recent[k]), 4),
                       "tokens_per_second": round(tokens / busy[k]), "busy_seconds": round(busy[k], 1)}
                   for k in models},
        "history": history,
    }
