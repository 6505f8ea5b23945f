# Fashion-MNIST (apt-get install dataset-fashion-mnist): 28x28 grey images zero-padded to 32x32, then the CIFAR recipe.
# 32 images/GPU x 4 GPUs = 128 (paper); on one GPU pass --cfg-options train_dataloader.batch_size=128.
# data_root: override with --data-root DIR (or --cfg-options train_dataloader.dataset.data_root=DIR ...).
dataset_type = 'FashionMNISTIDX'
data_root = '/usr/share/datasets/fashion-mnist'
input_shape = (1, 32, 32)
data_preprocessor = dict(
    num_classes=10,
    # per-channel normalisation to zero mean and unit STD
    mean=[72.94],
    std=[90.02],
    to_rgb=False,
)

train_pipeline = [
    dict(type='CenterPad', size=32),
    dict(type='RandomCrop', crop_size=32, padding=4),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='CenterPad', size=32),
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
