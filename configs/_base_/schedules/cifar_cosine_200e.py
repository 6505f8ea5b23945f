# CIFAR-10 / CIFAR-100 / SVHN, paper sections 4.2-4.4: SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine
# annealing to zero (per iteration), 200 epochs, batch 128 in total.
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4))
param_scheduler = dict(type='CosineAnnealingLR', T_max=200, eta_min=0.0, by_epoch=True, begin=0, end=200,
                       convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=200, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=128, enable=False)
