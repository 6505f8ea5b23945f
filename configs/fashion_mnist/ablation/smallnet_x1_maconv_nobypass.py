# Fashion-MNIST analogue of Table 8: SmallNet x1, MAConv without bypass
# not in the paper: run by tools/reproduce.py
_base_ = '../smallnet_x1_maconv.py'
model = dict(backbone=dict(bypass=False))
