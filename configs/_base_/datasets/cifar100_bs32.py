# CIFAR-100, paper section 4.3: pad 4 + random crop 32 + horizontal flip (the python-version batch files).
# 32 images/GPU x 4 GPUs = 128 (paper); on one GPU pass --cfg-options train_dataloader.batch_size=128.
# data_root: override with --data-root DIR (or --cfg-options train_dataloader.dataset.data_root=DIR ...).
dataset_type = 'CIFAR100'
data_root = 'data/cifar100'
input_shape = (3, 32, 32)
data_preprocessor = dict(
    num_classes=100,
    # per-channel normalisation to zero mean and unit STD
    mean=[129.304, 124.070, 112.434],
    std=[68.170, 65.392, 70.418],
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
    dataset=dict(type=dataset_type, data_root=data_root, split='train', download=False, pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=128,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='test', download=False, pipeline=test_pipeline),
)
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
