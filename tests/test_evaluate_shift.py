"""The shifted sets of ``rayrcm evaluate`` for an ImageFolder model: ImageNet-Sketch / ImageNet-R /
Stylized-ImageNet class folders (``--shift NAME=PATH``) and released ImageNet-C
(``--c-path``, ``<corruption>/<severity>/<wnid>/``), restricted to the model's class list, written
here as tiny PNG trees. One job on a real Ray cluster: every set's accuracy equals a plain PyTorch
loop over the same images (ImageNet-R's logits masked to its classes), the protocol records how many
classes remain, and ``rayrcm compare`` fills seed 004's Sketch / Stylized / R / C columns. Bad input
is one line before Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fails_in_one_line

from rayrcm.errors import ConfigError

CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")
SIZE = 8


def _pngs(folder: Path, n: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def _tree(root: Path, classes, n: int, seed: int) -> Path:
    for k, c in enumerate(classes):
        _pngs(root / c, n, seed * 100 + k)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An ImageFolder dataset of 4 classes, its class list, an untrained classifier for it, and
    shifted sets: Sketch (every class and one folder outside the list), R (2 of the 4 classes),
    Stylized (3 classes), ImageNet-C (2 corruptions x severities 1, 3; fog/3 lacks a class)."""
    from rayrcm.config import ExperimentConfig, apply_overrides, to_dict
    from rayrcm.models import build_classifier
    from rayrcm.train.checkpoint import model_meta, save_model

    tmp = tmp_path_factory.mktemp("shift")
    data = tmp / "imagenet"
    _tree(data / "train", CLASSES, 2, 1)
    _tree(data / "val", CLASSES, 3, 2)
    (tmp / "classes.txt").write_text("# the model's classes\n" + "\n".join(CLASSES) + "\n")
    _tree(tmp / "sketch", (*CLASSES, "n09999999"), 2, 3)
    _tree(tmp / "r", (CLASSES[1], CLASSES[3]), 3, 4)
    _tree(tmp / "stylized", CLASSES[:3], 2, 5)
    for k, (c, s) in enumerate([("contrast", 1), ("contrast", 3), ("fog", 1), ("fog", 3)]):
        _tree(tmp / "imagenet-c" / c / str(s), CLASSES[:3] if (c, s) == ("fog", 3) else CLASSES, 2, 10 + k)
    torch.manual_seed(3)
    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", "data.name=imagefolder", f"data.path={data}",
                                               f"data.image_size={SIZE}", "data.val_fraction=0", "model.patch_size=4"])
    model = tmp / "model.pt"
    save_model(model, build_classifier(cfg.model, SIZE, len(CLASSES)), model_meta(to_dict(cfg), "classifier", 4))
    return tmp, model


def _shifts(tmp: Path) -> list[str]:
    return [f"shifts=sketch={tmp / 'sketch'},r={tmp / 'r'},stylized={tmp / 'stylized'}"]


def _cfg(tmp: Path, model: Path, *extra: str):
    from rayrcm.orchestration import evaluate_job

    return evaluate_job.config_from_args([
        f"model={model}", f"out_dir={tmp / 'out'}", "name=shift", "tracking.enabled=false",
        "suite=clean,corruptions,shift", f"c_path={tmp / 'imagenet-c'}", "severities=1,3", *_shifts(tmp),
        f"class_list={tmp / 'classes.txt'}", "shard_size=4", "batch=4", "workers=1", "flush_every=1", *extra])


def _plain_correct(model_file: Path, root: Path, masked: bool = False) -> tuple[int, int]:
    """(correct, images) of a plain PyTorch loop over ``root/<class>/*.png`` for the model's classes
    (label: the class's index in the list), logits masked to the classes present when ``masked``."""
    from PIL import Image

    from rayrcm.data.views import eval_transform_uint8
    from rayrcm.models.export import build_from_file

    model, _ = build_from_file(model_file)
    t = eval_transform_uint8(SIZE, large=True, crop_pct=0.875)
    xs, ys = [], []
    for k, c in enumerate(CLASSES):
        for f in sorted((root / c).glob("*.png")) if (root / c).is_dir() else []:
            xs.append(t(Image.open(f).convert("RGB")))
            ys.append(k)
    present = sorted(set(ys))
    with torch.no_grad():
        logits = model.eval()(torch.stack(xs).float() / 255)
    if masked:
        absent = [k for k in range(len(CLASSES)) if k not in present]
        logits[:, absent] = float("-inf")
    return int((logits.argmax(1) == torch.tensor(ys)).sum()), len(ys)


# ----------------------------------------------------------------------------- without Ray


def _argv(tmp: Path, model: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(model), "--out", str(tmp / "bad"), "--set", "tracking.enabled=false",
            "--suite", "clean,shift", *extra]


def test_a_missing_shift_folder_is_one_line_before_ray(world, capsys):
    tmp, model = world
    fails_in_one_line(capsys, _argv(tmp, model, "--shift", f"sketch={tmp / 'sketch'}", "--shift",
                                    f"r={tmp / 'no-such'}"), "shift='r=")
    err = fails_in_one_line(capsys, _argv(tmp, model, "--shift", f"r={tmp / 'no-such'}"), "no such folder")
    assert "no-such" in err
    fails_in_one_line(capsys, _argv(tmp, model, "--shift", f"bogus={tmp}"), "give NAME=PATH with NAME one of")
    fails_in_one_line(capsys, _argv(tmp, model, "--suite", "clean", "--shift", f"r={tmp / 'r'}"),
                      "names shifted sets but --suite has no shift part")
    fails_in_one_line(capsys, _argv(tmp, model, "--shift", f"r={tmp / 'r'}", "--shift", f"imagenet-r={tmp / 'r'}"),
                      "names imagenet-r twice")


def test_a_class_list_that_leaves_nothing_is_one_line_before_ray(world, capsys):
    tmp, model = world
    other = tmp / "other.txt"
    other.write_text("\n".join(f"n0000000{k}" for k in range(4)))
    err = fails_in_one_line(capsys, _argv(tmp, model, "--shift", f"r={tmp / 'r'}", "--class-list", str(other)),
                            "none of the 4 classes has a folder there")
    assert str(tmp / "r") in err
    three = tmp / "three.txt"
    three.write_text("\n".join(CLASSES[:3]))
    fails_in_one_line(capsys, _argv(tmp, model, "--shift", f"r={tmp / 'r'}", "--class-list", str(three)),
                      "lists 3 classes; the model has 4")
    fails_in_one_line(capsys, _argv(tmp, model, "--shift", f"r={tmp / 'r'}", "--class-list", str(tmp / "none.txt")),
                      "no such file")


def test_imagenet_c_faults_are_one_line_before_ray(world, capsys):
    tmp, model = world
    argv = ["evaluate", "--model", str(model), "--out", str(tmp / "bad"), "--set", "tracking.enabled=false",
            "--suite", "corruptions"]
    fails_in_one_line(capsys, [*argv, "--c-path", str(tmp / "no-such")], "no such folder (ImageNet-C")
    fails_in_one_line(capsys, [*argv, "--c-path", str(tmp / "imagenet-c"), "--corruptions", "snow"],
                      "missing (found: contrast, fog)")
    fails_in_one_line(capsys, [*argv, "--c-path", str(tmp / "imagenet-c"), "--severities", "5"],
                      "missing: no folder for that severity")
    fails_in_one_line(capsys, [*argv, "--c-path", str(tmp / "sketch")], "holds no ImageNet-C")


# ----------------------------------------------------------------------------- on Ray


@pytest.mark.slow
def test_shifted_sets_and_imagenet_c_equal_a_plain_loop_and_fill_compare(world, ray_cluster, capsys):
    from rayrcm.analysis.compare import compare_tables, read_result
    from rayrcm.cli import main
    from rayrcm.orchestration import evaluate_job

    tmp, model = world
    result = evaluate_job.run(_cfg(tmp, model), show_table=False)
    t = result.table.set_index(["set", "corruption", "severity", "attack"])
    clean = t.loc[("imagefolder", "none", 0, "none")]
    assert (int(clean.correct), int(clean.images)) == _plain_correct(model, tmp / "imagenet" / "val")
    for name, folder, masked in [("imagenet-sketch", "sketch", False), ("imagenet-r", "r", True),
                                 ("stylized-imagenet", "stylized", False)]:
        cell = t.loc[(name, "none", 0, "none")]
        assert (int(cell.correct), int(cell.images)) == _plain_correct(model, tmp / folder, masked), name
        assert not bool(cell.generated)
    for c in ("contrast", "fog"):
        for s in (1, 3):
            cell = t.loc[("imagenet-c", c, s, "none")]
            want = _plain_correct(model, tmp / "imagenet-c" / c / str(s))
            assert (int(cell.correct), int(cell.images)) == want and not bool(cell.generated), (c, s)
    sets = json.loads((result.out / "protocol.json").read_text())["shift_sets"]
    remain = {n: (v["classes"], v["of"], v["masked"]) for n, v in sets.items()}
    assert remain == {"imagenet-sketch": (4, 4, False), "imagenet-r": (2, 4, True),
                      "stylized-imagenet": (3, 4, False), "imagenet-c": (3, 4, False)}
    assert sets["imagenet-r"]["path"] == str((tmp / "r").resolve())
    assert "imagenet-r: 2 of 4 classes remain, 6 images, logits masked" in capsys.readouterr().out

    shift = compare_tables({"job": read_result(result.out)})["shift"]
    assert list(shift.columns) == ["clean", "C", "Sketch", "Stylized", "R"] and not shift.isna().any().any()
    assert shift.loc["job", "R"] == pytest.approx(t.loc[("imagenet-r", "none", 0, "none")].accuracy)
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(result.out)])
    assert exit_.value.code == 0
    assert "| Sketch | Stylized | R |" in capsys.readouterr().out.replace("  ", " ")

    assert evaluate_job.run(_cfg(tmp, model), show_table=False).computed == 0  # resumes: nothing left
    moved = [f"shifts=sketch={tmp / 'stylized'},r={tmp / 'r'},stylized={tmp / 'stylized'}"]
    with pytest.raises(ConfigError, match="another shifted set .imagenet-sketch was read from") as err:
        evaluate_job.prepare(_cfg(tmp, model, *moved))
    assert "\n" not in str(err.value)
