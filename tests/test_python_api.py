"""rayrcm from Python: ``rayrcm.api.certify`` on a model held in memory gives the rows of the single-device
reference (the draws of ``rayrcm certify`` for the same indices), the same on a Ray cluster;
``api.load_model`` and ``api.read_results``; images of the wrong shape or range are one line;
``import rayrcm`` loads neither torch nor Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import make_model

from rayrcm import api
from rayrcm.errors import ConfigError


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from rayrcm.data.datasets import eval_images, eval_split
    from rayrcm.models.export import build_from_file
    from rayrcm.sections import DataConfig

    path = make_model(tmp_path_factory.mktemp("api") / "model.pt", seed=3)
    model, meta = build_from_file(path)
    ds, _, _ = eval_split(DataConfig(name="digits", image_size=int(meta["image_size"])), "test")
    images, labels = eval_images(ds, [0, 4, 8, 12, 16, 20], meta["image_size"])
    return path, model, meta, images, labels


def test_certify_in_memory_equals_the_single_device_reference(digits):
    from rayrcm.certify import Smoother, certify

    path, model, meta, images, labels = digits
    rows = api.certify(model, images, labels, sigma=0.25, n=200, n0=20, indices=[0, 4, 8, 12, 16, 20])
    assert list(rows.columns) == ["idx", "label", "predict", "radius", "correct", "samples", "time"] and len(rows) == 6
    sm = Smoother(model, meta["num_classes"], 0.25, batch=1000)
    for r, x, y in zip(rows.itertuples(), images, labels.tolist()):
        cert, sel, est, _ = certify(sm, x.float() / 255, 20, 200, 0.001, index=r.idx)
        assert (r.predict, r.radius, r.correct, r.samples) == (cert.prediction, cert.radius, int(cert.prediction == y), 220)
    again = api.certify(model, images.float() / 255, labels, sigma=0.25, n=200, n0=20, indices=[0, 4, 8, 12, 16, 20])
    assert again.drop(columns="time").equals(rows.drop(columns="time"))  # uint8 and [0, 1] floats alike
    loaded, meta2 = api.load_model(str(path))
    assert meta2["num_classes"] == meta["num_classes"] and isinstance(loaded, torch.nn.Module)


@pytest.mark.parametrize("images, labels, needle", [
    (torch.rand(2, 8, 8), [0, 1], "must be (N, C, H, W) or one (C, H, W) image"),
    (torch.rand(2, 3, 8, 8) * 2 - 0.5, [0, 1], "must be in [0, 1] (pixel units"),
    (torch.rand(2, 3, 8, 8), [0], "labels=1 is invalid: must be one per image (2 images)"),
])
def test_images_a_model_cannot_take_are_one_line(digits, images, labels, needle):
    model = digits[1]
    if images.dim() == 3 and images.shape[0] == 2:
        images = images.unsqueeze(0).unsqueeze(0)  # (1, 1, 2, 8, 8): five dimensions
    with pytest.raises(ConfigError) as err:
        api.certify(model, images, labels, sigma=0.25, n=10)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_read_results_reads_a_folder_and_refuses_what_is_not_one(tmp_path):
    from rayrcm.result_parts import write_part

    write_part(tmp_path / "job" / "rows", [{"idx": 0, "label": 1, "predict": 1, "radius": 0.3, "correct": 1, "time": 0.1}])
    assert api.read_results(tmp_path / "job")["radius"].tolist() == [0.3]
    with pytest.raises(ConfigError, match="no such result folder or file"):
        api.read_results(tmp_path / "nothing")


def test_the_api_loads_neither_torch_nor_ray_until_used():
    code = "import sys; from rayrcm import api; print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.slow  # a real Ray cluster
def test_certify_on_ray_gives_the_same_rows(digits, ray_cluster):
    _, model, _, images, labels = digits
    local = api.certify(model, images, labels, sigma=0.25, n=200, n0=20, indices=[0, 4, 8, 12, 16, 20])
    spread = api.certify(model, images, labels, sigma=0.25, n=200, n0=20, indices=[0, 4, 8, 12, 16, 20], ray=True,
                            workers=2)
    assert spread.drop(columns="time").equals(local.drop(columns="time"))
