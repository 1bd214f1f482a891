"""Calibration metrics and temperature fitting; F1 and softmax come from the runtime (batchcls.metrics,
batchcls.pipeline) so training measures what users get and `batchcls eval` reports."""
from __future__ import annotations

import numpy as np
import torch


def ece(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: top-1 confidence vs accuracy over equal-width bins."""
    conf, pred = probs.max(1), probs.argmax(1)
    correct = pred == y_true
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def reliability(probs: np.ndarray, y_true: np.ndarray, bins: int = 15):
    """(bin centres, accuracy per bin, confidence per bin, count per bin) for the diagram."""
    conf, correct = probs.max(1), probs.argmax(1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    acc = np.bincount(idx, weights=correct, minlength=bins) / np.maximum(count, 1)
    cf = np.bincount(idx, weights=conf, minlength=bins) / np.maximum(count, 1)
    return (edges[:-1] + edges[1:]) / 2, acc, cf, count


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, steps: int = 100) -> float:
    """T minimising the NLL of softmax(logits / T) on held-out (validation) logits; LBFGS on log T.

    ``logits`` of shape (views, N, C) are several views of each image (test-time augmentation): then the NLL is
    of the mean of the views' probabilities, as serving averages them."""
    x = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(y_true, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        if x.dim() == 3:
            p = torch.softmax(x / log_t.exp(), dim=-1).mean(0)
            loss = -torch.log(p[torch.arange(len(y)), y].clamp_min(1e-12)).mean()
        else:
            loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T): the model selection criterion."""
    x = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return float(torch.nn.functional.cross_entropy(x, torch.as_tensor(y_true, dtype=torch.long)))
