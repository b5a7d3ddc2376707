"""The five networks of the study, built by one factory from a Config.

Four stages are plain conv stacks that differ only in their block layout and head, so one
``ConvNet`` expresses them; ``resnet`` is a ResNet-18 layout. The toggles apply across them:
``batchnorm`` (BN in every conv block and in BN heads), ``residual`` (a skip around each conv
block, 1x1-projected where the channel count changes), ``conv_dropout``, ``fc_dropout``, ``width``.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import STAGES, Config

N_CLASSES = 7

# blocks: channels of each conv in a block; pool: max-pool after the block (else global avg);
# head: hidden FC sizes; head_bn: BatchNorm1d after each hidden FC.
ARCHS: dict[str, dict] = {
    "basic": dict(blocks=[[32], [64], [128]], pool=[True, True, True], head=[512], head_bn=False),
    "batchnorm": dict(blocks=[[64, 64], [128, 128], [256, 256], [512]],
                      pool=[True, True, True, False], head=[256, 128], head_bn=False),
    "advanced": dict(blocks=[[32, 64], [128, 128], [256, 256]], pool=[True, True, True],
                     head=[512], head_bn=True),
    "improved": dict(blocks=[[64, 64], [128, 128, 128], [256, 256, 256]],
                     pool=[True, True, True], head=[512], head_bn=True),
}


def _ch(c: int, width: float) -> int:
    return max(4, int(round(c * width)))


def _bn2d(c: int, on: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if on else nn.Identity()


class ConvBlock(nn.Module):
    """Convs (3x3, pad 1) each with optional BN and ReLU; optional skip around the whole block."""

    def __init__(self, c_in: int, channels: list[int], bn: bool, residual: bool):
        super().__init__()
        layers: list[nn.Module] = []
        c = c_in
        for i, c_out in enumerate(channels):
            last = i == len(channels) - 1
            layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=not bn), _bn2d(c_out, bn)]
            if not (residual and last):
                layers.append(nn.ReLU(inplace=True))
            c = c_out
        self.body = nn.Sequential(*layers)
        self.residual = residual
        if residual:
            self.proj = (nn.Identity() if c_in == c else
                         nn.Sequential(nn.Conv2d(c_in, c, 1, bias=not bn), _bn2d(c, bn)))
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return torch.relu(self.body(x) + self.proj(x))
        return self.body(x)


class ConvNet(nn.Module):
    def __init__(self, arch: dict, cfg: Config):
        super().__init__()
        feats: list[nn.Module] = []
        c, side = 1, 48
        for channels, pool in zip(arch["blocks"], arch["pool"]):
            block = ConvBlock(c, [_ch(k, cfg.width) for k in channels], cfg.batchnorm,
                              cfg.residual)
            feats.append(block)
            c = block.out_channels
            if pool:
                feats.append(nn.MaxPool2d(2))
                side //= 2
                if cfg.conv_dropout > 0:
                    feats.append(nn.Dropout2d(cfg.conv_dropout))
        gap = not arch["pool"][-1]
        if gap:
            feats.append(nn.AdaptiveAvgPool2d(1))
            side = 1
        self.features = nn.Sequential(*feats)  # basic/advanced/improved: (B, C, 6, 6)
        head: list[nn.Module] = [nn.Flatten()]
        f = c * side * side
        for h in arch["head"]:
            h = _ch(h, cfg.width)
            head += [nn.Linear(f, h, bias=not (arch["head_bn"] and cfg.batchnorm))]
            if arch["head_bn"] and cfg.batchnorm:
                head.append(nn.BatchNorm1d(h))
            head += [nn.ReLU(inplace=True), nn.Dropout(cfg.fc_dropout)]
            f = h
        head.append(nn.Linear(f, N_CLASSES))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block; with ``residual=False`` the same convs without the skip."""

    def __init__(self, c_in: int, c_out: int, stride: int, bn: bool, residual: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not bn)
        self.bn1 = _bn2d(c_out, bn)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=not bn)
        self.bn2 = _bn2d(c_out, bn)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if residual and (stride != 1 or c_in != c_out):
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=not bn),
                                          _bn2d(c_out, bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.shortcut(x) if self.residual else y)


class ResNet(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        w = [_ch(c, cfg.width) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(  # (B, 1, 48, 48) -> (B, 64, 12, 12)
            nn.Conv2d(1, w[0], 7, 2, 3, bias=not cfg.batchnorm), _bn2d(w[0], cfg.batchnorm),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers, c = [], w[0]
        for i, co in enumerate(w):
            stride = 1 if i == 0 else 2  # 12 -> 12 -> 6 -> 3 -> 2
            layers += [BasicBlock(c, co, stride, cfg.batchnorm, cfg.residual),
                       BasicBlock(co, co, 1, cfg.batchnorm, cfg.residual)]
            c = co
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(cfg.fc_dropout), nn.Linear(c, N_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def build_model(cfg: Config) -> nn.Module:
    if cfg.stage == "resnet":
        return ResNet(cfg)
    if cfg.stage not in ARCHS:
        raise ValueError(f"unknown stage {cfg.stage!r}; choose one of {', '.join(STAGES)}")
    return ConvNet(ARCHS[cfg.stage], cfg)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class FerClassifier(nn.Module):
    """What gets logged: takes raw grey pixels 0..255, shape (N, 1, 48, 48) or (N, 48, 48),
    and returns class probabilities (N, 7), so a served model needs no preprocessing code."""

    def __init__(self, net: nn.Module, normalize: str):
        super().__init__()
        self.net = net
        self.symmetric = normalize == "symmetric"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = x / 255.0
        if self.symmetric:
            x = x * 2 - 1
        return torch.softmax(self.net(x).float(), dim=1)
