"""Structured batches for UG-VAE experiments (ppl_vae.data.batches; Peis et al. 2023)."""
from __future__ import annotations

import pytest
import torch

from ppl_vae.data import batches as B
from ppl_vae.errors import UnknownNameError
from ppl_vae.models.base import Batch


@pytest.fixture(scope="module")
def mnist():
    return B.load_mnist_images()


def test_load_mnist_images(mnist):
    x, y = mnist
    assert x.shape == (10000, 784) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.long
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]        # the well-known first MNIST test labels


def test_one_mnist_reader_from_the_vendored_files(tmp_path, mnist):
    import gzip
    import inspect
    import shutil

    from ppl_vae.data import registry
    from ppl_vae.errors import DataError

    # the batches and the registry's "mnist" table read the same vendored files with the same reader
    table = registry.load_dataset("mnist")
    assert table.features.shape == (10000, 784)
    assert (table.features.to_numpy() == (mnist[0] * 255 > 127).numpy()).all()
    assert (table.target.to_numpy() == mnist[1].numpy()).all()
    assert "shared" not in inspect.getsource(B)                 # no hard-coded data path outside the package
    # an explicit folder: same data; a folder without the files or with a corrupt header fails cleanly
    for name in B.MNIST_FILES:
        shutil.copy(registry.data_file(f"mnist/{name}"), tmp_path / name)
    x, y = B.load_mnist_images(tmp_path)
    assert torch.equal(x, mnist[0]) and torch.equal(y, mnist[1])
    with pytest.raises(FileNotFoundError, match="t10k"):
        B.load_mnist_images(tmp_path / "absent")
    bad = tmp_path / "bad"                                      # (reads are cached per folder: a new one)
    bad.mkdir()
    shutil.copy(tmp_path / B.MNIST_FILES[1], bad / B.MNIST_FILES[1])
    with gzip.open(bad / B.MNIST_FILES[0], "wb") as fh:         # a label file's header where images belong
        fh.write(bytes([0, 0, 8, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(DataError, match="magic"):
        B.load_mnist_images(bad)
    # fresh tensors: mutating one load does not change the next
    x[0, 0] = 5.0
    assert float(B.load_mnist_images()[0][0, 0]) == 0.0


def test_series_digits_spell_the_sequences():
    assert "".join(map(str, B.series_digits("even", 12).tolist())) == "024681012141"
    assert "".join(map(str, B.series_digits("odd", 12).tolist())) == "135791113151"
    assert "".join(map(str, B.series_digits("fibonacci", 14).tolist())) == "01123581321345"
    assert "".join(map(str, B.series_digits("prime", 14).tolist())) == "23571113171923"
    for kind in B.SERIES_KINDS:
        d = B.series_digits(kind)
        assert d.shape == (256,) and int(d.min()) >= 0 and int(d.max()) <= 9
    with pytest.raises(UnknownNameError):
        B.series_digits("squares")


def _is_window(window: list[int], seq: list[int]) -> bool:
    n = len(window)
    return any(seq[i:i + n] == window for i in range(len(seq) - n + 1))


@pytest.mark.parametrize("kind", B.SERIES_KINDS)
def test_series_batches_follow_the_digit_sequence(mnist, kind):
    x, y = mnist
    seq = B.series_digits(kind, 256).tolist()
    batches = B.series_batches(kind, 5, x, y, batch_size=128, seed=3)
    assert len(batches) == 5
    for b in batches:
        assert isinstance(b, Batch)
        b.validate()
        assert b.x.shape == (128, 784) and bool(b.x_mask.all()) and bool(b.y_mask.all())
        digits = b.y[:, 0].long().tolist()
        assert _is_window(digits, seq)                          # 128 consecutive digits of the sequence
        assert torch.equal(y[b.index], b.y[:, 0].long())        # each image shows its digit
        assert torch.equal(b.x, x[b.index])
        assert bool((b.group == B.SERIES_KINDS.index(kind)).all())
    with pytest.raises(ValueError, match="exceeds"):
        B.series_batches(kind, 1, x, y, batch_size=300)


def test_class_batches_are_single_class(mnist):
    x, y = mnist
    sampler = B.StructuredBatchSampler(x, y, 64, "class", num_batches=20, seed=0)
    seen = set()
    for b in sampler:
        labels = b.y[:, 0].long()
        assert bool((labels == labels[0]).all())
        assert bool((b.group == labels[0]).all())
        assert b.index.unique().numel() == 64                   # without replacement
        seen.add(int(labels[0]))
    assert len(seen) > 3
    only = B.StructuredBatchSampler(x, y, 32, "class", classes=[7], seed=1).sample()
    assert set(only.y[:, 0].long().tolist()) == {7}


def test_random_and_mixed_batches(mnist):
    x, y = mnist
    r = B.StructuredBatchSampler(x, y, 128, "random", seed=0).sample()
    assert r.index.unique().numel() == 128 and bool((r.group == B.RANDOM_CATEGORY).all())
    assert len(set(r.y[:, 0].long().tolist())) > 5
    data = B.two_source_dataset("inverted", n_per_source=500, images=x, labels=y, seed=0)
    m = B.StructuredBatchSampler(data.images, data.labels, 100, "mixed", sources=data.sources, seed=0).sample()
    assert int((data.sources[m.index] == 1).sum()) == 50            # half from each source
    assert torch.equal(m.group, data.sources[m.index])
    m30 = B.StructuredBatchSampler(data.images, data.labels, 100, "mixed", sources=data.sources,
                                   mix_fraction=0.3, seed=0).sample()
    assert sorted(torch.bincount(m30.group, minlength=2).tolist()) == [30, 70]
    with pytest.raises(ValueError, match="sources"):
        B.StructuredBatchSampler(x, y, 8, "mixed")
    with pytest.raises(UnknownNameError):
        B.StructuredBatchSampler(x, y, 8, "grouped")


def test_seeded_determinism(mnist):
    x, y = mnist
    a = [b.index for b in B.StructuredBatchSampler(x, y, 32, "class", num_batches=3, seed=5)]
    b = [b.index for b in B.StructuredBatchSampler(x, y, 32, "class", num_batches=3, seed=5)]
    c = [b.index for b in B.StructuredBatchSampler(x, y, 32, "class", num_batches=3, seed=6)]
    assert all(torch.equal(i, j) for i, j in zip(a, b))
    assert not all(torch.equal(i, j) for i, j in zip(a, c))
    s1 = B.series_batches("prime", 2, x, y, generator=torch.Generator().manual_seed(1))
    s2 = B.series_batches("prime", 2, x, y, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(p.index, q.index) for p, q in zip(s1, s2))


def test_two_source_datasets(mnist):
    x, y = mnist
    d = B.two_source_dataset("digits", images=x, labels=y, seed=0)
    assert d.images.shape == (2 * 1797, 784) and d.names == ("mnist", "sklearn-digits")
    assert torch.bincount(d.sources).tolist() == [1797, 1797]
    assert float(d.images.min()) >= 0.0 and float(d.images.max()) <= 1.0
    inv = B.two_source_dataset("inverted", n_per_source=100, images=x, labels=y, seed=0)
    assert inv.images.shape == (200, 784)
    assert float(inv.images[inv.sources == 1].mean()) > 0.8 > float(inv.images[inv.sources == 0].mean())
    with pytest.raises(UnknownNameError):
        B.two_source_dataset("celeba")
