"""``rayrcm certify`` / ``predict`` / ``analyze``: bad input fails with one line before any Ray work;
the protocol is resolved from the model; a model trained at another sigma is flagged."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
from helpers import fails_in_one_line, make_model

from rayrcm.certify.protocol import SmoothingConfig, select_indices
from rayrcm.errors import ConfigError
from rayrcm.orchestration import certify_job


@pytest.fixture
def model(tmp_path):
    return make_model(tmp_path / "model.pt")


def _fails(capsys, argv, needle):
    fails_in_one_line(capsys, argv, needle)


@pytest.mark.parametrize("args, needle", [
    (["--sigma", "0"], "sigma=0.0"),
    (["--sigma", "-0.25"], "sigma=-0.25"),
    (["--alpha", "0"], "alpha=0.0"),
    (["--alpha", "1.5"], "alpha=1.5"),
    (["--n0", "0"], "n0=0"),
    (["--n", "0"], "n=0"),
    (["--skip", "0"], "skip=0"),
    (["--max", "361"], "beyond the split's 360 images"),
    (["--indices", "3,400"], "indices=[400]"),
    (["--precision", "fp8"], "precision='fp8'"),
    (["--dataset", "cifar10", "--set", "same_classes=true"], "data.path"),
    (["--dataset", "cifar10"], "was trained on digits, whose classes are not cifar10's"),
    (["--set", "smoothing.nosuch=1"], "smoothing.nosuch"),
    (["--sigma", "abc"], "expected a value of type float"),
    (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
])
def test_bad_certify_input_is_one_line(capsys, model, tmp_path, args, needle):
    _fails(capsys, ["certify", "--model", str(model), "--out", str(tmp_path / "out"),
                    "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *args], needle)


def test_bad_models(capsys, tmp_path):
    out = ["--out", str(tmp_path / "out"), "--set", "tracking.enabled=false"]
    _fails(capsys, ["certify", "--model", str(make_model(tmp_path / "m7.pt", num_classes=7)), *out],
           "has 7 classes but dataset digits has 10")
    _fails(capsys, ["certify", "--model", str(make_model(tmp_path / "enc.pt", stage="encoder")), *out], "certification needs a classifier")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _fails(capsys, ["certify", "--model", str(tmp_path / "junk.pt"), *out], "is not a model file")
    _fails(capsys, ["predict", "--model", "no-such-model", *out], "model='no-such-model'")


def test_analyze_bad_input(capsys, tmp_path):
    _fails(capsys, ["analyze", str(tmp_path / "missing.tsv")], "no such file")
    (tmp_path / "x.tsv").write_text("a\tb\n")
    _fails(capsys, ["analyze", str(tmp_path / "x.tsv")], "missing columns")


def test_image_list_follows_cohen_skip_and_max():
    assert select_indices(100, SmoothingConfig(skip=20)) == [0, 20, 40, 60, 80]
    assert select_indices(100, SmoothingConfig(skip=20, max=60)) == [0, 20, 40]
    assert select_indices(100, SmoothingConfig(indices=(5, 3))) == [5, 3]
    with pytest.raises(ConfigError, match="max=101"):
        select_indices(100, SmoothingConfig(max=101))


def test_prepare_resolves_the_protocol_and_warns_on_another_sigma(tmp_path):
    path = make_model(tmp_path / "model.pt", sigma=0.25)
    cfg = certify_job.config_from_args([f"model={path}", f"out_dir={tmp_path}", "tracking.enabled=false",
                                        "smoothing.sigma=0.5", "smoothing.skip=4", "smoothing.n=500"])
    p = certify_job.prepare(cfg)
    assert p.protocol["dataset"] == "digits" and p.protocol["num_images"] == 90 and p.protocol["sigma"] == 0.5
    assert p.images.shape == (90, 3, 8, 8) and str(p.images.dtype) == "torch.uint8"
    assert p.name.startswith("certify-digits-test-") and "sigma-0_50-n500-skip4" in p.name
    assert any("trained with noise sigma=0.25" in w and "sigma=0.5" in w for w in p.warnings)
    cfg = certify_job.config_from_args([f"model={path}", f"out_dir={tmp_path}", "tracking.enabled=false", "smoothing.sigma=0.25"])
    assert certify_job.prepare(cfg).warnings == []



def test_settings_where_every_image_abstains_are_said_before_any_draw(tmp_path):
    """Warned in prepare (before Ray), one line; the settings just inside are not warned about. The
    fixed protocol's bound alpha^(1/n) passes 1/2 at n = 10 for alpha = 0.001 (2^-10 < 0.001); a
    sequential job's radii beyond its cap are refused at validation."""
    from rayrcm.certify.protocol import reach_warnings
    from rayrcm.certify.stats import max_certifiable_radius

    path = make_model(tmp_path / "model.pt", sigma=0.25)
    cfg = certify_job.config_from_args([f"model={path}", f"out_dir={tmp_path}", "tracking.enabled=false",
                                        "smoothing.skip=30", "smoothing.n=9", "smoothing.alpha=0.001"])
    warned = [w for w in certify_job.prepare(cfg).warnings if "every image abstains" in w]
    assert warned == ["with smoothing.n=9 and alpha=0.001 every image abstains: even 9 successes in 9 draws do not "
                      "bound p_A above 1/2 (that takes n >= 10 at this alpha); raise smoothing.n or alpha"]
    assert max_certifiable_radius(9, 0.001, 0.25) == 0.0 < max_certifiable_radius(10, 0.001, 0.25)
    assert reach_warnings("certify", replace(cfg.smoothing, n=10, sampling="fixed", radii=())) == []
    assert reach_warnings("certify", replace(cfg.smoothing, n=9, sampling="iss")) == warned
    with pytest.raises(ConfigError, match="beyond what n=1000 draws can certify"):
        certify_job.prepare(replace(cfg, smoothing=replace(cfg.smoothing, n=1000, sampling="sequential", radii=(0.25, 0.75))))
    assert reach_warnings("predict", replace(cfg.smoothing, n=5)) == []


def _plugin_model(tmp_path, kind):
    """A classifier file of an export kind only ``plugin.py`` registers."""
    import torch

    blob = torch.load(make_model(tmp_path / "base.pt"), weights_only=True)
    blob["meta"]["export"] = kind
    torch.save(blob, tmp_path / "plugged.pt")
    plugin = tmp_path / f"{kind}.py"
    plugin.write_text("from rayrcm.models.export import EXPORTS, ExportKind\n"
                      f"EXPORTS.register({kind!r})(ExportKind(lambda meta: EXPORTS.get('classifier').build(meta), True))\n")
    return tmp_path / "plugged.pt", plugin


def test_plugin_flag_maps_to_plugins_and_prepare_loads_them(capsys, tmp_path):
    from rayrcm.cli import _parser, certify_config

    model, plugin = _plugin_model(tmp_path, "cli_plugged_kind")
    out = ["--out", str(tmp_path / "out"), "--set", "tracking.enabled=false"]
    _fails(capsys, ["certify", "--model", str(model), *out], "load the plugin that registers it (--plugin)")
    args = _parser().parse_args(["predict", "--model", str(model), "--plugin", str(plugin), "--plugin", "json", *out])
    cfg = certify_config(args)
    assert cfg.plugins == (str(plugin), "json") and cfg.mode == "predict"
    p = certify_job.prepare(cfg)
    assert "cli_plugged_kind" in sys.modules and p.meta["export"] == "cli_plugged_kind"
    assert "plugins" not in p.protocol, "plugins do not change results"
    _fails(capsys, ["certify", "--model", str(model), "--plugin", "no_such_plugin_module", *out], "plugins='no_such_plugin_module'")


def _cifar_c(root, n=20):
    """A CIFAR-10-C-format folder: contrast.npy with severity s's block a constant image of value 40 s."""
    import numpy as np

    root.mkdir(parents=True)
    images = np.concatenate([np.full((n, 32, 32, 3), 40 * s, np.uint8) for s in range(1, 6)])
    np.save(root / "contrast.npy", images)
    np.save(root / "labels.npy", np.tile(np.arange(n) % 10, 5))
    return root


def test_certify_on_a_released_corruption_at_one_severity(capsys, model, tmp_path):
    root = _cifar_c(tmp_path / "CIFAR-10-C")
    base = [f"model={model}", f"out_dir={tmp_path / 'out'}", "tracking.enabled=false", "dataset=cifar10c",
            f"data_path={root}", "corruption=contrast", "smoothing.n=100", "same_classes=true"]
    p = certify_job.prepare(certify_job.config_from_args([*base, "severity=3"]))
    assert len(p.indices) == 20 and bool((p.images == 120).all()), "severity 3's block, resized to the model's 8 px"
    assert p.labels.tolist() == [i % 10 for i in range(20)]
    assert (p.protocol["dataset"], p.protocol["corruption"], p.protocol["severity"]) == ("cifar10c", "contrast", 3)
    assert "-cifar10c-contrast-3-" in p.name
    p.out.mkdir(parents=True)
    (p.out / "protocol.json").write_text(json.dumps(p.protocol))
    from rayrcm.result_parts import write_part

    write_part(p.out / "rows", [{"idx": 0, "label": 0, "predict": 0, "radius": 0.1, "correct": 1, "time": 0.1}])
    with pytest.raises(ConfigError, match="severity 3 != 4"):  # the same name, another severity
        certify_job.prepare(certify_job.config_from_args([*base, "severity=4", f"name={p.name}"]))
    out = ["--out", str(tmp_path / "out"), "--set", "tracking.enabled=false", "--set", "same_classes=true"]
    cli = ["certify", "--model", str(model), "--dataset", "cifar10c", "--data-path", str(root), *out]
    _fails(capsys, [*cli, "--severity", "2"], "corruption=''")
    _fails(capsys, [*cli, "--corruption", "contrast", "--severity", "7"], "severity=7")
    _fails(capsys, [*cli, "--corruption", "fog", "--severity", "2"], "no fog.npy in that folder (found: contrast)")
    _fails(capsys, ["certify", "--model", str(model), "--corruption", "fog", *out], "only with --dataset cifar10c")


@pytest.mark.parametrize("args, needle", [
    (["--sampling", "sequential", "--radii", "0,-0.25"], "must be finite and >= 0"),
    (["--sampling", "sequential", "--radii", "0.5,0.25"], "must be increasing"),
    (["--sampling", "sequential", "--radii", "0,0.25,0.25"], "must be increasing"),
    (["--sampling", "sequential", "--radii", "0,nan"], "radii"),
    (["--sampling", "sequential", "--radii", "0,inf"], "radii"),
    (["--sampling", "sequential", "--radii", "0,0.5,1.0"], "every radius must be < 0.9119"),
    (["--sampling", "sequential", "--max-n", "50"], "positive multiple of block=100"),
    (["--sampling", "sequential", "--max-n", "1050"], "positive multiple of block=100"),
    (["--sampling", "sequential", "--n", "1000", "--max-n", "2000"], "name the same cap"),
    (["--radii", "0,0.25"], "radii are decided by --sampling sequential"),
    (["--sampling", "iss", "--radii", "0,0.25"], "radii are decided by --sampling sequential"),
    (["--sampling", "sequntial"], "did you mean sequential?"),
])
def test_bad_sequential_input_is_one_line(capsys, model, tmp_path, args, needle):
    _fails(capsys, ["certify", "--model", str(model), "--out", str(tmp_path / "out"), "--set", "tracking.enabled=false",
                    *args], needle)


def test_sequential_predict_is_refused(capsys, model, tmp_path):
    _fails(capsys, ["predict", "--model", str(model), "--out", str(tmp_path / "out"), "--set", "tracking.enabled=false",
                    "--set", "smoothing.sampling=sequential"], "sequential sampling is for certify")


def test_another_datasets_classes_are_refused_and_a_resize_or_a_0_255_sigma_is_said(capsys, model, tmp_path):
    """A digits model on CIFAR-10 (same number of classes, other meaning) once printed certified
    accuracy 1.000 without a word: now it is one line before Ray unless the user says the labels
    mean the same; when accepted, the resize to the model's size is a warning, and so is a sigma
    given in 0-255 units."""
    out = ["--out", str(tmp_path / "out"), "--set", "tracking.enabled=false"]
    _fails(capsys, ["certify", "--model", str(model), "--dataset", "cifar10", "--data-path", str(tmp_path), *out],
           "trained on digits, whose classes are not cifar10's")
    root = _cifar_c(tmp_path / "CIFAR-10-C")
    p = certify_job.prepare(certify_job.config_from_args([
        f"model={model}", f"out_dir={tmp_path / 'out'}", "tracking.enabled=false", "dataset=cifar10c", f"data_path={root}",
        "corruption=contrast", "severity=1", "same_classes=true", "smoothing.sigma=64"]))
    assert any("cifar10c images are 32 px and are resized to the model's 8 px" in w for w in p.warnings)
    assert any("sigma is in [0, 1] pixel units" in w and "64/255 = 0.251" in w for w in p.warnings)
    same = certify_job.prepare(certify_job.config_from_args([f"model={model}", f"out_dir={tmp_path / 'out'}",
                                                            "tracking.enabled=false", "smoothing.n=100"]))
    assert not any("resized" in w for w in same.warnings)  # the model's own dataset at its own size


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    from rayrcm import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["certify", "--model", "m.pt"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 130 and err == "rayrcm: interrupted; rerun the same command to resume"
