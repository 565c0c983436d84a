"""Held-out perplexity with the training framework's parallel forward (LCKV: the iterative forward)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.model import CausalLM


@torch.no_grad()
def perplexity(model: CausalLM, rows: torch.Tensor, batch: int = 32, passes: int | None = None,
               device=None, autocast: bool = True) -> dict:
    """rows (N, T+1) int64: every row scored on its T next-token predictions. -> {nll, ppl, tokens}.

    LCKV models run the block `passes` times (default m+b, as the runtime's parallel prefill does)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch):
        r = rows[i:i + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
            logits = model(r[:, :-1], passes=passes)
        nll = F.cross_entropy(logits.float().flatten(0, 1), r[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += r[:, 1:].numel()
    model.train(was_training)
    return {"nll": total / count, "ppl": math.exp(total / count), "tokens": count}
