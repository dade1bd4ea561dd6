"""``rayrcm export --format onnx``: the graph a registered classifier becomes computes what PyTorch does.

A trained digits classifier goes through ``torch.onnx`` and onnxruntime: on the real test images the
logits agree to 1e-4 and so do the predictions (and so the accuracy), at several batch sizes (the
batch axis is dynamic), with the normalisation inside the graph (the input is [0, 1] pixels). The
command resolves ``models:/name@alias`` from a real MLflow registry, and a graph that differs from
its model is caught by the check that guards every write.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from helpers import fails_in_one_line, trained_digits_model  # noqa: E402


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from rayrcm.data.datasets import digits_tensors

    path = trained_digits_model(tmp_path_factory.mktemp("onnx") / "model.pt")
    x, y = digits_tensors(8)
    return path, x.float()[-300:] / 255, y[-300:]


def test_onnx_logits_equal_pytorch_on_real_digits_at_any_batch_size(digits, tmp_path):
    import onnx

    from rayrcm.models import onnx_export as ox
    from rayrcm.models.export import build_from_file

    path, x, y = digits
    model, meta = build_from_file(path)
    dest = tmp_path / "digits.onnx"
    result = ox.export_checked(model, meta, dest, ox.check_images(meta, 16), kind="classifier", predicts_classes=True)
    assert dest.is_file() and result.passed() and result.images == 16
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file is gone
    with torch.no_grad():
        ref = model.eval()(x)
    for lo, hi in ((0, 1), (1, 38), (38, 300)):  # batch sizes 1, 37 and 262 through one graph
        got = torch.from_numpy(ox.run_onnx(dest, x[lo:hi]))
        assert got.shape == ref[lo:hi].shape
        torch.testing.assert_close(got, ref[lo:hi], atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(1), ref[lo:hi].argmax(1))
    acc = (torch.from_numpy(ox.run_onnx(dest, x)).argmax(1) == y).float().mean()
    assert acc > 0.7  # a trained model: the check is not on a constant function
    graph = onnx.load(str(dest))
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["rayrcm.export"] == "classifier" and json.loads(props["rayrcm.meta"])["num_classes"] == 10
    assert [i.name for i in graph.graph.input] == ["images"] and [o.name for o in graph.graph.output] == ["logits"]
    # the normalisation is in the graph: feeding the normalised image instead changes the logits
    shifted = torch.from_numpy(ox.run_onnx(dest, x[:8] * 2 - 1))
    assert not torch.allclose(shifted, ref[:8], atol=1e-2)


def test_the_check_catches_a_graph_that_differs_from_its_model(digits, tmp_path):
    from rayrcm.models import onnx_export as ox
    from rayrcm.models.export import build_from_file

    path, x, _ = digits
    model, meta = build_from_file(path)
    dest = ox.export_onnx(model, meta, tmp_path / "m.onnx", kind="classifier", predicts_classes=True)
    assert ox.check_onnx(dest, model, x[:32]).passed()
    other, _ = build_from_file(path)
    with torch.no_grad():
        other.head.weight.mul_(1.01)  # 1% off in one layer
    bad = ox.check_onnx(dest, other, x[:32])
    assert not bad.passed() and bad.max_abs_diff > 1e-3


def test_export_command_resolves_a_registered_alias(digits, tmp_path, capsys, monkeypatch):
    import onnx

    from rayrcm.cli import main
    from rayrcm.orchestration import tracking

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_job_run(uri, "onnx", "job", {})
    tracking.log_model(uri, run_id, digits[0], register_as="onnx-digits", alias="best")
    with pytest.raises(SystemExit) as exit_:
        main(["export", "models:/onnx-digits@best", "--format", "onnx", "--tracking-uri", uri, "--check", "8"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    written = tmp_path / "onnx-digits-best.onnx"  # the default name: <name>-<alias>
    assert written.is_file() and f"wrote {written.name}" in out and "onnxruntime vs PyTorch on 8 images" in out
    assert not [line for line in out.splitlines() if line and not line.startswith("[rayrcm]")]  # no exporter chatter
    assert json.loads({p.key: p.value for p in onnx.load(str(written)).metadata_props}["rayrcm.meta"])["image_size"] == 8


def test_an_encoder_exports_its_features(tmp_path):
    import onnx

    from rayrcm.config import ExperimentConfig, apply_overrides, to_dict
    from rayrcm.models.encoders import build_encoder
    from rayrcm.orchestration.export_model import export_model
    from rayrcm.train.checkpoint import model_meta, save_model

    cfg = apply_overrides(ExperimentConfig(), ["data.image_size=8", "model.patch_size=4"])
    (tmp_path / "enc").mkdir()
    save_model(tmp_path / "enc" / "model.pt", build_encoder(cfg.model, 8), model_meta(to_dict(cfg), "encoder", 10))
    out = export_model(str(tmp_path / "enc"), check=4, out=tmp_path / "enc.onnx")
    assert out.name == "enc.onnx"
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["features"]


def test_bad_export_input_is_one_line(digits, capsys):
    fails_in_one_line(capsys, ["export", str(digits[0]), "--format", "tflite"], "choose one of: onnx")
    fails_in_one_line(capsys, ["export", str(digits[0]), "--format", "onx"], "did you mean onnx?")
    fails_in_one_line(capsys, ["export", str(digits[0]), "--check", "1"], "at least 2 images")
    fails_in_one_line(capsys, ["export", "no/such/model.pt"], "not a file, a run id")
