"""The five networks of the study, built by one factory from a Config. :data:`NETWORKS` is the
registry: each stage's builder and what the rest of the pipeline must know of its network, so no
other module tells stages apart by name.

Four stages are plain conv stacks that differ only in their block layout and head, so one
``ConvNet`` expresses them; ``resnet`` is a ResNet-18 layout. The toggles apply across them:
``batchnorm`` (BN in every conv block and in BN heads), ``residual`` (identity skips around
pairs of convs at a constant channel count, as in ResNets), ``conv_dropout``, ``fc_dropout``,
``width``. Only ``improved`` and ``resnet`` have such pairs; asking for ``residual`` on a stage
without one is an error rather than a silent no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .augment import normalize as norm
from .augment import warp
from .config import STAGES, Config
from .errors import ConfigError

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
    """A run of 3x3 convs (pad 1), each with optional BN and ReLU.

    With ``residual``, the block is laid out as in a ResNet: where the first conv changes the
    channel count it stays a plain transition conv, and the convs after it at a constant channel
    count get an identity skip, ``relu(body(x) + x)``, around each pair. A single conv never gets
    a skip of its own: ``conv(x) + x`` (or a 1x1 projection added to it) is one conv with other
    weights, so it would measure a reparameterisation, not a residual connection.
    """

    def __init__(self, c_in: int, channels: list[int], bn: bool, residual: bool):
        super().__init__()
        layers: list[nn.Module] = []
        c = c_in
        for kind, c_out in block_layout(c_in, channels, residual):
            layers += [IdentityResidual(c, bn)] if kind == "pair" else _conv_bn_relu(c, c_out, bn)
            c = c_out
        self.body = nn.Sequential(*layers)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def block_layout(c_in: int, channels: list[int], residual: bool) -> list[tuple[str, int]]:
    """A block's convs as ``("conv", c_out)`` and, with ``residual``, ``("pair", c)`` for two
    convs at a constant ``c`` under one identity skip; a first conv that changes the channel
    count stays a plain transition."""
    out: list[tuple[str, int]] = []
    c, rest = c_in, list(channels)
    if residual and rest and rest[0] != c:
        c = rest.pop(0)
        out.append(("conv", c))
    while rest:
        if residual and len(rest) >= 2 and rest[0] == rest[1] == c:
            out.append(("pair", c))
            rest = rest[2:]
        else:
            c = rest.pop(0)
            out.append(("conv", c))
    return out


def _conv_bn_relu(c_in: int, c_out: int, bn: bool) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn), _bn2d(c_out, bn),
            nn.ReLU(inplace=True)]


class IdentityResidual(nn.Module):
    """Two 3x3 convs at a constant channel count with an identity skip: relu(f(x) + x)."""

    def __init__(self, c: int, bn: bool):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=not bn), _bn2d(c, bn),
                               nn.ReLU(inplace=True),
                               nn.Conv2d(c, c, 3, padding=1, bias=not bn), _bn2d(c, bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.f(x) + x)


def residual_blocks(model: nn.Module) -> int:
    """How many blocks of the network carry a skip connection."""
    return sum(isinstance(m, (IdentityResidual, BasicBlock)) and getattr(m, "residual", True)
               for m in model.modules())


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
                    # Element-wise, as the study's Dropout(0.25) per block: Dropout2d would drop
                    # whole channels, a much stronger regulariser at the same rate.
                    feats.append(nn.Dropout(cfg.conv_dropout))
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


@dataclass(frozen=True)
class Network:
    """A stage's network: its builder, and what other modules must know of it."""

    build: Callable[[Config], nn.Module]
    skips_built_in: bool = False  # residual connections are part of its architecture
    # Input channels (at width 1) of a 1x1 stride-2 projection, where it has one: below 16,
    # oneDNN's channels-last backward of such a conv fails on a CPU (engine.Runtime).
    projection_inputs: int = 0


def _conv_net(stage: str) -> Callable[[Config], nn.Module]:
    return lambda cfg: ConvNet(ARCHS[stage], cfg)


NETWORKS: dict[str, Network] = {
    **{stage: Network(_conv_net(stage)) for stage in ARCHS},
    "resnet": Network(ResNet, skips_built_in=True, projection_inputs=64),
}


def build_model(cfg: Config) -> nn.Module:
    net = NETWORKS.get(cfg.stage)
    if net is None:
        raise ValueError(f"unknown stage {cfg.stage!r}; choose one of {', '.join(STAGES)}")
    model = net.build(cfg)
    if cfg.residual and not net.skips_built_in and residual_blocks(model) == 0:
        raise ConfigError(f"residual=true on stage {cfg.stage}: it has no pair of convs at a "
                          f"constant channel count (blocks {ARCHS[cfg.stage]['blocks']}), so "
                          f"there is nowhere for an identity skip; stages with one: "
                          f"{', '.join(residual_stages())}.")
    return model


def supports_residual(stage: str) -> bool:
    """Whether ``residual`` changes this stage's network (it has a pair to skip around)."""
    if NETWORKS[stage].skips_built_in:
        return True
    c, found = 1, False
    for channels in ARCHS[stage]["blocks"]:
        layout = block_layout(c, channels, residual=True)
        found |= any(kind == "pair" for kind, _ in layout)
        c = layout[-1][1]
    return found


def residual_stages() -> list[str]:
    return [s for s in STAGES if supports_residual(s)]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class FerClassifier(nn.Module):
    """What gets logged: takes raw grey pixels 0..255, shape (N, 1, 48, 48) or (N, 48, 48), and
    returns class probabilities (N, 7), so a served model needs no preprocessing code.

    It carries the run's own test-time-augmentation views (``views``, affine matrices, the
    first one the identity) and applies them when the run was trained with ``tta: true``, so
    what is served is what the run's final metrics scored.
    """

    def __init__(self, net: nn.Module, normalize: str, views: torch.Tensor | None = None,
                 tta: bool = False):
        super().__init__()
        self.net = net
        self.symmetric = normalize == "symmetric"
        self.register_buffer("views", views if views is not None else torch.eye(2, 3)[None])
        self.tta = tta and views is not None and len(views) > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probs(x, self.tta)

    def probs(self, x: torch.Tensor, tta: bool) -> torch.Tensor:
        x = x.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        views = getattr(self, "views", None)  # models pickled before views existed have none
        use = views if tta and views is not None else torch.eye(2, 3)[None]
        ps = view_probs(self.net, x / 255.0, use, "symmetric" if self.symmetric else "unit")
        return sum(ps) / len(ps)


def view_probs(net: nn.Module, x01: torch.Tensor, views: torch.Tensor,
               normalize: str) -> list[torch.Tensor]:
    """Softmax probabilities of ``net`` on pixels in [0, 1] and on each further view (the first
    view is the original). Views are warped in [0, 1] and normalised after, so the warp's zero
    padding is black whatever the normalisation; training's validation and the served model
    both score through here."""
    ps = [torch.softmax(net(norm(x01, normalize)).float(), dim=1)]
    for v in range(1, len(views)):
        view = warp(x01, views[v:v + 1].expand(len(x01), 2, 3))
        ps.append(torch.softmax(net(norm(view, normalize)).float(), dim=1))
    return ps
