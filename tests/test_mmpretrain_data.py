"""Datasets: SVHN from .mat files, Fashion-MNIST from the IDX files, per-class subsets, CenterPad, data_root errors."""
import gzip
import os
import os.path as osp
import pickle
import shutil

import numpy as np
import pytest

pytest.importorskip('mmpretrain')
from mmengine.config import Config  # noqa: E402

from mdplug.mmpretrain import (SVHN, CenterPad, FashionMNISTIDX, LocalCIFAR10, PerClassSubset,  # noqa: E402
                               per_class_indices, runtime)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
needs_fashion_mnist = pytest.mark.skipif(
    not osp.isfile(osp.join(FASHION_MNIST, 't10k-labels-idx1-ubyte.gz')),
    reason='Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist '
           '(files in /usr/share/datasets/fashion-mnist)')


def test_svhn_reads_the_mat_files_and_maps_label_10_to_digit_0(tmp_path):
    scipy_io = pytest.importorskip('scipy.io')
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 32, 3, 12), dtype=np.uint8)
    labels = np.array([10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1], dtype=np.uint8).reshape(-1, 1)
    scipy_io.savemat(tmp_path / 'train_32x32.mat', {'X': images, 'y': labels})
    scipy_io.savemat(tmp_path / 'test_32x32.mat', {'X': images[..., :3], 'y': labels[:3]})

    train = SVHN(data_root=str(tmp_path), split='train')
    assert len(train) == 12
    assert [train.get_data_info(i)['gt_label'] for i in range(12)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    np.testing.assert_array_equal(train.get_data_info(5)['img'], images[..., 5])
    assert len(SVHN(data_root=str(tmp_path), split='test')) == 3


def test_svhn_missing_files_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'train_32x32.mat does not exist.*housenumbers'):
        SVHN(data_root=str(tmp_path), split='train')
    with pytest.raises(ValueError, match='data_root is not set'):
        SVHN(split='train')


@needs_fashion_mnist
def test_fashion_mnist_reads_the_installed_idx_files():
    train = FashionMNISTIDX(data_root=FASHION_MNIST, split='train')
    test = FashionMNISTIDX(data_root=FASHION_MNIST, split='test')
    assert (len(train), len(test)) == (60000, 10000)
    info = test.get_data_info(0)
    assert info['img'].shape == (28, 28, 1) and info['img'].dtype == np.uint8
    labels = np.array([test.get_data_info(i)['gt_label'] for i in range(len(test))])
    assert np.bincount(labels).tolist() == [1000] * 10
    assert test.metainfo['classes'][9] == 'Ankle boot'


@needs_fashion_mnist
def test_fashion_mnist_reads_raw_idx_files_too(tmp_path):
    for name in ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'):
        with gzip.open(osp.join(FASHION_MNIST, name + '.gz')) as src, open(tmp_path / name, 'wb') as dst:
            shutil.copyfileobj(src, dst)
    raw = FashionMNISTIDX(data_root=str(tmp_path), split='test')
    gz = FashionMNISTIDX(data_root=FASHION_MNIST, split='test')
    for i in (0, 4321, 9999):
        np.testing.assert_array_equal(raw.get_data_info(i)['img'], gz.get_data_info(i)['img'])
        assert raw.get_data_info(i)['gt_label'] == gz.get_data_info(i)['gt_label']


def test_fashion_mnist_missing_root_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        FashionMNISTIDX(data_root=str(tmp_path / 'absent'), split='test')


def test_per_class_indices_keep_a_fixed_random_fraction_of_every_class():
    labels = np.repeat(np.arange(5), [100, 50, 20, 10, 3])
    idx = per_class_indices(labels, 0.1, seed=0)
    assert np.bincount(labels[idx]).tolist() == [10, 5, 2, 1, 1]  # at least one of each class
    assert idx == per_class_indices(labels, 0.1, seed=0)  # the same subset in every process and run
    assert idx != per_class_indices(labels, 0.1, seed=1)
    assert idx != list(range(len(idx)))  # random, not the first ones
    assert per_class_indices(labels, 1.0) == list(range(len(labels)))
    with pytest.raises(ValueError, match='fraction'):
        per_class_indices(labels, 0)


def write_cifar10(root, per_batch=20, test=50, seed=0):
    """A CIFAR-10 copy in the real format: pickled ``data_batch_1..5``, ``test_batch``, ``batches.meta``."""
    folder = osp.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)

    def dump(name, n):
        labels = (np.arange(n) % 10).tolist()
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(osp.join(folder, name), 'wb') as f:
            pickle.dump({'batch_label': name, 'labels': labels, 'data': data, 'filenames': [f'{i}.png' for i in
                                                                                         range(n)]}, f)
    for i in range(1, 6):
        dump(f'data_batch_{i}', per_batch)
    dump('test_batch', test)
    with open(osp.join(folder, 'batches.meta'), 'wb') as f:
        pickle.dump({'label_names': ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                                     'ship', 'truck'], 'num_cases_per_batch': per_batch, 'num_vis': 3072}, f)


def test_per_class_subset_wraps_any_dataset(tmp_path):
    write_cifar10(str(tmp_path))
    subset = PerClassSubset(dict(type='LocalCIFAR10', data_root=str(tmp_path), split='train'), fraction=0.5)
    assert isinstance(subset, LocalCIFAR10)
    labels = [subset.get_data_info(i)['gt_label'] for i in range(len(subset))]
    assert np.bincount(labels).tolist() == [5] * 10


def test_center_pad_pads_28_to_32_evenly():
    img = np.full((28, 28, 1), 7, np.uint8)
    out = CenterPad(32).transform(dict(img=img))['img']
    assert out.shape == (32, 32, 1)
    assert out[2:30, 2:30].min() == 7 and out.sum() == 7 * 28 * 28


def test_a_missing_data_root_names_the_option_to_set():
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'cifar10', 'mobilenet_v2_cifar_x035_static.py'))
    runtime.set_data_root(cfg, '/nonexistent/cifar10')
    with pytest.raises(FileNotFoundError, match=r"train_dataloader: data_root '/nonexistent/cifar10'.*--data-root"):
        runtime.check_data_roots(cfg)


def test_data_root_reaches_through_the_subset_wrapper():
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'imagenet', 'mobilenet_v2_x10_mdconv_data10.py'))
    assert cfg.train_dataloader.dataset.type == 'PerClassSubset'
    runtime.set_data_root(cfg, '/data/in1k')
    assert cfg.train_dataloader.dataset.dataset.data_root == '/data/in1k'
    assert cfg.val_dataloader.dataset.data_root == '/data/in1k'
