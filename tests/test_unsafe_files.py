"""Files from a shared folder run no code and stay private: CIFAR batches and meta files are read
by a restricted unpickler (the training and the certification paths), a missing or truncated one
is one line naming it, job names stay inside the results folder, the tracking server's files are 0600."""

from __future__ import annotations

import os
import pickle
import stat

import numpy as np
import pytest
import torch
from helpers import make_model

from rayrcm.config import DataConfig, ExperimentConfig, apply_overrides, validate
from rayrcm.data import build_splits
from rayrcm.data.safe_pickle import load_data_pickle
from rayrcm.errors import ConfigError

CIFAR10 = ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "batches.meta",
           "label_names", "labels", 10)
CIFAR100 = ("cifar-100-python", ["train", "test"], "meta", "fine_label_names", "fine_labels", 100)


class _Touch:
    """Unpickling this creates ``marker`` (what a crafted file could do with any callable)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Exec:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _write_cifar(root, layout=CIFAR10, n=20, protocol=pickle.DEFAULT_PROTOCOL, bytes_keys=False):
    folder_name, batches, meta, meta_key, label_key, classes = layout
    folder = root / folder_name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    for name in batches:
        batch = {key("data"): rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key(label_key): [int(v) for v in rng.integers(0, classes, n)], key("filenames"): ["f"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    (folder / meta).write_bytes(pickle.dumps({key(meta_key): [f"c{i}" for i in range(classes)]}, protocol=protocol))
    return folder


def _one_line(err: ConfigError, needle: str) -> None:
    msg = str(err)
    assert len(msg.splitlines()) == 1 and needle in msg, msg


@pytest.mark.parametrize("bad_file", ["batches.meta", "data_batch_1", "test_batch"])
@pytest.mark.parametrize("payload", [_Touch, _Exec])
def test_crafted_cifar_file_runs_no_code_when_training(tmp_path, bad_file, payload):
    folder = _write_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    with open(folder / bad_file, "wb") as f:
        pickle.dump({"label_names": [payload(marker)], "data": payload(marker)}, f)
    with pytest.raises(ConfigError) as err:
        build_splits(DataConfig(name="cifar10", path=str(tmp_path / "data"), image_size=32, val_fraction=0.1))
    assert not marker.exists()
    _one_line(err.value, str(folder / bad_file))
    assert "refused global" in str(err.value)


@pytest.mark.parametrize("bad_file", ["batches.meta", "test_batch"])
def test_crafted_cifar_file_runs_no_code_when_certifying(tmp_path, capsys, bad_file):
    from rayrcm.cli import main
    from rayrcm.orchestration import certify_job

    folder = _write_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    with open(folder / bad_file, "wb") as f:
        pickle.dump({"label_names": _Exec(marker)}, f)
    model = make_model(tmp_path / "model.pt")
    cfg = certify_job.config_from_args([f"model={model}", f"out_dir={tmp_path / 'out'}", "tracking.enabled=false",
                                        "dataset=cifar10", f"data_path={tmp_path / 'data'}", "same_classes=true"])
    with pytest.raises(ConfigError) as err:
        certify_job.prepare(cfg)
    assert not marker.exists()
    _one_line(err.value, str(folder / bad_file))
    with pytest.raises(SystemExit) as exit_:
        main(["certify", "--model", str(model), "--out", str(tmp_path / "out"), "--dataset", "cifar10",
              "--data-path", str(tmp_path / "data"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
              "--set", "same_classes=true"])
    out = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(out.splitlines()) == 1 and str(folder / bad_file) in out, out
    assert not marker.exists()


def _ref_meta(self) -> None:  # torchvision's _load_meta without the md5 check of the official archive
    with open(f"{self.root}/{self.base_folder}/{self.meta['filename']}", "rb") as f:
        self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]  # our own test file


@pytest.mark.parametrize("layout", [CIFAR10, CIFAR100], ids=["cifar10", "cifar100"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_reader_matches_torchvision(tmp_path, layout, protocol):
    """Same arrays, labels and class order as torchvision's reader, for numpy arrays pickled with
    any protocol (and str or bytes keys)."""
    from torchvision import datasets

    _write_cifar(tmp_path / "ours", layout, protocol=protocol, bytes_keys=protocol == 2)
    _write_cifar(tmp_path / "ref", layout, protocol=protocol)  # torchvision reads str keys only
    classes = layout[-1]
    s = build_splits(DataConfig(name=f"cifar{classes}", path=str(tmp_path / "ours"), image_size=32, val_fraction=0.0))
    base = datasets.CIFAR10 if classes == 10 else datasets.CIFAR100
    ref_train, ref_test = (type("R", (base,), {"_check_integrity": lambda self: True, "_load_meta": _ref_meta})(str(tmp_path / "ref"), train=t)
                           for t in (True, False))
    for ours, ref in ((s.train.dataset, ref_train), (s.test, ref_test)):
        assert ours.data.shape == ref.data.shape and ours.data.dtype == np.uint8
        assert np.array_equal(ours.data, ref.data) and ours.targets == ref.targets and ours.classes == ref.classes
        img, label = ours[3]
        ref_img, ref_label = ref[3]
        assert np.array_equal(np.asarray(img), np.asarray(ref_img)) and label == ref_label


@pytest.mark.parametrize("layout", [CIFAR10, CIFAR100], ids=["cifar10", "cifar100"])
def test_missing_or_truncated_cifar_file_is_one_line_naming_it(tmp_path, layout):
    folder = _write_cifar(tmp_path, layout)
    name = f"cifar{layout[-1]}"
    last = folder / layout[1][-1]
    last.rename(tmp_path / "moved")
    with pytest.raises(ConfigError) as err:
        build_splits(DataConfig(name=name, path=str(tmp_path), image_size=32, val_fraction=0.0))
    _one_line(err.value, str(last))
    assert "missing" in str(err.value)
    data = (tmp_path / "moved").read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as err:
        build_splits(DataConfig(name=name, path=str(tmp_path), image_size=32, val_fraction=0.0))
    _one_line(err.value, str(last))
    meta = folder / layout[2]
    meta.write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        build_splits(DataConfig(name=name, path=str(tmp_path), image_size=32, val_fraction=0.0))
    _one_line(err.value, str(meta))


def test_restricted_unpickler_admits_plain_data_and_numpy_only(tmp_path):
    f = tmp_path / "x"
    plain = {"a": [1, 2.5, "s", b"b", None, True, (3,)], "arr": np.arange(6, dtype=np.int16).reshape(2, 3),
             "scalar": np.int64(7)}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        f.write_bytes(pickle.dumps(plain, protocol=protocol))
        got = load_data_pickle(f)
        assert got["a"] == plain["a"] and np.array_equal(got["arr"], plain["arr"]) and got["scalar"] == 7
    import collections

    for evil in (collections.OrderedDict(a=1), os.getcwd, np.load, _Touch(tmp_path / "m")):
        f.write_bytes(pickle.dumps({"x": evil}))
        with pytest.raises(ConfigError) as err:
            load_data_pickle(f)
        _one_line(err.value, str(f))
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- job names


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "/abs", "x\n", "a b", "é"])
def test_train_name_must_be_one_path_component(name):
    with pytest.raises(ConfigError) as err:
        validate(apply_overrides(ExperimentConfig(), [f"train.name={name}"]), check_paths=False)
    assert str(err.value).startswith("train.name=") and len(str(err.value).splitlines()) == 1
    assert "must be one path component" in str(err.value)


@pytest.mark.parametrize("name", ["run-1", "a.b_c", "..x", "x.."])
def test_plain_train_names_and_the_default_are_accepted(name):
    from rayrcm.sections import check_train

    cfg = validate(apply_overrides(ExperimentConfig(), [f"train.name={name}"]), check_paths=False)
    assert cfg.job_name == name
    default = ExperimentConfig()
    check_train(type(default.train)(name=default.job_name))


# ----------------------------------------------------------------------------- tracking server files


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def usual_umask():
    old = os.umask(0o022)  # new files would be 0644
    yield
    os.umask(old)


def test_tracking_server_files_are_private(tmp_path, monkeypatch, usual_umask):
    from rayrcm.orchestration import mlflow_server

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-long-enough-password")
    state = tmp_path / "state"
    state.mkdir()
    (state / "basic_auth.db").write_bytes(b"")
    (state / "basic_auth.db").chmod(0o644)  # left 0644 by an older version
    spec = mlflow_server.ServerSpec(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"),
                                    state_dir=str(state))

    class FakePopen:
        pid = 4242

        def __init__(self, cmd, **kw) -> None:
            self.cmd = cmd

    monkeypatch.setattr(mlflow_server, "subprocess", type("FakeSubprocess", (), {"Popen": FakePopen, "STDOUT": -2,
                                                                                "DEVNULL": -3}))
    monkeypatch.setattr(mlflow_server, "wait_healthy", lambda *a, **k: None)
    log = tmp_path / "logs" / "server.log"
    proc = mlflow_server.start(spec, log)
    assert "basic-auth" in proc.cmd
    assert _mode(state) == 0o700
    for f in ("basic_auth.db", "basic_auth.ini", "flask_secret_key"):
        assert _mode(state / f) == 0o600, f
    assert _mode(log) == 0o600
    log.chmod(0o644)
    mlflow_server.start(spec, log)
    assert _mode(log) == 0o600


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["code", "text", "empty", "truncated"])
def test_a_model_file_that_is_not_weights_is_one_line_and_runs_nothing(kind, tmp_path):
    """``--model`` and ``model.init_from`` files: a pickle naming code, a text file, an empty and a
    truncated file are each one line naming the file; the code never runs."""
    from rayrcm.models import build_encoder
    from rayrcm.models.classifier import load_encoder_file
    from rayrcm.models.export import build_from_file
    from rayrcm.sections import ModelConfig

    marker, path = tmp_path / "MARKER", tmp_path / "model.pt"
    if kind == "code":
        torch.save({"model": _RunsCode(marker), "meta": {}}, path)
    elif kind == "text":
        path.write_text("data:\n  name: digits\n")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"model": {"w": torch.zeros(100)}, "meta": {}}, path)
        path.write_bytes(path.read_bytes()[:60])
    for load, key in ((lambda: build_from_file(path), "model"),
                      (lambda: load_encoder_file(build_encoder(ModelConfig(), 16), path, "vit_digits"), "model.init_from")):
        with pytest.raises(ConfigError) as err:
            load()
        line = str(err.value)
        assert line.startswith(f"{key}='{path}' is invalid") and "\n" not in line
    assert not marker.exists()
