# Fashion-MNIST analogue of Table 9: SmallNet x1, MAConv, expanding training without BN
# not in the paper: run by tools/reproduce.py
# one BN after the sum of the branches instead of one per conv (norm='sum')
_base_ = '../smallnet_x1_maconv.py'
model = dict(backbone=dict(norm='sum'))
