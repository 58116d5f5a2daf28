"""Networks: ResNet encoder, 3-ways task decoder, exchange blocks (xTAM/mTEB, PAD-Net), assembled models."""

from uda.models.backbone import PretrainedWeightsError, ResNetEncoder
from uda.models.decoder import TaskDecoder
from uda.models.discriminator import PatchDiscriminator
from uda.models.exchange import (
    EXCHANGE_BLOCKS,
    MTEB,
    XTAM,
    ExchangeBlock,
    IdentityExchange,
    PADNetDistillation,
    build_exchange,
)
from uda.models.multitask import ARCHS, MultiTaskModel, PADNet, STLModel, build_model
from uda.models.pretrained import export_pretrained, load_pretrained

__all__ = [
    "ARCHS",
    "EXCHANGE_BLOCKS",
    "MTEB",
    "XTAM",
    "ExchangeBlock",
    "IdentityExchange",
    "MultiTaskModel",
    "PADNet",
    "PADNetDistillation",
    "PatchDiscriminator",
    "PretrainedWeightsError",
    "ResNetEncoder",
    "STLModel",
    "TaskDecoder",
    "build_exchange",
    "build_model",
    "export_pretrained",
    "load_pretrained",
]
