# Fashion-MNIST (apt-get install dataset-fashion-mnist): 28x28 grey images zero-padded to 32x32, then the CIFAR recipe.
# 32 images/GPU x 4 GPUs = 128 (paper); on one GPU pass --cfg-options train_dataloader.batch_size=128.
# data_root: override with --data-root DIR (or --cfg-options train_dataloader.dataset.data_root=DIR ...).
#
# Fast path: the datasets are preloaded (the deterministic pipeline runs once per image; an epoch reads one
# uint8 tensor) and the random augmentation (pad 4 + random 32x32 crop, horizontal flip) runs on the whole batch in
# the data preprocessor, on the training device. It draws the same distribution as the per-sample transforms
#   train_pipeline = [CenterPad(32), RandomCrop(crop_size=32, padding=4), RandomFlip(prob=0.5), PackInputs]
# (for those, set preload=False and move random_crop/random_flip back into the pipeline).
dataset_type = 'FashionMNISTIDX'
data_root = '/usr/share/datasets/fashion-mnist'
input_shape = (1, 32, 32)
data_preprocessor = dict(
    type='mdplug.AugmentClsDataPreprocessor',
    num_classes=10,
    # per-channel normalisation to zero mean and unit STD
    mean=[72.94],
    std=[90.02],
    to_rgb=False,
    # training only, on the raw batch (padding with raw 0, as RandomCrop's pad_val)
    random_crop=dict(crop_size=32, padding=4, pad_val=0),
    random_flip=dict(prob=0.5, direction='horizontal'),
)

train_pipeline = [
    dict(type='CenterPad', size=32),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='CenterPad', size=32),
    dict(type='PackInputs'),
]

# in memory: no workers (they would only copy batches between processes); collate stacks the batch into one tensor
train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type=dataset_type, data_root=data_root, split='train', pipeline=train_pipeline, preload=True),
)
val_dataloader = dict(
    batch_size=128,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type=dataset_type, data_root=data_root, split='test', pipeline=test_pipeline, preload=True),
)
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
