# SmallNet of the ablation study (paper section 4.5); the head's in_channels is 64 x widen_factor.
model = dict(
    type='ImageClassifier',
    backbone=dict(type='SmallNet', widen_factor=1.0),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=64,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, ),
    ))
