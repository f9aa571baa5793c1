"""3D UNet reconstructor of IterMask3D (a plain ``nn.Module``).

Input: 2 channels (noise-filled masked image, high-frequency image).
Output: 1 channel, the reconstructed image.

Layout: per resolution level one block of ``convs_per_block`` x (3x3x3 conv ->
norm -> LeakyReLU); downsampling by a strided 2x2x2 convolution; upsampling by a
2x2x2 transposed convolution; skip connections by concatenation; a 1x1x1
output convolution. Inputs whose size is not a multiple of ``2**(levels-1)``
are zero-padded inside ``forward`` and cropped back, so the network is fully
convolutional (train on patches, run on whole volumes).

Normalisation defaults to BatchNorm: in eval mode it is a fixed affine map, so
the reconstruction of one region does not depend on the statistics of the
rest of the volume (an anomaly does not shift the normalisation everywhere,
and patch-trained weights behave the same on whole volumes).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["UNet3D", "count_parameters", "count_macs", "DEFAULT_FEATURES"]

#: default channel widths per level, chosen for a 2-core CPU (see docs/performance.md)
DEFAULT_FEATURES: tuple[int, ...] = (8, 16, 32, 64)


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(ch)
    if kind == "instance":
        return nn.InstanceNorm3d(ch, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, ch), ch)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'instance', 'group' or 'none', got {kind!r}")


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, n: int, norm: str):
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [
                nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1, bias=(norm == "none")),
                _norm(norm, cout),
                nn.LeakyReLU(0.01, inplace=True),
            ]
        super().__init__(*layers)


class UNet3D(nn.Module):
    """A compact 3D UNet.

    Parameters
    ----------
    in_channels : int
        2 for IterMask3D (masked image, high-frequency image).
    out_channels : int
        1 (the reconstruction).
    features : sequence of int
        Channels at each resolution level (len = number of levels).
    convs_per_block : int
        3x3x3 convolutions per encoder/decoder block.
    norm : {"batch", "instance", "group", "none"}
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 1,
        features: Sequence[int] = DEFAULT_FEATURES,
        *,
        convs_per_block: int = 2,
        norm: str = "batch",
    ):
        super().__init__()
        feats = [int(f) for f in features]
        if len(feats) < 1 or any(f < 1 for f in feats):
            raise ValueError(f"features must be positive ints, got {features!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.features = tuple(feats)
        self.convs_per_block, self.norm = convs_per_block, norm
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        cin = in_channels
        for i, f in enumerate(feats):
            self.enc.append(_Block(cin, f, convs_per_block, norm))
            if i < len(feats) - 1:
                self.down.append(nn.Sequential(
                    nn.Conv3d(f, feats[i + 1], 2, stride=2, bias=(norm == "none")),
                    _norm(norm, feats[i + 1]), nn.LeakyReLU(0.01, inplace=True)))
                cin = feats[i + 1]
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(feats) - 1, 0, -1):
            self.up.append(nn.ConvTranspose3d(feats[i], feats[i - 1], 2, stride=2))
            self.dec.append(_Block(2 * feats[i - 1], feats[i - 1], convs_per_block, norm))
        self.head = nn.Conv3d(feats[0], out_channels, 1)

    @property
    def multiple(self) -> int:
        """Input sizes are padded to a multiple of this."""
        return 2 ** (len(self.features) - 1)

    def config(self) -> dict:
        """Constructor arguments (JSON-safe), stored in the model card."""
        return {"class": "UNet3D", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "features": list(self.features), "convs_per_block": self.convs_per_block,
                "norm": self.norm}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-3:]
        m = self.multiple
        pad = [(-s) % m for s in size]
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x)
            if i < len(self.down):
                skips.append(x)
                x = self.down[i](x)
        for up, dec in zip(self.up, self.dec):
            x = up(x)
            x = dec(torch.cat([x, skips.pop()], dim=1))
        x = self.head(x)
        if any(pad):
            x = x[..., : size[0], : size[1], : size[2]]
        return x


def count_parameters(net: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return int(sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only))


def count_macs(net: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass, counted with forward hooks.

    Counts convolutions and transposed convolutions exactly
    (``out_voxels * C_out * C_in/groups * prod(kernel)`` for Conv3d,
    ``in_voxels * C_in * C_out/groups * prod(kernel)`` for ConvTranspose3d);
    norms and activations (a few ops per voxel) are ignored.

    Parameters
    ----------
    input_shape : (C, X, Y, Z) or (X, Y, Z)
        One sample; with 3 entries ``net.in_channels`` (default 2) channels are assumed.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (getattr(net, "in_channels", 2),) + shape
    total = [0]

    def conv_hook(mod, inp, out):
        k = 1
        for s in mod.kernel_size:
            k *= s
        if isinstance(mod, nn.ConvTranspose3d):
            vox = inp[0].shape[2] * inp[0].shape[3] * inp[0].shape[4]
            total[0] += vox * mod.in_channels * (mod.out_channels // mod.groups) * k
        else:
            vox = out.shape[2] * out.shape[3] * out.shape[4]
            total[0] += vox * mod.out_channels * (mod.in_channels // mod.groups) * k

    hooks = [m.register_forward_hook(conv_hook) for m in net.modules()
             if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            # a meta-device tensor would skip the work, but not every op supports it: use
            # a real tensor of the requested size (called once, for model cards)
            net(torch.zeros((1,) + shape))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    return int(total[0])
