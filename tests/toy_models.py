"""Tiny hand-built models whose sites are known, shared by the tests (and usable as factories)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainCNN(nn.Module):
    """conv-bn-relu ×3 with two max-pool downsamplings and a functional global average pool."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class Block(nn.Module):
    """A basic residual block, identity shortcut or 1×1 strided downsampling shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.down is None else self.down(x)
        return F.relu(out + shortcut)


class TinyResNet(nn.Module):
    """stem → stage1 (2 identity blocks) → stage2 (downsampling block + identity block) → stage3 → head."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.stage1 = nn.Sequential(Block(w, w), Block(w, w))
        self.stage2 = nn.Sequential(Block(w, 2 * w, 2), Block(2 * w, 2 * w))
        self.stage3 = nn.Sequential(Block(2 * w, 4 * w, 2), Block(4 * w, 4 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SharedConv(nn.Module):
    """One conv module called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = F.relu(self.conv(x))
        return self.head(x.mean((2, 3)))


class DataDependent(nn.Module):
    """A block whose forward branches on tensor values (fx cannot trace it) inside a traceable net."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = Gate()
        self.stage = nn.Sequential(Block(8, 8), Block(8, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stage(self.body(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(Block(8, 8))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.inner(x)
        return self.inner(-x)


class RootDataDependent(nn.Module):
    """The root's own forward branches on values; its children trace."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8, 8))
        self.b = nn.Sequential(Block(8, 8))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.a(x)
        if x.mean() > 0:
            x = self.b(x)
        return self.fc(x.mean((2, 3)))


class FunctionalDropout(nn.Module):
    """Dropout written functionally with training=self.training in the root forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv(x)).mean((2, 3))
        x = F.dropout(x, p=0.5, training=self.training)
        return self.fc(x)


def tiny_resnet(**kwargs):
    return TinyResNet(**kwargs)


def plain_cnn(**kwargs):
    return PlainCNN(**kwargs)


def _clip_window(sizes, window):
    """Fills in `window` (a list the caller copied) with each size it exceeds, as torchvision's
    `_get_window_and_shift_size` does for Swin3D."""
    for i in range(len(window)):
        if sizes[i] <= window[i]:
            window[i] = sizes[i]
    return window


torch.fx.wrap("_clip_window")


class ClipsAWindow(nn.Module):
    """Calls an fx-wrapped function that writes into a list built from an attribute: the graph holds the copy as a
    constant, which must reach the function as a list it may change."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.window = [7, 7]

    def forward(self, x):
        x = self.conv(x)
        window = _clip_window(list(x.shape[-2:]), self.window.copy())
        return x[..., :window[0], :window[1]].mean((2, 3))
