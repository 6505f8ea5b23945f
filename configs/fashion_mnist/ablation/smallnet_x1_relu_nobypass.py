# Fashion-MNIST analogue of Table 8: SmallNet x1, ReLU instead of attention (MAConv act=relu), without bypass
# not in the paper: run by tools/reproduce.py
_base_ = '../smallnet_x1_maconv.py'
model = dict(backbone=dict(act='relu', bypass=False))
