"""The one model stack: MTP policy, reference LM and critic backbone share ``Transformer``."""

from weighted_mtp.models.checkpoints import load_pretrained, save_model
from weighted_mtp.models.transformer import ModelArgs, Transformer

__all__ = ["ModelArgs", "Transformer", "load_pretrained", "save_model"]
