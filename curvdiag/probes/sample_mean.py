"""The mean of k independent samples and its standard error, the one summary every stochastic
estimator reports (Hutchinson's trace and diagonal, the glass).

For samples x_1 … x_k (each a number, or a tensor of any shape): x̄ = Σ x_i / k and
s.e. = s / √k with s² = Σ (x_i − x̄)² / (k − 1), the unbiased sample variance. With k < 2 the
standard error is undefined and returned as +inf (no precision claimed).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch


def mean_and_stderr(samples: Union[Sequence[float], torch.Tensor]) -> Tuple:
    """(x̄, s.e.) over the samples: floats for a sequence of numbers; for a tensor of shape
    (k, ...), tensors of shape (...) computed over dim 0."""
    if isinstance(samples, torch.Tensor):
        k = samples.shape[0]
        mean = samples.mean(dim=0)
        if k < 2:
            return mean, torch.full_like(mean, math.inf)
        return mean, samples.std(dim=0, unbiased=True) / math.sqrt(k)
    values = [float(v) for v in samples]
    k = len(values)
    mean = sum(values) / k
    if k < 2:
        return mean, math.inf
    variance = sum((v - mean) ** 2 for v in values) / (k - 1)
    return mean, math.sqrt(variance / k)
