"""Real architectures with random weights, built from code (nothing is downloaded), each with a
few small batches of random data and its mean loss: what ``curvdiag.probe`` meets in the wild.

Each factory returns an :class:`Architecture` (model, ``loss(model, batch)``, batches, and how
to probe it). Weights and data are seeded, so the same call gives the same numbers.

- ``resnet18``: torchvision's ResNet-18 (``torchvision.models.resnet18`` when torchvision
  imports; else :class:`ResNet18` below, the same modules, names, shapes and initialisation:
  BasicBlock ×[2, 2, 2, 2], BatchNorm, 1000 → ``num_classes`` head), 32×32 images.
- ``gpt2_lm``: Hugging Face ``GPT2LMHeadModel`` (lm_head tied to the token embedding), next
  token cross-entropy via ``labels=``; SDPA attention, dropout 0.1 (as GPT-2 ships).
- ``bert_classifier``: Hugging Face ``BertForSequenceClassification`` with an attention mask
  (padded sequences), cross-entropy over 3 classes.
- ``tiny_transformer``: the bundled ``sample_models/tiny_transformer.py`` (SDPA, pre-LN).
- ``dropout_tied``: a character LM with dropout and its output layer tied to its embedding.
- ``bn_cnn_train``: the bundled BatchNorm CNN probed in train mode (batch statistics).

Apart (its products are finite differences, so no tight eigsh over the same product):
``ctc_conv``, a convolutional acoustic model with PyTorch's CTC loss, which has no double backward.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


@dataclass
class Architecture:
    """A model at random weights, its data and loss, and how the default probe is called."""

    name: str
    model: nn.Module
    loss: Callable[[nn.Module, Any], torch.Tensor]
    batches: List[Any]
    train_mode: bool = False
    source: str = ""  # where the model's code came from (torchvision, transformers, this file...)
    # The same loss written with twice-differentiable operations, where ``loss`` has no double
    # backward: the exact Hessian to check finite differences against. None: ``loss`` itself.
    reference_loss: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ------------------------------------------------------------------ ResNet-18
def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, plus the (downsampled) input, ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision.models.resnet18 (v0.28) rewritten: the same module tree and parameter names
    (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ..., ``fc``), the same
    shapes (11,689,512 parameters at 1000 classes) and the same initialisation (Kaiming normal,
    fan_out, on convolutions; BatchNorm weight 1, bias 0; PyTorch's default on ``fc``)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 2)
        self.layer2 = self._make_layer(128, 2, stride=2)
        self.layer3 = self._make_layer(256, 2, stride=2)
        self.layer4 = self._make_layer(512, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_module(num_classes: int = 1000) -> nn.Module:
    """torchvision's resnet18 when torchvision imports (its wheel may not match this torch), else
    :class:`ResNet18`."""
    try:
        from torchvision.models import resnet18
    except Exception:  # absent, or built against other torch libraries (a CUDA wheel on CPU torch)
        return ResNet18(num_classes=num_classes)
    return resnet18(weights=None, num_classes=num_classes)


def _classification_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def resnet18(dtype: torch.dtype = torch.float64, num_classes: int = 10, image: int = 32,
             batch: int = 1, batches: int = 2) -> Architecture:
    """ResNet-18 on ``batches`` batches of ``batch`` random ``image``×``image`` RGB images.
    Eval mode (running statistics at their initial 0 and 1) as curvdiag probes by default.
    Two single images by default: a gradient-equivalent here costs ≈ 0.07 s per image plus
    ≈ 0.03 s (float64, one thread), and the default probe spends ~135 of them."""
    model = _seeded(0, lambda: resnet18_module(num_classes)).to(dtype)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, 3, image, image, generator=g, dtype=dtype),
             torch.randint(0, num_classes, (batch,), generator=g)) for _ in range(batches)]
    source = "torchvision" if type(model).__module__.startswith("torchvision") else "tests/real_models.py"
    return Architecture("resnet18", model, _classification_loss, data, source=source)


# ------------------------------------------------------------------ Hugging Face transformers
def _token_batches(vocab: int, batch: int, length: int, batches: int, seed: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(batches)]


def _lm_loss(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss  # mean next-token cross-entropy (labels shifted inside the model)


def gpt2_lm(dtype: torch.dtype = torch.float64, layers: int = 2, heads: int = 2, width: int = 32,
            vocab: int = 100, context: int = 16, batch: int = 4, batches: int = 2) -> Architecture:
    """``GPT2LMHeadModel`` from a small ``GPT2Config`` (tied lm_head, dropout 0.1, SDPA attention),
    language modelling on random token sequences of the full context."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_head=heads, n_embd=width, vocab_size=vocab, n_positions=context,
                        bos_token_id=0, eos_token_id=0)
    model = _seeded(0, lambda: GPT2LMHeadModel(config)).to(dtype)
    data = [{"input_ids": ids, "labels": ids} for ids in _token_batches(vocab, batch, context, batches, seed=1)]
    return Architecture("gpt2_lm", model, _lm_loss, data, source="transformers")


def _sequence_classification_loss(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss  # mean cross-entropy over the batch's labels


def bert_classifier(dtype: torch.dtype = torch.float64, layers: int = 2, heads: int = 2, width: int = 32,
                    vocab: int = 100, length: int = 16, classes: int = 3, batch: int = 4,
                    batches: int = 2) -> Architecture:
    """``BertForSequenceClassification`` from a small ``BertConfig`` on random padded sequences
    (an attention mask hides each sequence's padding), cross-entropy over ``classes`` labels."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * width, max_position_embeddings=length, num_labels=classes)
    model = _seeded(0, lambda: BertForSequenceClassification(config)).to(dtype)
    g = torch.Generator().manual_seed(2)
    data = []
    for ids in _token_batches(vocab, batch, length, batches, seed=1):
        lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        data.append({"input_ids": ids * mask, "attention_mask": mask,
                     "labels": torch.randint(0, classes, (batch,), generator=g)})
    return Architecture("bert_classifier", model, _sequence_classification_loss, data, source="transformers")


# ------------------------------------------------------------------ bundled samples
def _sample(name: str):
    spec = importlib.util.spec_from_file_location(f"curvdiag_sample_{name}", SAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_transformer(dtype: torch.dtype = torch.float32, batch: int = 16, batches: int = 2) -> Architecture:
    """The bundled tiny transformer (its own seed-0 initialisation) on random rows in [0, 1):
    (batch, 8 tokens, 8 features), 10 classes. float32 by default: there PyTorch's CPU SDPA
    dispatches to the fused flash kernel, whose backward has no derivative."""
    sample = _sample("tiny_transformer")
    model = sample.model().to(dtype)
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(batch, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(batches)]
    return Architecture("tiny_transformer", model, sample.loss, data, source="sample_models/tiny_transformer.py")


def bn_cnn_train(dtype: torch.dtype = torch.float64, batch: int = 32, batches: int = 2) -> Architecture:
    """The bundled BatchNorm CNN probed with batch statistics (``train_mode=True``) on random
    1×8×8 images; its running statistics first moved off 0/1 by a few train-mode passes."""
    sample = _sample("bn_cnn")
    model = sample.model().to(dtype)
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(batch, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(batches)]
    with torch.no_grad():
        model.train()
        for x, _ in data:
            model(x)
        model.eval()
    return Architecture("bn_cnn_train", model, sample.loss, data, train_mode=True, source="sample_models/bn_cnn.py")


# ------------------------------------------------------------------ dropout and tied weights
class TiedDropoutLM(nn.Module):
    """A character LM: embedding (vocab × d) → dropout → tanh MLP with dropout → logits through
    the embedding's own matrix (tied: ``decoder.weight is embed.weight``), plus a decoder bias."""

    def __init__(self, vocab: int = 40, width: int = 24, hidden: int = 48, p: float = 0.3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.drop = nn.Dropout(p)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Dropout(p), nn.Linear(hidden, width))
        self.decoder = nn.Linear(width, vocab)
        self.decoder.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.embed(ids))
        return self.decoder(h + self.mlp(h))


def _next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def dropout_tied(dtype: torch.dtype = torch.float64, vocab: int = 40, batch: int = 8, length: int = 12,
                 batches: int = 2) -> Architecture:
    """:class:`TiedDropoutLM` left in train mode (dropout active, as mid-training) on random
    character sequences, next-token cross-entropy."""
    model = _seeded(0, lambda: TiedDropoutLM(vocab)).to(dtype)
    model.train()
    return Architecture("dropout_tied", model, _next_token_loss, _token_batches(vocab, batch, length, batches, seed=1),
                        source="tests/real_models.py")


# ------------------------------------------------------------------ CTC: no double backward
class ConvCTC(nn.Module):
    """A small acoustic model: Conv1d(features → 16, k=3) → tanh → Conv1d(16 → 16, k=3) → tanh →
    Linear(16 → classes) per frame; log-probabilities shaped (T, N, classes) for F.ctc_loss."""

    def __init__(self, features: int = 8, classes: int = 6, width: int = 16):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(features, width, 3, padding=1), nn.Tanh(),
                                  nn.Conv1d(width, width, 3, padding=1), nn.Tanh())
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, features, T)
        return self.out(self.conv(x).transpose(1, 2)).log_softmax(-1).transpose(0, 1)


def _ctc_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, targets = batch
    log_probs = model(x)
    lengths = torch.full((x.shape[0],), log_probs.shape[0], dtype=torch.long)
    target_lengths = torch.full((x.shape[0],), targets.shape[1], dtype=torch.long)
    return F.ctc_loss(log_probs, targets, lengths, target_lengths)  # mean of loss / target length


_DEAD = -1e30  # log 0 for paths CTC cannot take (finite: -inf would give NaN second derivatives)


def _ctc_nll(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−log p(target | x) of one sequence by the CTC forward recursion (Graves et al. 2006) on the
    blank-interleaved labels l′ (blank 0): α_t(s) = logsumexp(α_{t−1}(s), α_{t−1}(s−1),
    α_{t−1}(s−2) where l′_s ≠ blank and l′_s ≠ l′_{s−2}) + log y_t(l′_s); log_probs (T, C)."""
    extended = torch.zeros(2 * len(target) + 1, dtype=torch.long)
    extended[1::2] = target
    emit = log_probs[:, extended]  # (T, S)
    skip = torch.zeros(len(extended), dtype=torch.bool)
    skip[2:] = (extended[2:] != 0) & (extended[2:] != extended[:-2])
    dead = log_probs.new_full((2,), _DEAD)
    alpha = torch.cat([emit[0, :2], log_probs.new_full((len(extended) - 2,), _DEAD)])
    for t in range(1, log_probs.shape[0]):
        by_one = torch.cat([dead[:1], alpha[:-1]])
        by_two = torch.where(skip, torch.cat([dead, alpha[:-2]]), dead[0])
        alpha = torch.logsumexp(torch.stack([alpha, by_one, by_two]), dim=0) + emit[t]
    return -torch.logsumexp(alpha[-2:], dim=0)


def twice_differentiable_ctc_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """F.ctc_loss's 'mean' (each sequence's −log p over its target length, averaged) by autograd-
    friendly operations only: the same function, with a double backward."""
    x, targets = batch
    log_probs = model(x)
    return torch.stack([_ctc_nll(log_probs[:, n], targets[n]) / targets.shape[1] for n in range(x.shape[0])]).mean()


def ctc_conv(dtype: torch.dtype = torch.float64, batch: int = 4, frames: int = 12, labels: int = 3,
             classes: int = 6, batches: int = 2) -> Architecture:
    """:class:`ConvCTC` with PyTorch's CTC loss (blank 0) on random features and label sequences.
    ``F.ctc_loss`` has no double backward ("derivative for aten::_ctc_loss_backward is not
    implemented"): the model curvdiag must probe by finite differences of gradients."""
    model = _seeded(0, lambda: ConvCTC(classes=classes)).to(dtype)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, 8, frames, generator=g, dtype=dtype),
             torch.randint(1, classes, (batch, labels), generator=g)) for _ in range(batches)]
    return Architecture("ctc_conv", model, _ctc_loss, data, source="tests/real_models.py",
                        reference_loss=twice_differentiable_ctc_loss)


ARCHITECTURES: Dict[str, Callable[..., Architecture]] = {
    "resnet18": resnet18,
    "gpt2_lm": gpt2_lm,
    "bert_classifier": bert_classifier,
    "tiny_transformer": tiny_transformer,
    "dropout_tied": dropout_tied,
    "bn_cnn_train": bn_cnn_train,
}
# Models probed by finite differences (no double backward): checked against ``reference_loss``.
FINITE_DIFFERENCE_ARCHITECTURES: Dict[str, Callable[..., Architecture]] = {"ctc_conv": ctc_conv}
# The ones that need Hugging Face transformers (an optional test dependency).
NEEDS_TRANSFORMERS = ("gpt2_lm", "bert_classifier")
