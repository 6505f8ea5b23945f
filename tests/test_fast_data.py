"""The reproduce suite's fast data path: preloaded datasets and batch crop + flip in the data preprocessor.

Both must give what the per-sample path gives: a preloaded sample equals the pipeline's output, and the batch
augmentation is, per image, one of the crops and flips mmpretrain's RandomCrop(padding=4) + RandomFlip draw (every
one of them reachable), padded with the raw value.
"""
import os.path as osp

import numpy as np
import pytest
import torch

pytest.importorskip('mmpretrain')
from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmpretrain.models.utils import ClsDataPreprocessor  # noqa: E402
from mmcv.transforms import BaseTransform  # noqa: E402
from mmpretrain.registry import DATASETS, MODELS, TRANSFORMS  # noqa: E402
from mmpretrain.structures import DataSample  # noqa: E402

from mdplug.mmpretrain import AugmentClsDataPreprocessor, FashionMNISTIDX, LocalCIFAR10, PerClassSubset  # noqa: E402
from mdplug.mmpretrain.preprocessor import crop_flip  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
needs_fashion_mnist = pytest.mark.skipif(
    not osp.isfile(osp.join(FASHION_MNIST, 't10k-labels-idx1-ubyte.gz')),
    reason='Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist')
PIPELINE = [dict(type='CenterPad', size=32), dict(type='PackInputs')]


def candidates(image, padding, pad_val=0):
    """Every crop (same size) of ``image`` padded by ``padding``, unflipped and flipped."""
    c, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding, ) * 4, value=pad_val)
    out = []
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top:top + h, left:left + w]
            out += [(top, left, False, crop), (top, left, True, crop.flip(-1))]
    return out


def test_crop_flip_draws_each_image_from_randomcrop_and_randomflip():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (400, 3, 8, 8), dtype=torch.uint8)  # no zero pixel: padding is visible
    out = crop_flip(images, crop_size=8, padding=2, pad_val=0, flip_prob=0.5,
                    generator=torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.is_contiguous()
    seen = set()
    for image, result in zip(images, out):
        matches = [(t, l, f) for t, l, f, crop in candidates(image, 2) if torch.equal(crop, result)]
        assert len(matches) == 1, 'each output is exactly one padded crop, flipped or not'
        seen.add(matches[0])
    assert len(seen) == 5 * 5 * 2, 'all 25 offsets, each with and without the flip, are drawn'


def test_crop_flip_is_reproducible_from_the_generator_and_keeps_the_size_without_augmentation():
    images = torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8)
    a = crop_flip(images, 32, 4, flip_prob=0.5, generator=torch.Generator().manual_seed(3))
    b = crop_flip(images, 32, 4, flip_prob=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(crop_flip(images), images)
    assert crop_flip(images, crop_size=(24, 28)).shape == (16, 1, 24, 28)


def preprocessor(**kwargs):
    return AugmentClsDataPreprocessor(num_classes=10, mean=[72.94], std=[90.02], to_rgb=False, **kwargs)


def batch(n=64):
    torch.manual_seed(0)
    inputs = torch.randint(1, 256, (n, 1, 32, 32), dtype=torch.uint8)
    samples = [DataSample().set_gt_label(i % 10) for i in range(n)]
    return dict(inputs=inputs, data_samples=samples)


def test_preprocessor_augments_the_raw_batch_in_training_and_only_then():
    pre = preprocessor(random_crop=dict(crop_size=32, padding=4, pad_val=0), random_flip=dict(prob=0.5))
    plain = ClsDataPreprocessor(num_classes=10, mean=[72.94], std=[90.02], to_rgb=False)
    data = batch()
    evaluated = pre(dict(data), training=False)
    assert torch.equal(evaluated['inputs'], plain(dict(data), training=False)['inputs'])
    trained = pre(dict(data), training=True)['inputs']
    assert trained.shape == (64, 1, 32, 32) and trained.dtype == torch.float32
    assert not torch.equal(trained, evaluated['inputs'])
    # undo the normalisation: each image is one padded crop/flip of its raw input, padded with raw 0
    raw = (trained * 90.02 + 72.94).round().to(torch.uint8)
    for image, result in zip(data['inputs'], raw):
        assert sum(torch.equal(crop, result) for *_, crop in candidates(image, 4)) >= 1
    assert (raw == 0).any(), 'the padding (raw 0) is visible in some crops'
    labels = torch.cat([s.gt_label for s in pre(dict(data), training=True)['data_samples']])
    assert labels.tolist() == [i % 10 for i in range(64)]


def test_preprocessor_takes_pseudo_collated_lists_and_is_seeded_by_torch():
    pre = preprocessor(random_crop=dict(crop_size=32, padding=4), random_flip=dict(prob=0.5))
    data = batch(8)
    listed = dict(data, inputs=list(data['inputs']))
    torch.manual_seed(5)
    a = pre(listed, training=True)['inputs']
    torch.manual_seed(5)
    b = pre(dict(data), training=True)['inputs']
    assert torch.equal(a, b)


@pytest.mark.parametrize('kwargs, match', [
    (dict(random_crop=dict(size=32)), 'crop_size, padding and pad_val'),
    (dict(random_crop=dict(padding=4)), 'needs crop_size'),
    (dict(random_crop=dict(crop_size=32, padding=-1)), 'padding must be an int'),
    (dict(random_flip=dict(prob=0.5, direction='vertical')), "only direction='horizontal'"),
    (dict(random_flip=dict(prob=2)), r'prob must be in \[0, 1\]'),
    (dict(random_flip=dict(p=0.5)), 'prob and direction'),
])
def test_preprocessor_refuses_what_it_would_not_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preprocessor(**kwargs)


def test_preprocessor_refuses_a_batch_of_mixed_sizes():
    pre = preprocessor(random_flip=dict(prob=0.5))
    data = dict(inputs=[torch.zeros(1, 32, 32, dtype=torch.uint8), torch.zeros(1, 28, 28, dtype=torch.uint8)],
                data_samples=[DataSample().set_gt_label(0), DataSample().set_gt_label(1)])
    with pytest.raises(ValueError, match='one image size'):
        pre(data, training=True)


def same_sample(a, b):
    assert torch.equal(a['inputs'], b['inputs'])
    assert torch.equal(a['data_samples'].gt_label, b['data_samples'].gt_label)
    assert a['data_samples'].metainfo == b['data_samples'].metainfo


@needs_fashion_mnist
def test_preloaded_fashion_mnist_equals_the_pipeline_sample_for_sample():
    fast = FashionMNISTIDX(data_root=FASHION_MNIST, split='test', pipeline=PIPELINE, preload=True)
    slow = FashionMNISTIDX(data_root=FASHION_MNIST, split='test', pipeline=PIPELINE)
    assert len(fast) == len(slow) == 10000
    assert fast._preloaded['inputs'].shape == (10000, 1, 32, 32)
    for idx in (0, 1, 4321, 9999):
        same_sample(fast[idx], slow[idx])
    assert fast[7]['data_samples'] is not fast[7]['data_samples'], 'a new DataSample per call'


@needs_fashion_mnist
def test_preloaded_subsets_keep_only_their_samples():
    def build(preload):
        return FashionMNISTIDX(data_root=FASHION_MNIST, split='test', pipeline=PIPELINE, preload=preload,
                               indices=100)

    fast, slow = build(True), build(False)
    assert fast._preloaded['inputs'].shape[0] == 100
    same_sample(fast[99], slow[99])
    same_sample(fast.get_subset([3, 50])[1], slow.get_subset([3, 50])[1])
    fast.get_subset_([10, 20, 30])
    slow.get_subset_([10, 20, 30])
    assert len(fast) == 3 and fast._preloaded['inputs'].shape[0] == 3
    same_sample(fast[2], slow[2])
    init_default_scope('mmpretrain')
    per_class = PerClassSubset(dict(type='FashionMNISTIDX', data_root=FASHION_MNIST, split='test',
                                    pipeline=PIPELINE, preload=True), fraction=0.01)
    assert len(per_class) == per_class._preloaded['inputs'].shape[0] == 100


@needs_fashion_mnist
def test_preload_refuses_a_random_pipeline_instead_of_freezing_one_draw():
    random_pipeline = [dict(type='CenterPad', size=32), dict(type='RandomCrop', crop_size=32, padding=4),
                       dict(type='PackInputs')]
    with pytest.raises(ValueError, match=r'FashionMNISTIDX\(preload=True\).*random.*AugmentClsDataPreprocessor'):
        FashionMNISTIDX(data_root=FASHION_MNIST, split='test', pipeline=random_pipeline, preload=True, indices=8)
    with pytest.raises(TypeError, match='preload must be True or False'):
        FashionMNISTIDX(data_root=FASHION_MNIST, split='test', pipeline=PIPELINE, preload='yes')


@needs_fashion_mnist
def test_preload_names_an_empty_dataset_instead_of_failing_inside_the_loop():
    with pytest.raises(ValueError, match=r'FashionMNISTIDX\(preload=True\): the dataset is empty'):
        FashionMNISTIDX(data_root=FASHION_MNIST, split='test', pipeline=PIPELINE, preload=True, indices=0,
                        serialize_data=False)  # (serialized, mmengine itself refuses an empty list first)
    dataset = FashionMNISTIDX(data_root=FASHION_MNIST, split='test', pipeline=PIPELINE, preload=True, indices=4)
    with pytest.raises(ValueError, match='the dataset is empty'):
        dataset.get_subset_([])


@TRANSFORMS.register_module(name='_ShrinkAllButFirst', force=True)
class ShrinkAllButFirst(BaseTransform):
    """Deterministic, but the output size depends on the sample (16x16 for all but sample 0)."""

    def transform(self, results):
        if results['sample_idx'] > 0:
            results['img'] = results['img'][:16, :16]
            results['img_shape'] = (16, 16)
        return results


def test_preload_refuses_samples_of_different_shapes(tmp_path):
    import pickle
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ('data_batch_1', 'data_batch_2', 'data_batch_3', 'data_batch_4', 'data_batch_5', 'test_batch'):
        with open(folder / name, 'wb') as f:
            pickle.dump({'data': rng.integers(0, 256, (4, 3072), dtype=np.uint8), 'labels': [0, 1, 2, 3]}, f)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': [str(i) for i in range(10)]}, f)
    same = LocalCIFAR10(data_root=str(tmp_path), split='test', pipeline=[dict(type='PackInputs')], preload=True)
    assert same._preloaded['inputs'].shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match=r'LocalCIFAR10\(preload=True\): sample 1 is \(3, 16, 16\) but sample 0 '
                                         r'is \(3, 32, 32\)'):
        LocalCIFAR10(data_root=str(tmp_path), split='test', preload=True,
                     pipeline=[dict(type='_ShrinkAllButFirst'), dict(type='PackInputs')])


@needs_fashion_mnist
def test_the_fashion_mnist_config_builds_the_fast_path_through_mmengine():
    from mmengine.runner import Runner
    cfg = Config.fromfile(osp.join(ROOT, 'configs/fashion_mnist/smallnet_x1_static.py'))
    init_default_scope('mmpretrain')
    loader = Runner.build_dataloader(dict(cfg.train_dataloader, batch_size=16,
                                          dataset=dict(cfg.train_dataloader.dataset, indices=64)))
    assert loader.dataset._preloaded is not None and loader.num_workers == 0
    data = next(iter(loader))
    assert isinstance(data['inputs'], torch.Tensor) and data['inputs'].shape == (16, 1, 32, 32)
    model = MODELS.build(dict(cfg.model, data_preprocessor=cfg.data_preprocessor))
    assert isinstance(model.data_preprocessor, AugmentClsDataPreprocessor)
    assert model.data_preprocessor.random_crop == dict(crop_size=32, padding=4, pad_val=0)
    assert model.data_preprocessor.flip_prob == 0.5
    losses = model.train_step(data, _optim(model))
    assert torch.isfinite(losses['loss'])
    assert DATASETS.get('FashionMNISTIDX') is FashionMNISTIDX


def _optim(model):
    from mmengine.optim import OptimWrapper
    return OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))


@needs_fashion_mnist
def test_throughput_tool_times_both_paths_and_writes_its_table(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location('mdplug_tools_throughput', osp.join(ROOT, 'tools', 'throughput.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / 'throughput.md'
    tool.main(['--models', 'smallnet_x1', '--kinds', 'static', '--iters', '5', '--rounds', '1', '--batch-size', '16',
               '--out', str(out)])
    text = out.read_text()
    row = next(line for line in text.splitlines() if 'smallnet_x1_static.py' in line)
    mm, plain = (float(cell) for cell in row.split('|')[2:4])
    assert mm > 0 and plain > 0
    assert 'plain ÷ mmengine' in text and 'load average' in text
    with pytest.raises(SystemExit):
        tool.parse_args(['--iters', '3'])
