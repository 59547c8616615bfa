"""Models for the Gauss–Newton control variate beyond Linear/LayerNorm, built from code with seeded
random weights (no downloads): a torchvision-style ResNet-18 (BasicBlock, BatchNorm in eval mode
with running statistics from a few training-mode forwards), a tiny conv + BatchNorm2d net, and a
tiny transformer with a bare positional parameter and SDPA attention. ``width`` shrinks them for
dense float64 references."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.down = None
        if stride != 1 or inp != out:
            self.down = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """torchvision's resnet18 layout: 7×7/2 stem, 3×3/2 max-pool, [2, 2, 2, 2] BasicBlocks of
    width w, 2w, 4w, 8w (w = 64: 11.2M parameters at 10 classes), global average pool, fc."""

    def __init__(self, width: int = 64, classes: int = 10, blocks=(2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, inp = [], width
        for k, count in enumerate(blocks):
            out = width * 2 ** k
            layers.append(nn.Sequential(*[BasicBlock(inp if j == 0 else out, out, 2 if (k and j == 0) else 1)
                                          for j in range(count)]))
            inp = out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(inp, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(self.layers(x).mean((2, 3)))


def calibrated(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Running BatchNorm statistics from training-mode forwards on ``inputs`` (cumulative
    average), then eval mode: a random-weight network whose eval-mode activations stay O(1)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(inputs)
    return model.eval()


def resnet18(seed: int = 0, width: int = 64, dtype=torch.float32, batch: int = 8, size: int = 32):
    """(model, [(x, y)]): a calibrated ResNet-18 (10 classes) and one CIFAR-sized batch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResNet(width).to(dtype)
    calibrated(model, torch.randn(64, 3, size, size, generator=g, dtype=dtype))
    x = torch.randn(batch, 3, size, size, generator=g, dtype=dtype)
    return model, [(x, torch.randint(0, 10, (batch,), generator=g))]


class ConvBN(nn.Module):
    """Conv2d → BatchNorm2d → ReLU → Conv2d(bias) → BatchNorm2d → mean-pool → Linear."""

    def __init__(self, channels: int = 3, classes: int = 3):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.c2, self.b2 = nn.Conv2d(channels, channels, 3, stride=2), nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        return self.fc(torch.tanh(self.b2(self.c2(h))).mean((2, 3)))


def conv_bn(seed: int = 0, dtype=torch.float64):
    """(model, batches, sizes): a calibrated ConvBN on 5×5 single-channel images, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = calibrated(ConvBN().to(dtype), torch.randn(16, 1, 5, 5, generator=g, dtype=dtype))
    batches = [(torch.randn(n, 1, 5, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))
               for n in (4, 2)]
    return model, batches, [4, 2]


class PosTransformer(nn.Module):
    """Token projection + a bare positional parameter on the root module, one pre-LN attention
    block (SDPA) with an MLP, mean-pool, head: the bundled tiny transformer in miniature."""

    def __init__(self, tokens: int = 3, features: int = 2, d: int = 4, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(features, d)
        self.pos = nn.Parameter(0.5 * torch.randn(tokens, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x) + self.pos
        q, k, v = self.qkv(self.ln1(h)).unsqueeze(1).chunk(3, dim=-1)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v).squeeze(1))
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


def pos_transformer(seed: int = 0, dtype=torch.float64):
    """(model, batches, sizes): PosTransformer on sequences of 3 tokens × 2 features, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PosTransformer().to(dtype).eval()
    batches = [(torch.randn(n, 3, 2, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))
               for n in (3, 2)]
    return model, batches, [3, 2]


def cross_entropy(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)
