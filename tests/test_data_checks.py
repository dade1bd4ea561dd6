"""Data faults are found on the driver before any Ray work, each as one line naming the file or the
key (:func:`rayrcm.data.checks.check_dataset`): missing or truncated CIFAR files, a validation
split the dataset cannot give, an epoch smaller than one batch, a non-image file in an ImageFolder."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest

from rayrcm.config import DataConfig
from rayrcm.data.checks import check_dataset, check_images, image_paths
from rayrcm.data.datasets import eval_images
from rayrcm.errors import ConfigError

CIFAR10 = ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "batches.meta",
           "label_names", "labels", 10)
CIFAR100 = ("cifar-100-python", ["train", "test"], "meta", "fine_label_names", "fine_labels", 100)


def _write_cifar(root, layout=CIFAR10, n=20):
    """A CIFAR-format folder: ``n`` images per batch file, labels ``0, 1, 2, ...`` in turn across the files."""
    folder_name, batches, meta, meta_key, label_key, classes = layout
    folder = root / folder_name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for b, name in enumerate(batches):
        labels = [(b * n + i) % classes for i in range(n)]
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: labels}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / meta).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(classes)]}))
    return folder


def _write_folder(root, classes=("cat", "dog"), per_class=4, ext="png"):
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((12, 10, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.{ext}")
    return root


def _cifar(root, name="cifar10", **kw) -> DataConfig:
    return DataConfig(name=name, path=str(root), image_size=32, **kw)


def _fails(data: DataConfig, *, batch_size: int = 8, need_val: bool = False) -> str:
    """The check's error line; the check must take well under 5 s on these tiny folders."""
    tic = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        check_dataset(data, batch_size=batch_size, need_val=need_val)
    assert time.perf_counter() - tic < 5
    line = str(err.value)
    assert "\n" not in line and "Traceback" not in line, line
    return line


# ----------------------------------------------------------------------------- good data passes


@pytest.mark.parametrize("layout", [CIFAR10, CIFAR100], ids=["cifar10", "cifar100"])
def test_a_good_cifar_folder_passes(tmp_path, layout):
    _write_cifar(tmp_path, layout, n=200)
    tic = time.perf_counter()
    splits = check_dataset(_cifar(tmp_path, f"cifar{layout[-1]}", val_fraction=0.5), batch_size=64, need_val=True)
    assert time.perf_counter() - tic < 5
    pool = 200 * (len(layout[1]) - 1)
    assert len(splits.train) + len(splits.val) == pool and len(splits.val) == pool // 2 and len(splits.test) == 200


def test_a_good_image_folder_passes(tmp_path):
    _write_folder(tmp_path, per_class=5)
    splits = check_dataset(DataConfig(name="imagefolder", path=str(tmp_path), image_size=32, val_fraction=0.4),
                           batch_size=6, need_val=True)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (6, 4, 10, 2)
    assert len(image_paths(splits.train)) == 6 and all(p.endswith(".png") for p in image_paths(splits.test))


# ----------------------------------------------------------------------------- CIFAR files


def test_missing_cifar_files_are_all_named_in_one_line(tmp_path):
    folder = _write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    (folder / "batches.meta").unlink()
    line = _fails(_cifar(tmp_path))
    assert line.startswith(f"CIFAR files={str(folder)!r} is invalid: missing batches.meta, data_batch_3 ("), line
    (folder / "batches.meta").write_bytes(b"")  # one missing file: its full path
    line = _fails(_cifar(tmp_path))
    assert line.startswith(f"CIFAR file={str(folder / 'data_batch_3')!r} is invalid: missing"), line


def test_a_missing_cifar100_meta_file_is_named(tmp_path):
    folder = _write_cifar(tmp_path, CIFAR100)
    (folder / "meta").unlink()
    assert str(folder / "meta") in _fails(_cifar(tmp_path, "cifar100"))


def test_a_truncated_cifar_batch_is_named(tmp_path):
    folder = _write_cifar(tmp_path)
    data = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(data[: len(data) // 2])
    line = _fails(_cifar(tmp_path))
    assert line.startswith(f"CIFAR batch file={str(folder / 'data_batch_2')!r} is invalid:"), line
    assert "truncated" in line


# ----------------------------------------------------------------------------- split sizes


def test_a_val_fraction_that_leaves_no_training_image_is_named(tmp_path):
    _write_cifar(tmp_path, n=4)  # 20 training images, 2 per class
    line = _fails(_cifar(tmp_path, val_fraction=0.96))
    assert line.startswith("data.val_fraction=0.96 is invalid: leaves 0 training images (all 20 images"), line
    assert "use data.val_fraction from 0.5 to 0.5" in line  # 10 classes: 10 images on each side
    line = _fails(_cifar(tmp_path, val_fraction=0.8))
    assert "leaves 4 of the 20 images of cifar10 for training, fewer than its 10 classes" in line, line
    line = _fails(_cifar(tmp_path, val_fraction=0.2))
    assert "holds out 4 of the 20 images of cifar10 for validation, fewer than its 10 classes" in line, line
    assert len(check_dataset(_cifar(tmp_path, val_fraction=0.5), batch_size=8, need_val=True).val) == 10


def test_no_validation_image_when_the_run_needs_them_is_named(tmp_path):
    _write_cifar(tmp_path, n=4)
    line = _fails(_cifar(tmp_path, val_fraction=0.0), need_val=True)
    assert line.startswith("data.val_fraction=0.0 is invalid: holds out 0 of the 20 training images"), line
    assert "needs a validation split" in line
    assert len(check_dataset(_cifar(tmp_path, val_fraction=0.0), batch_size=8, need_val=False).train) == 20


def test_a_class_with_one_image_cannot_be_split(tmp_path):
    _write_folder(tmp_path, classes=("a", "b"), per_class=3)
    for f in ("1.png", "2.png"):
        (tmp_path / "train" / "b" / f).unlink()
    line = _fails(DataConfig(name="imagefolder", path=str(tmp_path), image_size=32, val_fraction=0.5))
    assert line.startswith("data.val_fraction=0.5 is invalid: cannot split imagefolder's 4 images: class 1 has only 1"), line
    assert "use data.val_fraction=0" in line


def test_an_epoch_smaller_than_one_batch_is_named(tmp_path):
    _write_cifar(tmp_path, n=4)  # 20 images; val_fraction 0.5 keeps 10 for training
    line = _fails(_cifar(tmp_path, val_fraction=0.5), batch_size=16)
    assert line.startswith("data.batch_size=16 is invalid: larger than the 10 training images of cifar10 "
                           "(20 minus the 10 held out by data.val_fraction=0.5)"), line
    assert line.endswith("use data.batch_size <= 10")
    assert len(check_dataset(_cifar(tmp_path, val_fraction=0.5), batch_size=10, need_val=False).train) == 10


# ----------------------------------------------------------------------------- image files


def test_a_non_image_file_named_jpg_is_named(tmp_path):
    _write_folder(tmp_path, ext="jpg")
    bad = tmp_path / "train" / "dog" / "2.jpg"
    bad.write_text("<html>not an image</html>\n")
    data = DataConfig(name="imagefolder", path=str(tmp_path), image_size=32, val_fraction=0.0)
    line = _fails(data)
    assert line.startswith(f"image file={str(bad)!r} is invalid: not an image"), line
    other = tmp_path / "val" / "cat" / "0.jpg"
    other.write_bytes(b"")  # an empty one in val/ (the test split) too: counted, the first named
    line = _fails(data)
    assert line.startswith(f"image file={str(bad)!r}") and f"1 more bad image file(s), e.g. {other}" in line, line


def test_header_checks_of_a_thousand_files_are_fast(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(1000):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(paths[-1])
    tic = time.perf_counter()
    assert check_images(paths) == 1000
    assert time.perf_counter() - tic < 5


def test_an_image_damaged_after_its_header_is_named_when_read(tmp_path):
    """The header check passes a JPEG cut after its header; reading it names the file (the worker's
    loader raises OSError naming it; the certification driver's read is one ConfigError line)."""
    _write_folder(tmp_path, per_class=2, ext="jpg")
    from PIL import Image

    cut = tmp_path / "val" / "dog" / "1.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:700])
    splits = check_dataset(DataConfig(name="imagefolder", path=str(tmp_path), image_size=32, val_fraction=0.0),
                           batch_size=2, need_val=False)
    index = image_paths(splits.test).index(str(cut))
    with pytest.raises(OSError, match=str(cut)):
        splits.test[index]
    with pytest.raises(ConfigError) as err:
        eval_images(splits.test, [0, index], 32, large=True)
    assert str(err.value).startswith(f"image={index} is invalid: image file {str(cut)!r} cannot be read")


def test_text_files_that_are_not_utf8_are_one_line_naming_the_file(tmp_path):
    from rayrcm.data.captions import read_caption_csv
    from rayrcm.data.shift import read_class_list
    from rayrcm.errors import ConfigError

    (tmp_path / "captions.csv").write_bytes("a.jpg,caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "classes.txt").write_bytes("n01\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"captions.csv' is invalid: is not UTF-8 text \(byte \d+"):
        read_caption_csv(tmp_path / "captions.csv")
    with pytest.raises(ConfigError, match=r"classes.txt' is invalid: is not UTF-8 text"):
        read_class_list(tmp_path / "classes.txt")


def test_a_config_error_raised_in_a_ray_worker_reaches_the_driver_as_itself():
    import pickle

    from rayrcm.errors import ConfigError

    err = pickle.loads(pickle.dumps(ConfigError("model.lora_rank", 4, "only ViT encoders take LoRA")))
    assert isinstance(err, ConfigError) and str(err) == "model.lora_rank=4 is invalid: only ViT encoders take LoRA"
    typo = pickle.loads(pickle.dumps(ConfigError("method.name", "gausian", "choose one of: gaussian, rcm")))
    assert str(typo).count("did you mean") == 1  # the suggestion is not added twice on the way back
