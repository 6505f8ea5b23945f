# SVHN, paper section 4.4: train_32x32.mat / test_32x32.mat; pad 4 + random crop 32 + horizontal flip.
# 32 images/GPU x 4 GPUs = 128 (paper); on one GPU pass --cfg-options train_dataloader.batch_size=128.
# data_root: override with --data-root DIR (or --cfg-options train_dataloader.dataset.data_root=DIR ...).
dataset_type = 'SVHN'
data_root = 'data/svhn'
input_shape = (3, 32, 32)
data_preprocessor = dict(
    num_classes=10,
    # per-channel normalisation to zero mean and unit STD
    mean=[111.61, 113.16, 120.57],
    std=[50.50, 51.26, 50.24],
    to_rgb=False,
)

train_pipeline = [
    dict(type='RandomCrop', crop_size=32, padding=4),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='PackInputs'),
]

train_dataloader = dict(
    batch_size=32,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, split='train', pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=128,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='test', pipeline=test_pipeline),
)
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
