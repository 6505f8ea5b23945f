# Fashion-MNIST analogue of Table 9: SmallNet x1, MAConv, compact training
# not in the paper: run by tools/reproduce.py
# the layer trained directly in its compact parameterisation: no BN inside the layer (norm='none')
_base_ = '../smallnet_x1_maconv.py'
model = dict(backbone=dict(norm='none'))
