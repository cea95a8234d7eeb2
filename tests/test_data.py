import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from cnnmod import CnnmodError, InputSpec, load_data
from cnnmod.data.sources import split_per_class


def test_mnist5k_split_rule():
    train, test = load_data("mnist5k", "train"), load_data("mnist5k", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    everything = load_data("mnist5k", "all")
    # test = the last 100 images of each class in file order
    last_zero = torch.nonzero(everything.labels == 0).flatten()[-100:]
    assert torch.equal(test.images[test.labels == 0], everything.images[last_zero])


def test_digits_split_rule():
    train, test = load_data("digits", "train"), load_data("digits", "test")
    assert len(train) + len(test) == 1797
    counts = torch.bincount(load_data("digits", "all").labels)
    assert torch.bincount(train.labels).tolist() == [(4 * int(n)) // 5 for n in counts]
    assert train.images.shape[1:] == (1, 8, 8) and int(train.images.max()) == 255


def test_split_per_class_holds_out_the_last_ones_in_order():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    kept, held = split_per_class(labels, lambda n: 1)
    assert kept.tolist() == [0, 1, 2, 3, 5] and held.tolist() == [4, 6]


def test_image_folder_labels_follow_sorted_class_names(image_folder):
    ds = load_data(str(image_folder))
    assert ds.classes == ["ant", "bee", "cat"]
    assert ds.images.shape == (12, 3, 6, 6)
    # "cat" (c=0) images hold values 0..3, "ant" (c=1) 10..13: labels are by sorted name
    assert ds.images[ds.labels == 2][:, 0, 0, 0].tolist() == [0, 1, 2, 3]
    assert ds.images[ds.labels == 0][:, 0, 0, 0].tolist() == [10, 11, 12, 13]


def test_folder_train_val_split_and_tar_give_the_same_images(image_folder, tmp_path):
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_folder, arcname="imgs")
    a, b = load_data(str(image_folder), "val"), load_data(str(archive), "val")
    assert len(a) == 3 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert len(load_data(str(archive), "train")) == 9


def test_grey_image_in_rgb_folder_is_converted_and_sizes_can_be_forced(image_folder):
    Image.fromarray(np.full((6, 6), 7, dtype=np.uint8)).save(image_folder / "train" / "ant" / "zz.png")
    ds = load_data(str(image_folder))
    assert ds.images.shape == (13, 3, 6, 6)
    assert load_data(str(image_folder), size=(4, 5), channels=1).images.shape == (13, 1, 4, 5)


def test_bad_folders_are_clear_errors(image_folder, tmp_path):
    (image_folder / "train" / "ant" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CnnmodError, match="cannot decode image .*broken.jpg"):
        load_data(str(image_folder))
    (image_folder / "train" / "ant" / "broken.jpg").unlink()
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(image_folder / "train" / "bee" / "big.png")
    with pytest.raises(CnnmodError, match="found 9x9 in .*big.png; pass --size"):
        load_data(str(image_folder))
    (image_folder / "train" / "bee" / "big.png").unlink()
    (image_folder / "train" / "empty").mkdir()
    with pytest.raises(CnnmodError, match="class folder 'empty' holds no images"):
        load_data(str(image_folder))
    with pytest.raises(CnnmodError, match="does not exist"):
        load_data(str(tmp_path / "nowhere"))
    with pytest.raises(CnnmodError, match="expected a split"):
        load_data("mnist5k", "validation")


def _write_cifar10(folder, rng):
    folder.mkdir()
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar_pickle_folder(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    train = load_data(str(tmp_path / "cifar-10-batches-py"))
    test = load_data(str(tmp_path / "cifar-10-batches-py"), "test")
    assert (len(train), len(test)) == (20, 4)
    assert train.classes[9] == "c9" and train.images.shape == (20, 3, 32, 32)
    assert test.labels.tolist() == [0, 1, 2, 9]


def test_cifar_pickle_that_calls_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    _write_cifar10(tmp_path / "cifar", np.random.default_rng(0))
    (tmp_path / "cifar" / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(CnnmodError, match="not a CIFAR data batch"):
        load_data(str(tmp_path / "cifar"))


def test_input_spec_prepare_converts_channels_size_and_normalises():
    spec = InputSpec(3, (4, 4), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    grey = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    x = spec.prepare(grey)
    assert x.shape == (2, 3, 4, 4) and torch.allclose(x, torch.full_like(x, 2.0))
    with pytest.raises(CnnmodError, match="found 4 channels"):
        spec.prepare(torch.zeros(1, 4, 4, 4, dtype=torch.uint8))
    to_grey = InputSpec(1, (2, 2), (0.0,), (1.0,)).prepare(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(to_grey, torch.ones(1, 1, 2, 2))


def test_rgba_and_palette_images_become_rgb_and_four_channel_batches_are_refused(tmp_path):
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 4), 200, dtype=np.uint8), "RGBA").save(root / "a" / "x.png")
    Image.fromarray(np.full((4, 4, 3), 9, dtype=np.uint8)).convert("P").save(root / "a" / "y.png")
    (root / "b").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(root / "b" / "z.png")
    assert load_data(str(root)).images.shape == (3, 3, 4, 4)
    with pytest.raises(CnnmodError, match="expected images with 3 channel"):
        InputSpec(3, (4, 4), (0.5,) * 3, (0.5,) * 3).prepare(torch.zeros(1, 4, 4, 4, dtype=torch.uint8))


def test_only_keeps_and_relabels_the_named_classes():
    ds = load_data("digits", "test")
    pair = ds.only(["7", "2"])
    assert pair.classes == ["7", "2"] and set(pair.labels.tolist()) == {0, 1}
    assert len(pair) == int((ds.labels == 7).sum() + (ds.labels == 2).sum())
    assert torch.equal(pair.images[pair.labels == 0], ds.images[ds.labels == 7])
    with pytest.raises(CnnmodError, match="found 'x'"):
        ds.only(["x"])
