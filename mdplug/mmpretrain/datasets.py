"""Datasets of the paper that mmpretrain does not read from local files, and a per-class training-data fraction.

- ``SVHN``: the official ``{train,test,extra}_32x32.mat`` files (label 10 means digit 0).
- ``FashionMNISTIDX``: the IDX files of Fashion-MNIST, gzipped or raw (e.g. the Debian package
  ``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist``); never downloads.
- ``PerClassSubset``: keep a random ``fraction`` of every class, with a fixed seed (paper Table 3).
- ``LocalCIFAR10`` / ``LocalCIFAR100``: mmpretrain's CIFAR classes without the md5 check against the official
  release, for re-packed or generated copies in the same pickled-batch format.
- ``CenterPad``: zero-pad an image symmetrically to a fixed size (Fashion-MNIST 28x28 -> 32x32).

Each dataset takes ``preload=True`` (see :class:`Preloadable`): its deterministic pipeline runs once per sample when
the dataset is initialised and the results are kept as one tensor, so an epoch reads memory instead of re-running
per-sample Python transforms; random augmentation then belongs on the batch
(:class:`~mdplug.mmpretrain.preprocessor.AugmentClsDataPreprocessor`).
"""
import gzip
import os.path as osp

import random

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmpretrain.datasets import CIFAR10, CIFAR100, BaseDataset
from mmpretrain.registry import DATASETS, TRANSFORMS

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')


def _require_data_root(dataset, data_root, hint):
    if not data_root:
        raise ValueError(f'{dataset}: data_root is not set; {hint}')
    if not osp.isdir(data_root):
        raise FileNotFoundError(f'{dataset}: data_root {data_root!r} is not a directory; {hint}')


class Preloadable:
    """Mixin of a dataset class: ``preload=True`` runs the pipeline once per sample at ``full_init``.

    The packed results are kept as one tensor of inputs (all samples must have the same shape) plus each sample's
    label and metainfo; ``dataset[i]`` then returns ``dict(inputs=..., data_samples=DataSample(...))`` from memory,
    equal to what the pipeline returns, with a new ``DataSample`` on every call (the model writes predictions into
    it). The pipeline must be deterministic (e.g. ``CenterPad`` + ``PackInputs``): it is run twice on the first
    samples under different random states and a difference is an error naming the dataset, instead of freezing one
    random draw for the whole training. Subsets (``indices``, ``get_subset_``, :func:`PerClassSubset`) preload only
    what they keep. ``preload=False`` (the default) is mmengine's per-sample path, unchanged.
    """

    PRELOAD_CHECKS = 4  # samples run twice to check that the pipeline is deterministic

    def __init__(self, *args, preload=False, **kwargs):
        if not isinstance(preload, bool):
            raise TypeError(f'{type(self).__name__}: preload must be True or False, got {preload!r}')
        self.preload = preload
        self._preloaded = None
        super().__init__(*args, **kwargs)

    def full_init(self):
        initialised = self._fully_initialized
        super().full_init()
        if self.preload and not initialised:
            self._preloaded = self._preload()

    def get_subset_(self, indices):
        super().get_subset_(indices)
        if self.preload and self._fully_initialized:
            self._preloaded = self._preload()

    def get_subset(self, indices):
        subset = super().get_subset(indices)
        if self.preload and subset._fully_initialized:
            subset._preloaded = subset._preload()
        return subset

    def _pack(self, idx):
        return super().prepare_data(idx)

    def _check_deterministic(self, n):
        name = type(self).__name__
        for idx in range(n):
            outputs = []
            for seed in (0, 1):
                random.seed(seed)
                np.random.seed(seed)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    outputs.append(self._pack(idx)['inputs'])
            if not torch.equal(outputs[0], outputs[1]):
                steps = ', '.join(type(t).__name__ for t in getattr(self.pipeline, 'transforms', []))
                raise ValueError(
                    f'{name}(preload=True): the pipeline gave two different results for sample {idx}, so it is '
                    f'random ({steps}); preloading would freeze one draw for the whole training. Keep only '
                    "deterministic transforms in a preloaded pipeline and augment the batch instead "
                    "(data_preprocessor=dict(type='mdplug.AugmentClsDataPreprocessor', random_crop=..., "
                    'random_flip=...)), or set preload=False')

    def _preload(self):
        name, n = type(self).__name__, len(self)
        if n == 0:
            raise ValueError(f'{name}(preload=True): the dataset is empty (check indices= and the subset taken), '
                             'so there is nothing to preload or train on')
        state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        try:
            self._check_deterministic(min(n, self.PRELOAD_CHECKS))
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
            torch.random.set_rng_state(state[2])
        inputs, labels, metas = None, [], []
        for idx in range(n):
            packed = self._pack(idx)
            sample = packed['inputs']
            if not isinstance(sample, torch.Tensor):
                raise TypeError(f'{name}(preload=True): the pipeline must end in PackInputs (a tensor as '
                                f'"inputs"), got {type(sample).__name__} for sample {idx}')
            if inputs is None:
                inputs = sample.new_empty((n, ) + tuple(sample.shape))
            elif sample.shape != inputs.shape[1:]:
                raise ValueError(f'{name}(preload=True): sample {idx} is {tuple(sample.shape)} but sample 0 is '
                                 f'{tuple(inputs.shape[1:])}; preloading needs one shape (pad or resize in the '
                                 'pipeline)')
            inputs[idx] = sample
            data_sample = packed['data_samples']
            labels.append(data_sample.gt_label if 'gt_label' in data_sample else None)
            metas.append(data_sample.metainfo)
        return dict(inputs=inputs, labels=labels, metas=metas, sample_type=type(packed['data_samples']))

    def prepare_data(self, idx):
        if self._preloaded is None:
            return super().prepare_data(idx)
        cache = self._preloaded
        sample = cache['sample_type'](metainfo=cache['metas'][idx])
        if cache['labels'][idx] is not None:
            sample.set_gt_label(cache['labels'][idx])
        return dict(inputs=cache['inputs'][idx], data_samples=sample)


@DATASETS.register_module()
class SVHN(Preloadable, BaseDataset):
    """The Street View House Numbers dataset from its official ``.mat`` files.

    Args:
        data_root (str): folder holding ``train_32x32.mat``, ``test_32x32.mat`` (and ``extra_32x32.mat``).
        split (str): ``'train'``, ``'test'`` or ``'extra'``.

    Each sample is a ``32x32x3`` uint8 image; the ``.mat`` label 10 is digit 0.
    """

    METAINFO = {'classes': tuple(str(d) for d in range(10))}
    SPLITS = ('train', 'test', 'extra')
    HINT = ('download train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ and set '
            'data_root to their folder')

    def __init__(self, data_root='', split='train', **kwargs):
        if split not in self.SPLITS:
            raise ValueError(f'SVHN: split must be one of {self.SPLITS}, got {split!r}')
        _require_data_root('SVHN', data_root, self.HINT)
        self.split = split
        kwargs.setdefault('test_mode', split == 'test')
        super().__init__(ann_file='', data_root=data_root, **kwargs)

    def load_data_list(self):
        from scipy.io import loadmat

        path = osp.join(self.data_root, f'{self.split}_32x32.mat')
        if not osp.isfile(path):
            raise FileNotFoundError(f'SVHN: {path} does not exist; {self.HINT}')
        mat = loadmat(path)
        images = np.ascontiguousarray(mat['X'].transpose(3, 0, 1, 2))  # (32, 32, 3, N) -> (N, 32, 32, 3)
        labels = mat['y'].reshape(-1).astype(np.int64) % 10  # 10 is the digit 0
        return [dict(img=img, gt_label=int(label)) for img, label in zip(images, labels)]


def read_idx(path):
    """Read an IDX file (``path`` or ``path + '.gz'``) of unsigned bytes into a numpy array of its shape."""
    candidates = [path, path + '.gz'] if not path.endswith('.gz') else [path, path[:-3]]
    found = next((p for p in candidates if osp.isfile(p)), None)
    if found is None:
        raise FileNotFoundError(f'IDX file {path} (or {path}.gz) does not exist')
    opener = gzip.open if found.endswith('.gz') else open
    with opener(found, 'rb') as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f'{found}: not an IDX file of unsigned bytes (magic {data[:4].hex()})')
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f'{found}: {array.size} values for shape {shape}')
    return array.reshape(shape)


@DATASETS.register_module()
class FashionMNISTIDX(Preloadable, BaseDataset):
    """Fashion-MNIST from its four IDX files, gzipped or raw; never downloads.

    Args:
        data_root (str): folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; on Debian/Ubuntu
            ``apt-get install dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``.
        split (str): ``'train'`` (60000 images) or ``'test'`` (10000 images).

    Each sample is a ``28x28x1`` uint8 image; pad it to 32x32 with ``CenterPad``.
    """

    METAINFO = {'classes': FASHION_MNIST_CLASSES}
    PREFIX = {'train': 'train', 'test': 't10k'}
    HINT = ('install the Debian package with `apt-get install dataset-fashion-mnist` (files in '
            '/usr/share/datasets/fashion-mnist) or set data_root to a folder with the IDX files')

    def __init__(self, data_root='', split='train', **kwargs):
        if split not in self.PREFIX:
            raise ValueError(f'FashionMNISTIDX: split must be one of {tuple(self.PREFIX)}, got {split!r}')
        _require_data_root('FashionMNISTIDX', data_root, self.HINT)
        self.split = split
        kwargs.setdefault('test_mode', split == 'test')
        super().__init__(ann_file='', data_root=data_root, **kwargs)

    def load_data_list(self):
        prefix = osp.join(self.data_root, self.PREFIX[self.split])
        try:
            images = read_idx(prefix + '-images-idx3-ubyte')
            labels = read_idx(prefix + '-labels-idx1-ubyte')
        except FileNotFoundError as e:  # e.g. an existing but empty data_root
            raise FileNotFoundError(f'FashionMNISTIDX: {e} in data_root {self.data_root!r}; {self.HINT}') from e
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f'FashionMNISTIDX: {images.shape[0]} images but {labels.shape[0]} labels in '
                             f'{self.data_root}')
        return [dict(img=img[:, :, None], gt_label=int(label)) for img, label in zip(images, labels)]


def _without_md5(entries):
    return [[name, None] for name, _ in entries]


def _load_local_cifar(dataset, base):
    """mmpretrain's CIFAR ``load_data_list``; a folder without the batch files says what to put there (its own
    message suggests ``download=True``, which these classes never do)."""
    try:
        return base.load_data_list(dataset)
    except RuntimeError as e:
        if 'Cannot find' not in str(e):
            raise
        raise FileNotFoundError(
            f'{type(dataset).__name__}: no {dataset.base_folder}/ with the pickled batches in data_root '
            f'{dataset.data_root!r}; put the python-version CIFAR batch files there (or use {base.__name__} with '
            f'download=True)') from e


@DATASETS.register_module()
class LocalCIFAR10(Preloadable, CIFAR10):
    """``CIFAR10`` reading the same ``cifar-10-batches-py`` files under ``data_root`` without checking their md5
    sums against the official release (a generated or re-packed copy); never downloads."""

    train_list = _without_md5(CIFAR10.train_list)
    test_list = _without_md5(CIFAR10.test_list)
    meta = dict(CIFAR10.meta, md5=None)

    def __init__(self, data_root='', split='train', **kwargs):
        kwargs['download'] = False
        super().__init__(data_root=data_root, split=split, **kwargs)

    def load_data_list(self):
        return _load_local_cifar(self, CIFAR10)


@DATASETS.register_module()
class LocalCIFAR100(Preloadable, CIFAR100):
    """``CIFAR100`` without the md5 check (see :class:`LocalCIFAR10`); never downloads."""

    train_list = _without_md5(CIFAR100.train_list)
    test_list = _without_md5(CIFAR100.test_list)
    meta = dict(CIFAR100.meta, md5=None)

    def __init__(self, data_root='', split='train', **kwargs):
        kwargs['download'] = False
        super().__init__(data_root=data_root, split=split, **kwargs)

    def load_data_list(self):
        return _load_local_cifar(self, CIFAR100)


def per_class_indices(labels, fraction, seed=0):
    """Indices of a random ``fraction`` of every class of ``labels`` (at least one each), sorted.

    The draw depends only on ``labels``, ``fraction`` and ``seed``, so every process and every run of an
    experiment trains on the same subset.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f'fraction must be in (0, 1], got {fraction}')
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, int(round(fraction * len(members))))
        keep.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(keep)).tolist()


@DATASETS.register_module()
def PerClassSubset(dataset, fraction=1.0, seed=0):
    """Build ``dataset`` and keep a random ``fraction`` of each class (fixed ``seed``); returns that dataset.

    ``train_dataloader.dataset = dict(type='PerClassSubset', dataset=dict(type='ImageNet', ...), fraction=0.1)``.
    The built dataset keeps its class and metainfo; only its sample list shrinks.
    """
    built = DATASETS.build(dataset)
    if fraction < 1:
        built.full_init()
        labels = [built.get_data_info(i)['gt_label'] for i in range(len(built))]
        built.get_subset_(per_class_indices(labels, fraction, seed))
    return built


@TRANSFORMS.register_module()
class CenterPad(BaseTransform):
    """Zero-pad ``results['img']`` (``HxW`` or ``HxWxC``) evenly on all sides to ``size x size``."""

    def __init__(self, size, pad_val=0):
        self.size = size
        self.pad_val = pad_val

    def transform(self, results):
        img = results['img']
        h, w = img.shape[:2]
        if h > self.size or w > self.size:
            raise ValueError(f'CenterPad: image {h}x{w} is larger than {self.size}x{self.size}')
        top, left = (self.size - h) // 2, (self.size - w) // 2
        pad = [(top, self.size - h - top), (left, self.size - w - left)] + [(0, 0)] * (img.ndim - 2)
        results['img'] = np.pad(img, pad, constant_values=self.pad_val)
        results['img_shape'] = results['img'].shape[:2]
        return results

    def __repr__(self):
        return f'{self.__class__.__name__}(size={self.size}, pad_val={self.pad_val})'
