"""Tiny seeded models and data for exact comparisons (float64 unless a test says otherwise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tanh_mlp(dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)


def regression_batches(dtype=torch.float64, sizes=(7, 3)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 4, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)) for n in sizes]


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


class TinyAttention(torch.nn.Module):
    """Affine LayerNorm + self-attention through F.scaled_dot_product_attention (fused on CPU)."""

    def __init__(self, d: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(d)
        with torch.no_grad():
            self.norm.weight.add_(0.3 * torch.randn(d))
            self.norm.bias.add_(0.1 * torch.randn(d))
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, 3)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return self.out(a.mean(dim=1))


def sequence_batches(dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(5, 3, 4, generator=g, dtype=dtype), torch.randn(5, 3, generator=g, dtype=dtype))]


class _FusedTanhBackward(torch.autograd.Function):
    """The backward kernel: differentiating it raises like PyTorch's fused attention does."""

    @staticmethod
    def forward(ctx, grad, y):
        return grad * (1 - y * y)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("derivative for aten::fused_tanh_backward is not implemented")


class OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward cannot itself be differentiated (like a fused kernel)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _FusedTanhBackward.apply(grad, y)


class MarkedOnceDifferentiableTanh(OnceDifferentiableTanh):
    """tanh whose backward is marked ``@once_differentiable``: differentiating it twice raises nothing
    and silently adds nothing (torch leaves an ``Error`` node in the graph)."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class FusedKernelMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 6)
        self.b = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.b(OnceDifferentiableTanh.apply(self.a(x)))


class MarkedFusedKernelMLP(FusedKernelMLP):
    def forward(self, x):
        return self.b(MarkedOnceDifferentiableTanh.apply(self.a(x)))


class BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 5)
        self.bn = torch.nn.BatchNorm1d(5)
        self.drop = torch.nn.Dropout(0.5)
        self.b = torch.nn.Linear(5, 3)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.3)
            self.bn.running_var.fill_(2.0)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.bn(self.a(x)))))


class TiedAutoencoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(4, 3, bias=False)
        self.decoder = torch.nn.Linear(3, 4, bias=False)
        self.decoder.weight = torch.nn.Parameter(self.encoder.weight.T.clone())
        self.decoder.weight = self.encoder.weight  # tied: shape (3, 4) used transposed below

    def forward(self, x):
        return torch.tanh(x @ self.encoder.weight.T) @ self.encoder.weight
