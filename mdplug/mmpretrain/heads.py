"""A linear classification head with dropout before the classifier (MobileNetV2 on ImageNet, paper section 4.1)."""
import torch.nn as nn
from mmpretrain.models.heads import LinearClsHead
from mmpretrain.registry import MODELS


@MODELS.register_module()
class DropoutLinearClsHead(LinearClsHead):
    """``LinearClsHead`` that applies ``nn.Dropout(dropout_rate)`` to the pooled feature before ``fc``."""

    def __init__(self, num_classes, in_channels, dropout_rate=0.2, **kwargs):
        super().__init__(num_classes=num_classes, in_channels=in_channels, **kwargs)
        self.dropout = nn.Dropout(p=dropout_rate)

    def pre_logits(self, feats):
        return self.dropout(feats[-1])
