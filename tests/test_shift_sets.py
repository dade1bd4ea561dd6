"""Released shift sets read from folders written here (:mod:`rayrcm.data.shift`): CIFAR-10-C severity
blocks, CIFAR-10.1, ImageNet-C and class folders restricted to the model's class list; every fault
is one line naming the file or folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayrcm.data import shift
from rayrcm.data.checks import check_images, image_paths
from rayrcm.data.datasets import eval_images
from rayrcm.errors import ConfigError


def _write_cifar_c(root, names=("contrast", "fog"), per_severity=4, classes=10, label_rows=None):
    """A CIFAR-C folder: every pixel of severity s's block is s * 10 + (image within block)."""
    root.mkdir(parents=True, exist_ok=True)
    n = 5 * per_severity
    for name in names:
        values = np.array([s * 10 + i for s in range(1, 6) for i in range(per_severity)], np.uint8)
        np.save(root / f"{name}.npy", np.broadcast_to(values[:, None, None, None], (n, 32, 32, 3)).copy())
    labels = np.array([(i * 3) % classes for i in range(per_severity)] * 5, np.uint8)
    np.save(root / "labels.npy", labels if label_rows is None else labels[:label_rows])
    return root


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_cifar_c_severity_block(tmp_path):
    root = _write_cifar_c(tmp_path / "CIFAR-10-C")
    assert shift.cifar_c_corruptions(root) == ["contrast", "fog"]
    for severity in (1, 3, 5):
        ds = shift.read_cifar_c(root, "fog", severity)
        assert len(ds) == 4 and isinstance(ds.data, np.memmap)  # a view of the file, not a copy
        assert [int(np.asarray(ds.data[i]).max()) for i in range(4)] == [severity * 10 + i for i in range(4)]
        assert [ds[i][1] for i in range(4)] == [0, 3, 6, 9]
    images, labels = eval_images(shift.read_cifar_c(root, "contrast", 2), [0, 3], 32)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8 and labels.tolist() == [0, 9]
    assert int(images[1].max()) == 23


def test_cifar_c_labels_per_block_and_cifar100(tmp_path):
    root = _write_cifar_c(tmp_path / "c100", classes=100, label_rows=4)
    ds = shift.read_cifar_c(root, "contrast", 4, num_classes=100)
    assert [ds[i][1] for i in range(4)] == [0, 3, 6, 9]


def test_cifar_c_missing_file_names_it(tmp_path):
    root = _write_cifar_c(tmp_path / "CIFAR-10-C")
    with pytest.raises(ConfigError) as err:
        shift.read_cifar_c(root, "snow", 1)
    text = _one_line(err)
    assert "snow.npy" in text and "found: contrast, fog" in text
    (root / "labels.npy").unlink()
    with pytest.raises(ConfigError, match="labels.npy") as err:
        shift.read_cifar_c(root, "fog", 1)
    _one_line(err)
    with pytest.raises(ConfigError, match="no such folder"):
        shift.read_cifar_c(tmp_path / "nowhere", "fog", 1)


def test_cifar_c_bad_files_are_one_line(tmp_path):
    root = _write_cifar_c(tmp_path / "c")
    with pytest.raises(ConfigError, match="severity"):
        shift.read_cifar_c(root, "fog", 6)
    np.save(root / "fog.npy", np.zeros((21, 32, 32, 3), np.uint8))  # not 5 blocks
    with pytest.raises(ConfigError, match="5 severity blocks") as err:
        shift.read_cifar_c(root, "fog", 1)
    assert "fog.npy" in _one_line(err)
    np.save(root / "fog.npy", np.zeros((20, 32, 32), np.float32))
    with pytest.raises(ConfigError, match="expected uint8"):
        shift.read_cifar_c(root, "fog", 1)
    np.save(root / "fog.npy", np.array([{"a": 1}] * 20, dtype=object), allow_pickle=True)  # pickled: refused
    with pytest.raises(ConfigError, match="not a readable .npy") as err:
        shift.read_cifar_c(root, "fog", 1)
    _one_line(err)
    (root / "fog.npy").write_bytes(b"not numpy")
    with pytest.raises(ConfigError, match="fog.npy"):
        shift.read_cifar_c(root, "fog", 1)
    np.save(root / "labels.npy", np.full(20, 12, np.uint8))
    with pytest.raises(ConfigError, match="label 12 outside 0..9"):
        shift.read_cifar_c(root, "contrast", 1)
    np.save(root / "labels.npy", np.zeros(7, np.uint8))
    with pytest.raises(ConfigError, match="expected 20 or 4 integer labels"):
        shift.read_cifar_c(root, "contrast", 1)


def test_cifar10_1_pair(tmp_path):
    data = np.arange(6 * 32 * 32 * 3, dtype=np.int64).astype(np.uint8).reshape(6, 32, 32, 3)
    np.save(tmp_path / "cifar10.1_v6_data.npy", data)
    np.save(tmp_path / "cifar10.1_v6_labels.npy", np.array([0, 1, 2, 3, 4, 9], np.int64))
    ds = shift.read_cifar10_1(tmp_path)
    assert len(ds) == 6 and ds[5][1] == 9 and np.array_equal(np.asarray(ds[2][0]), data[2])
    with pytest.raises(ConfigError, match="cifar10.1_v4_data.npy"):
        shift.read_cifar10_1(tmp_path, version="v4")
    np.save(tmp_path / "cifar10.1_v6_labels.npy", np.zeros(5, np.int64))
    with pytest.raises(ConfigError, match="expected 6 integer labels"):
        shift.read_cifar10_1(tmp_path)


def _write_classes(root, wnids, per_class=2, ext="png"):
    from PIL import Image

    for k, wnid in enumerate(wnids):
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((20, 24, 3), 40 * k + i, np.uint8)).save(root / wnid / f"{i}.{ext}")
    return root


def test_imagenet_c_restricted_to_class_list(tmp_path):
    _write_classes(tmp_path / "inc" / "contrast" / "3", ["n01", "n02", "n05"])
    classes = ["n01", "n03", "n05"]  # the model's classes: n03 has no folder, n02 is not the model's
    s = shift.read_imagenet_c(tmp_path / "inc", "contrast", 3, classes=classes)
    assert s.present == (0, 2) and s.missing == ("n03",) and s.extra == ("n02",) and not s.masked
    assert len(s.dataset) == 4 and sorted(set(s.dataset.targets)) == [0, 2]
    assert s.summary() == ("imagenet-c/contrast/3: 2 of 3 classes, 4 images; "
                           "1 class folder(s) outside the class list not read")
    assert check_images(image_paths(s.dataset)) == 4  # the header checks see the files
    images, labels = eval_images(s.dataset, [0, 3], 16, large=True)
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [0, 2]
    with pytest.raises(ConfigError, match="found: contrast") as err:
        shift.read_imagenet_c(tmp_path / "inc", "fog", 3)
    assert "fog" in _one_line(err)
    with pytest.raises(ConfigError, match="severity"):
        shift.read_imagenet_c(tmp_path / "inc", "contrast", 2)


def test_imagenet_r_masks_logits_to_present_classes(tmp_path):
    root = _write_classes(tmp_path / "imagenet-r", ["n02", "n04"], per_class=1)
    s = shift.read_shift_folder("imagenet-r", root, classes=["n01", "n02", "n03", "n04"])
    assert s.masked and s.present == (1, 3) and "2 of 4 classes" in s.summary()
    logits = torch.tensor([[9.0, 1.0, 8.0, 2.0]])
    assert s.logits(logits).argmax(1).item() == 3  # n01, n03 are not in ImageNet-R
    assert torch.isinf(s.logits(logits)[0, [0, 2]]).all()
    sketch = shift.read_shift_folder("imagenet-sketch", root, classes=["n01", "n02", "n03", "n04"])
    assert torch.equal(sketch.logits(logits), logits)  # no masking outside ImageNet-R's protocol


def test_folder_set_errors_and_class_list_file(tmp_path):
    root = _write_classes(tmp_path / "sketch", ["n01", "n02"])
    s = shift.read_shift_folder("imagenet-sketch", root)  # no class list: the set's own folders
    assert s.classes == ("n01", "n02") and s.present == (0, 1)
    with pytest.raises(ConfigError, match="none of the 1 classes"):
        shift.read_shift_folder("stylized-imagenet", root, classes=["n09"])
    with pytest.raises(ConfigError, match="choose one of"):
        shift.read_shift_folder("imagenet-a", root)
    (tmp_path / "empty" / "n01").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no image files"):
        shift.read_shift_folder("imagenet-sketch", tmp_path / "empty")
    listing = tmp_path / "in100.txt"
    listing.write_text("# ImageNet-100\nn02\n\nn01  # a comment\n")
    assert shift.read_class_list(listing) == ["n02", "n01"]
    s = shift.read_shift_folder("imagenet-sketch", root, classes=shift.read_class_list(listing))
    assert s.dataset[0][1] == 1  # n01's images are the model's class 1
    listing.write_text("n01\nn01\n")
    with pytest.raises(ConfigError, match="listed twice"):
        shift.read_class_list(listing)
