# Fashion-MNIST analogue of Table 10: SmallNet x4 (width of all layers but the stem), MAConv
# not in the paper: run by tools/reproduce.py
_base_ = '../smallnet_x1_maconv.py'
model = dict(backbone=dict(backbone=dict(widen_factor=4)), head=dict(in_channels=256))
