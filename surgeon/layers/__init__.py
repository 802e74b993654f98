"""Attention modules as plain PyTorch, usable in hand-written models without surgeon's plugin system.

    from surgeon.layers import CBAM
    block = nn.Sequential(conv, bn, act, CBAM(256))
"""
from surgeon.layers.applied import Applied
from surgeon.layers.attention_gate import AttentionGate
from surgeon.layers.augmented import AAConv2d
from surgeon.layers.channel import (SRM, EcaModule, FcaModule, GatherExcite, GlobalContext, SEModule,
                                    SelectiveKernel)
from surgeon.layers.drop import ADL
from surgeon.layers.gate import GatedReplacement, GatedResidual, ZeroGate, gated
from surgeon.layers.mixed import BAM, CBAM, SCSE, ChannelAttn, TripletAttention
from surgeon.layers.pooling import AttentionPool2d, PoolReplacement
from surgeon.layers.residual_attention import ResidualAttention
from surgeon.layers.self_attention import CrissCrossAttn, DualAttention, EMAUnit, NonLocal2d
from surgeon.layers.sequence import (AdditiveScore, ConcatScore, CosineScore, DotScore, GeneralScore,
                                     HardAttnPool, InputAttn, LocalAttnPool, LocalSelfAttn, MultiHeadSelfAttn,
                                     ScaledDotScore, SeqAttnPool, StructuredSelfAttn)
from surgeon.layers.spatial import CoordAttn, SpatialAttn, SpatialTransformer

__all__ = [
    # channel
    "SEModule", "EcaModule", "SelectiveKernel", "GatherExcite", "GlobalContext", "SRM", "FcaModule",
    # spatial and mixed
    "SpatialAttn", "CoordAttn", "SpatialTransformer", "CBAM", "BAM", "ChannelAttn", "TripletAttention", "SCSE",
    # self-attention on feature maps
    "NonLocal2d", "DualAttention", "CrissCrossAttn", "EMAUnit", "AAConv2d", "ResidualAttention",
    # pooling, drops, gates
    "AttentionPool2d", "PoolReplacement", "ADL", "AttentionGate", "GatedResidual", "GatedReplacement", "ZeroGate",
    "gated", "Applied",
    # sequences
    "DotScore", "ScaledDotScore", "CosineScore", "GeneralScore", "ConcatScore", "AdditiveScore", "SeqAttnPool",
    "HardAttnPool", "LocalAttnPool", "StructuredSelfAttn", "MultiHeadSelfAttn", "LocalSelfAttn", "InputAttn",
]
