"""The benchmark's models, built by name from a seed, so a server can build the same ones.

Small enough for a 2-core CPU server, with the structure of the real thing: a ResNet-18 with
its 8 basic blocks at a quarter of the width on 32x32 images, a 2-layer transformer encoder,
and a BERT from a small config (random weights, nothing downloaded).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (stem, 4 stages of 2 basic blocks, pooling, head) at ``width``."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            blocks += [_Block(cin, cout, 1 if i == 0 else 2), _Block(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Bert(nn.Module):
    """BERT from a small config; returns the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=128,
                                         vocab_size=1000))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids).last_hidden_state


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def _transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                       batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor]]] = {
    "mlp": (_mlp, lambda seed: torch.randn(8, 64, generator=_gen(seed))),
    "resnet18": (ResNet18, lambda seed: torch.randn(1, 3, 32, 32, generator=_gen(seed))),
    "transformer": (_transformer, lambda seed: torch.randn(1, 32, 64, generator=_gen(seed))),
    "bert": (Bert, lambda seed: torch.randint(0, 1000, (1, 32), generator=_gen(seed))),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(name: str) -> nn.Module:
    """The model called ``name``, in eval mode, with the same weights in every process."""
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


def sample(name: str, seed: int) -> torch.Tensor:
    """The ``seed``-th input of model ``name``."""
    return MODELS[name][1](seed)
