# Fashion-MNIST analogue of Table 8: SmallNet x1, MDConv without bypass
# not in the paper: run by tools/reproduce.py
_base_ = '../smallnet_x1_mdconv.py'
model = dict(backbone=dict(bypass=False))
