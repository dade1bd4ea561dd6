"""StableRep's caption-group reader (``data.name=caption_groups``, seed 003's ``dataset/data.py``): a CSV
of ``relpath,caption`` rows over one image root per generation seed, ``n`` roots drawn per item without
replacement from ``(train.seed, epoch, index)``, view ``k`` of image ``k``; the checks before any worker
starts; a short training through the in-process session."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rayrcm.config import ExperimentConfig, apply_overrides, to_dict, validate
from rayrcm.data.captions import CaptionGroups, read_caption_csv, root_order
from rayrcm.data.checks import check_dataset
from rayrcm.data.datasets import build_splits
from rayrcm.data.views import ImageGroup, MultiView, data_transform
from rayrcm.errors import ConfigError
from rayrcm.objectives import EpochContext, build_objective
from rayrcm.sections import DataConfig

ROWS = 6
ROOTS = 3


def _colour(root: int, row: int) -> tuple[int, int, int]:
    """The solid colour of row ``row``'s image in root ``root``: both can be read back from a view."""
    return 40 * root + 20, 30 * row + 10, 200


def _relpath(row: int) -> str:
    return f"000000/{row // 4:06d}/{row:05d}.png"  # the authors' <6d>/<6d>/<5d>.png layout


@pytest.fixture
def captions(tmp_path: Path) -> tuple[str, tuple[str, ...]]:
    """A CSV (header, a caption with a comma, two rows with the same caption) and 3 roots of 12 px PNGs."""
    from PIL import Image

    roots = []
    for j in range(ROOTS):
        root = tmp_path / f"ddim_2.0_seed_{j}"
        for r in range(ROWS):
            path = root / _relpath(r)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 12), _colour(j, r)).save(path)
        roots.append(str(root))
    lines = ["relpath,caption"] + [f'{_relpath(r)},"a photo of digit {r % 4}, close up"' for r in range(ROWS)]
    csv = tmp_path / "captions.csv"
    csv.write_text("\n".join(lines) + "\n")
    return str(csv), tuple(roots)


def _data(csv: str, roots: tuple[str, ...], **extra) -> DataConfig:
    return DataConfig(name="caption_groups", path=csv, folders=roots, image_size=8, val_fraction=0.0, **extra)


def _pool(csv: str, roots: tuple[str, ...]) -> CaptionGroups:
    pool = build_splits(_data(csv, roots)).train.dataset
    assert isinstance(pool, CaptionGroups)
    return pool


def _root_of(image, row: int) -> int:
    """Which root an image (PIL or [0, 1] tensor view) of ``row`` came from, by its colour."""
    px = tuple(image.getpixel((0, 0))) if hasattr(image, "getpixel") else tuple(
        int(round(float(v) * 255)) for v in image[:, 0, 0])
    matches = [j for j in range(ROOTS) if max(abs(a - b) for a, b in zip(px, _colour(j, row))) <= 2]
    assert len(matches) == 1, (px, row)
    return matches[0]


def test_csv_rows_as_the_authors_read_them(captions):
    csv, _ = captions
    rows = read_caption_csv(csv)
    assert len(rows) == ROWS  # the header's "relpath" has no image suffix: skipped, as data.py:57 does
    assert rows[1].relpath == _relpath(1) and rows[1].caption == "a photo of digit 1, close up"
    assert rows[0].caption == rows[4].caption  # same caption, two rows: two groups (negatives of each other)


def test_draws_are_reproducible_distinct_and_change_with_the_epoch(captions):
    csv, roots = captions
    pool, again = _pool(csv, roots), _pool(csv, roots)
    assert len(pool) == ROWS and pool.labels == [0] * ROWS
    draws = {}
    for epoch in range(8):
        pool.set_epoch(epoch, seed=7)
        again.set_epoch(epoch, seed=7)
        draws[epoch] = [pool.draw(i) for i in range(ROWS)]
        assert draws[epoch] == [again.draw(i) for i in range(ROWS)]  # a pure function of (seed, epoch, index)
        assert draws[epoch] == [root_order(7, epoch, i, ROOTS) for i in range(ROWS)]
        for i, order in enumerate(draws[epoch]):
            assert sorted(order) == list(range(ROOTS))  # without replacement
            group, label = pool[i]
            assert isinstance(group, ImageGroup) and label == 0 and len(group) == ROOTS
            assert [_root_of(group[k], i) for k in range(ROOTS)] == order  # image k is root order[k]'s file of row i
    assert draws[0] != draws[1]  # epochs draw anew
    assert len({tuple(d[0][:2]) for d in draws.values()}) > 1
    pool.set_epoch(0, seed=8)
    assert [pool.draw(i) for i in range(ROWS)] != draws[0]  # and so does another seed
    firsts = {tuple(d[i][:2]) for d in draws.values() for i in range(ROWS)}
    assert {j for pair in firsts for j in pair} == set(range(ROOTS))  # every root gets drawn


def test_multiview_gives_view_k_of_image_k(captions):
    csv, roots = captions
    data = _data(csv, roots)
    splits = build_splits(data)
    plain = data_transform("none", data, large=splits.large)
    views = MultiView(splits.train, [plain, plain])
    splits.train.dataset.set_epoch(3, seed=1)
    for i in range(ROWS):
        (v0, v1), _ = views[i]
        assert v0.shape == (3, 8, 8)
        order = root_order(1, 3, splits.train.indices[i], ROOTS)
        assert [_root_of(v0, splits.train.indices[i]), _root_of(v1, splits.train.indices[i])] == order[:2]
    with pytest.raises(ValueError, match="fewer than the 4 views"):
        MultiView(splits.train, [plain] * 4)[0]


def _cfg(csv: str, roots: tuple[str, ...], *extra: str) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), [
        "method.name=stablerep", "data.name=caption_groups", f"data.path={csv}", f"data.folders={','.join(roots)}",
        "data.image_size=8", "data.val_fraction=0", "data.batch_size=4", "model.patch_size=4",
        "model.proj_hidden_dim=16", "model.proj_dim=8", "method.n_views=2", "method.view=none", *extra])


def test_stablerep_hands_the_epoch_and_seed_to_the_reader(captions, tmp_path):
    csv, roots = captions
    cfg = validate(_cfg(csv, roots, "train.seed=5"))
    splits = build_splits(cfg.data)
    train_set = MultiView(splits.train, [data_transform("none", cfg.data, large=True)] * 2)
    obj = build_objective(cfg, splits.num_classes)
    obj.on_epoch(4, EpochContext(epochs=9, train_set=train_set, val_set=splits.val, work_dir=tmp_path, seed=5))
    assert (splits.train.dataset.epoch, splits.train.dataset.seed) == (4, 5)


@pytest.mark.parametrize("extra, key", [
    (["method.groups=label", "method.n_views=2"], "method.groups"),  # every row would be one group
    (["method.n_views=4"], "method.n_views"),  # 4 roots without replacement from 3
    (["data.folders=a,b,a"], "data.folders"),
])
def test_bad_values_are_one_line_errors(captions, extra, key):
    csv, roots = captions
    with pytest.raises(ConfigError, match=f"^{key}=") as err:
        validate(_cfg(csv, roots, *extra), check_paths=False)
    assert "\n" not in str(err.value)


def _break(kind: str, csv: str, roots: tuple[str, ...]) -> tuple[DataConfig, str]:
    """A data config with one fault, and the path its error must name."""
    if kind == "csv":
        return _data(csv + ".missing", roots), csv + ".missing"
    if kind == "root":
        return _data(csv, (*roots, roots[0] + "-gone")), roots[0] + "-gone"
    if kind == "image":
        gone = Path(roots[2]) / _relpath(4)
        gone.unlink()
        return _data(csv, roots), str(gone)
    Path(csv).write_text("relpath,caption\nnotes.txt,no image here\n")
    return _data(csv, roots), csv


@pytest.mark.parametrize("kind", ["csv", "root", "image", "no rows"])
def test_data_faults_are_one_line_before_any_worker(captions, kind):
    csv, roots = captions
    data, named = _break(kind, csv, roots)
    with pytest.raises(ConfigError) as err:
        check_dataset(data, batch_size=2, need_val=False)  # the driver's check before Ray starts
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_short_training_in_process(captions, tmp_path):
    """Three steps of StableRep on the caption groups through the session a Ray worker runs (no Ray):
    6 rows, batch 4, so one step per epoch and the reader's epoch follows the steps."""
    from rayrcm.train.session import build_session, run_training

    csv, roots = captions
    cfg = validate(_cfg(csv, roots, "train.steps=3", "train.checkpoint_every=10", "train.log_every=1",
                        f"train.storage_path={tmp_path / 'runs'}", "train.evals=", "train.test_evals="))
    s = build_session(cfg, to_dict(cfg), device=torch.device("cpu"))
    logged: list[dict[str, float]] = []
    metrics = run_training(s, s.objective, on_log=lambda step, m: logged.append(m), on_checkpoint=lambda *_: None)
    assert math.isfinite(metrics["loss"]) and len(logged) == 3
    assert all(math.isfinite(m["multi_pos"]) for m in logged)
    pool = s.train_set.base.dataset
    assert (pool.epoch, pool.seed) == (2, cfg.train.seed)
