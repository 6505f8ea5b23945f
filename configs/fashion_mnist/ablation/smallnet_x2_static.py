# Fashion-MNIST analogue of Table 10: SmallNet x2 (width of all layers but the stem), static convolution
# not in the paper: run by tools/reproduce.py
_base_ = '../smallnet_x1_static.py'
model = dict(backbone=dict(widen_factor=2), head=dict(in_channels=128))
