# MobileNetV2 for 32x32 inputs (stride-1 stem, one fewer downsampling: 32x32 -> 4x4).
model = dict(
    type='ImageClassifier',
    backbone=dict(type='MobileNetV2CIFAR', widen_factor=1.0),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=1280,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, ),
    ))
