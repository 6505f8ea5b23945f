# MobileNetV2 / ShuffleNetV2 on ImageNet, paper section 4.1: SGD lr 0.1, momentum 0.9, weight decay 4e-5,
# linear decay to zero (per iteration), 300 epochs, batch 256 in total.
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=4e-5))
param_scheduler = dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=True, begin=0, end=300,
                       convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)
val_cfg = dict()
test_cfg = dict()
# `tools/train.py --auto-scale-lr` rescales lr for another total batch size
auto_scale_lr = dict(base_batch_size=256, enable=False)
