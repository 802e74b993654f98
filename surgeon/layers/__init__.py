"""Attention modules as plain PyTorch, usable in hand-written models without surgeon's plugin system.

    from surgeon.layers import CBAM
    block = nn.Sequential(conv, bn, act, CBAM(256))
"""
from surgeon.layers.channel import EcaModule, SEModule
from surgeon.layers.gate import GatedReplacement, GatedResidual, gated
from surgeon.layers.mixed import BAM, CBAM, ChannelAttn
from surgeon.layers.pooling import AttentionPool2d, PoolReplacement
from surgeon.layers.spatial import SpatialAttn

__all__ = ["SEModule", "EcaModule", "CBAM", "BAM", "ChannelAttn", "SpatialAttn", "AttentionPool2d",
           "PoolReplacement", "GatedResidual", "GatedReplacement", "gated"]
