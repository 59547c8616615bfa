"""A user's model, not designed for curvdiag: a small ResNet (torchvision's BasicBlock layout with
BatchNorm, widths 16-32-64, 175k parameters) on the first 1,024 digits upsampled to 16x16, 16
batches of 64, cross-entropy, SGD momentum 0.9, weight decay 5e-4, lr 0.1: the usual CNN recipe,
stable at its own rate (its λmax floors reach 0.87 of the edge 2(1 + β)/η)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 1),
                                    Block(32, 64, 2), Block(64, 64, 1))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def model():
    torch.manual_seed(0)
    return ResNet()


def data():
    digits = load_digits()
    x = torch.tensor(digits.data[:1024], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target[:1024])
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, 1024, 64)]


def loss(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


def optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
