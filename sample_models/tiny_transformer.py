"""Tiny pre-LayerNorm transformer classifier on digits -- the SDPA / no-double-backward sample.

Each 8x8 digits image is a sequence of 8 tokens (its rows, 8 pixels each).
Model: Linear(8 -> 32) token projection + learned positional embedding (8 x 32),
       2 pre-LN blocks [LayerNorm -> 4-head self-attention -> residual,
       LayerNorm -> MLP 32-128-32 (GELU) -> residual], final LayerNorm,
       mean-pool over tokens, Linear(32 -> 10).  No weight tying, no dropout.
       26,346 parameters.
Attention is computed with ``torch.nn.functional.scaled_dot_product_attention``.
On CPU (torch 2.13, float32) that dispatches to a fused flash-attention kernel
whose backward is NOT differentiable: a Hessian-vector product by double
backward fails with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented".
curvdiag must detect this and fall back (e.g. to finite-difference HVPs, or to
the math SDPA backend via ``torch.nn.attention.sdpa_kernel``).
Data:  the first 1000 scikit-learn ``load_digits`` samples, pixels scaled to
       [0, 1], shaped (N, 8, 8), as 2 consecutive mini-batches of 500.
Loss:  cross-entropy (mean over the batch).
Optimizer: ``torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)``.

Checkpoint ``checkpoints/tiny_transformer.pt``: 300 AdamW steps (150 epochs of 2 batches).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _digits import batches, digits_rows  # noqa: E402

SEED = 0
D_MODEL = 32
N_HEADS = 4
N_LAYERS = 2
SEQ_LEN = 8
TOKEN_DIM = 8
D_MLP = 128


class SelfAttention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)  # (b, h, t, d/h)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, d_model, n_heads, d_mlp):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, elementwise_affine=True)
        self.attn = SelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model, elementwise_affine=True)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(TOKEN_DIM, D_MODEL)
        self.pos = nn.Parameter(torch.randn(SEQ_LEN, D_MODEL) * 0.02)
        self.blocks = nn.ModuleList(Block(D_MODEL, N_HEADS, D_MLP) for _ in range(N_LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL, elementwise_affine=True)
        self.head = nn.Linear(D_MODEL, 10)

    def forward(self, x):  # x: (batch, 8 tokens, 8 features)
        h = self.embed(x) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h).mean(dim=1))


def model():
    """Fresh tiny transformer, deterministically initialised (seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return TinyTransformer()


def data():
    """2 mini-batches of 500: x (500, 8, 8) float32 in [0,1], y (500,) int64."""
    x, y = digits_rows(1000)
    return batches(x, y, 500)


def loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def optimizer(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
