"""``mdplug.AugmentClsDataPreprocessor``: mmpretrain's ``ClsDataPreprocessor`` that also crops and flips the batch.

The CIFAR recipe's per-sample ``RandomCrop(crop_size=32, padding=4)`` + ``RandomFlip(prob=0.5)`` as one indexing op on
the whole batch, on the device the model trains on, before normalisation (so the padding value is the raw pixel
value, exactly as the per-sample transforms pad). With a preloaded dataset (``preload=True``) an epoch then runs no
per-sample Python at all::

    data_preprocessor = dict(type='mdplug.AugmentClsDataPreprocessor', num_classes=10, mean=[72.94], std=[90.02],
                             random_crop=dict(crop_size=32, padding=4), random_flip=dict(prob=0.5))

Every sample draws its own offset (uniform over the ``2 * padding + 1`` positions per axis, as ``RandomCrop``) and its
own flip from torch's generator of the batch's device, which mmengine's ``randomness.seed`` seeds. Evaluation
(``training=False``) is the plain ``ClsDataPreprocessor``.
"""
import torch
import torch.nn.functional as F
from mmpretrain.models.utils import ClsDataPreprocessor

from .registry import MODELS


def _crop_size(size):
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return tuple(size)
    raise ValueError(f'AugmentClsDataPreprocessor: random_crop crop_size must be an int or (h, w), got {size!r}')


def crop_flip(images, crop_size=None, padding=0, pad_val=0, flip_prob=0.0, generator=None):
    """Randomly crop (after zero padding by ``padding`` with ``pad_val``) and horizontally flip each image of an
    ``N x C x H x W`` batch; one gather for both. ``crop_size=None``: keep the size (``padding`` must then be 0)."""
    n, _, h, w = images.shape
    ch, cw = (h, w) if crop_size is None else _crop_size(crop_size)
    if padding:
        images = F.pad(images, (padding, ) * 4, value=pad_val)
    ph, pw = h + 2 * padding, w + 2 * padding
    if ch > ph or cw > pw:
        raise ValueError(f'AugmentClsDataPreprocessor: crop {ch}x{cw} is larger than the padded image {ph}x{pw}')
    device = images.device
    top = torch.randint(0, ph - ch + 1, (n, 1), device=device, generator=generator)
    left = torch.randint(0, pw - cw + 1, (n, 1), device=device, generator=generator)
    cols = torch.arange(cw, device=device)
    if flip_prob:
        flip = torch.rand(n, 1, device=device, generator=generator) < flip_prob
        cols = torch.where(flip, cw - 1 - cols, cols)
    rows = (top + torch.arange(ch, device=device))[:, :, None]
    cols = (left + cols)[:, None, :]
    # advanced indices around a slice: (N, ch, cw) first, then the channel axis
    return images[torch.arange(n, device=device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


@MODELS.register_module(name='AugmentClsDataPreprocessor')
class AugmentClsDataPreprocessor(ClsDataPreprocessor):
    """``ClsDataPreprocessor`` with batch-level random crop and flip in training.

    Args:
        random_crop (dict, optional): ``dict(crop_size=32, padding=4, pad_val=0)``, the arguments of mmpretrain's
            ``RandomCrop`` (only these three).
        random_flip (dict, optional): ``dict(prob=0.5, direction='horizontal')``, as ``RandomFlip`` (horizontal
            only).
        **kwargs: ``ClsDataPreprocessor``'s (``mean``, ``std``, ``num_classes``, ``to_rgb``, ``batch_augments`` ...).
    """

    def __init__(self, random_crop=None, random_flip=None, **kwargs):
        super().__init__(**kwargs)
        crop = dict(random_crop or {})
        unknown = set(crop) - {'crop_size', 'padding', 'pad_val'}
        if unknown:
            raise ValueError(f'AugmentClsDataPreprocessor: random_crop takes crop_size, padding and pad_val; got '
                             f'{sorted(unknown)}')
        if random_crop is not None and 'crop_size' not in crop:
            raise ValueError('AugmentClsDataPreprocessor: random_crop needs crop_size')
        if crop.get('crop_size') is not None:
            _crop_size(crop['crop_size'])
        if not isinstance(crop.get('padding', 0), int) or crop.get('padding', 0) < 0:
            raise ValueError(f'AugmentClsDataPreprocessor: random_crop padding must be an int >= 0, got '
                             f'{crop["padding"]!r}')
        flip = dict(random_flip or {})
        unknown = set(flip) - {'prob', 'direction'}
        if unknown:
            raise ValueError(f'AugmentClsDataPreprocessor: random_flip takes prob and direction; got {sorted(unknown)}')
        if flip.get('direction', 'horizontal') != 'horizontal':
            raise ValueError(f"AugmentClsDataPreprocessor: only direction='horizontal' flips, got "
                             f'{flip["direction"]!r}')
        prob = flip.get('prob', 0.5 if random_flip is not None else 0.0)
        if not 0 <= prob <= 1:
            raise ValueError(f'AugmentClsDataPreprocessor: random_flip prob must be in [0, 1], got {prob!r}')
        self.random_crop = crop or None
        self.flip_prob = float(prob)

    def forward(self, data, training=False):
        if training and (self.random_crop or self.flip_prob):
            inputs = data['inputs']
            if isinstance(inputs, (list, tuple)):  # pseudo_collate: one tensor per sample
                shapes = {tuple(x.shape) for x in inputs}
                if len(shapes) > 1:
                    raise ValueError(f'AugmentClsDataPreprocessor: batch augmentation needs one image size, got '
                                     f'{sorted(shapes)}; pad or resize in the pipeline')
                inputs = torch.stack(list(inputs))
            inputs = crop_flip(self.cast_data(inputs), flip_prob=self.flip_prob, **(self.random_crop or {}))
            data = dict(data, inputs=inputs)
        return super().forward(data, training)
