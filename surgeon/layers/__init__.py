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
from surgeon.layers.hard import HardAttn
from surgeon.layers.gate import GatedReplacement, GatedResidual, ZeroGate, gated
from surgeon.layers.layout import ChannelsLast
from surgeon.layers.mixed import BAM, CBAM, SCSE, ChannelAttn, TripletAttention
from surgeon.layers.pooling import AttentionPool2d, PoolReplacement
from surgeon.layers.pyramid import FPA, GAU
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
    # Pyramid Attention Network, hard attention
    "FPA", "GAU", "HardAttn",
    # pooling, drops, gates
    "AttentionPool2d", "PoolReplacement", "ADL", "AttentionGate", "GatedResidual", "GatedReplacement", "ZeroGate",
    "gated", "ChannelsLast", "Applied",
    # sequences
    "DotScore", "ScaledDotScore", "CosineScore", "GeneralScore", "ConcatScore", "AdditiveScore", "SeqAttnPool",
    "HardAttnPool", "LocalAttnPool", "StructuredSelfAttn", "MultiHeadSelfAttn", "LocalSelfAttn", "InputAttn",
]

# the catalogue's second part, one file per group
from surgeon.layers.external import ExternalAttention  # noqa: E402
from surgeon.layers.grouped import ShuffleAttention, SplitAttn  # noqa: E402
from surgeon.layers.local_attention import BottleneckMHSA, HaloAttn, LambdaLayer  # noqa: E402
from surgeon.layers.polarized import PolarizedSelfAttention  # noqa: E402
from surgeon.layers.recalibration import GCT, CecaModule, EffectiveSE, SimAM  # noqa: E402
from surgeon.layers.strip import ELA, StripPool  # noqa: E402

__all__ += [
    "SimAM", "GCT", "EffectiveSE", "CecaModule", "ShuffleAttention", "SplitAttn", "ELA", "StripPool",
    "PolarizedSelfAttention", "ExternalAttention", "BottleneckMHSA", "HaloAttn", "LambdaLayer",
]
