"""Bad numbers and names are refused with one line: non-finite config values, a loss that becomes
NaN, certification rows with non-finite numbers, unreadable or empty results, bad radii, and
certification job names that are not one folder name."""

from __future__ import annotations

import math
import pickle
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from rayrcm.analysis import read_results, write_cohen_tsv
from rayrcm.certify import CertifyConfig, SmoothingConfig, validate_certify
from rayrcm.cli import main
from rayrcm.config import (
    ExperimentConfig,
    OptimConfig,
    apply_overrides,
    from_dict,
    load_recipe,
    validate,
)
from rayrcm.errors import ConfigError
from rayrcm.objectives import method_config_class
from rayrcm.objectives.base import LossOutput
from rayrcm.orchestration.analyze import analyze
from rayrcm.orchestration.certify_job import config_from_args
from rayrcm.orchestration.sweep_space import parse_spec
from rayrcm.overrides import coerce
from rayrcm.result_parts import NonFiniteResult, write_part
from rayrcm.train.loop import Loop, NonFiniteLoss, run_steps

FINITE = "must be a finite number"

# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("item", ["method.sigma=nan", "method.sigma=inf", "optim.lr=inf", "optim.lr=-inf",
                                  "optim.lr=NaN", "train.eval_sigmas=0.25,nan", "optim.milestone_epochs=1,inf"])
def test_non_finite_overrides_are_refused(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=FINITE) as err:
        apply_overrides(ExperimentConfig(), ["method.name=gaussian", item])
    assert str(err.value).startswith(f"{key}=") and "\n" not in str(err.value)


def test_non_finite_values_of_a_yaml_recipe_are_refused(tmp_path):
    for text in ("optim:\n  lr: .nan\n", "method:\n  name: gaussian\n  sigma: .inf\n", "train:\n  eval_sigmas: [0.25, .inf]\n"):
        path = tmp_path / "r.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=FINITE):
            load_recipe(path)


def test_a_bool_where_a_number_belongs_is_refused():
    with pytest.raises(ConfigError, match="not true/false") as err:
        from_dict({"optim": {"lr": True}})
    assert str(err.value).startswith("optim.lr=True")
    with pytest.raises(ConfigError, match="not true/false"):
        from_dict({"train": {"steps": False}})
    assert coerce("k", 3, float) == 3.0 and isinstance(coerce("k", 3, float), float)  # ints still widen


def test_validate_walks_every_float_of_a_python_built_config():
    base = ExperimentConfig()
    bad = [replace(base, optim=OptimConfig(lr=math.nan)),
           replace(base, method=method_config_class("gaussian")(sigma=math.inf)),
           replace(base, train=replace(base.train, eval_sigmas=(0.25, math.nan)))]
    for cfg, key in zip(bad, ("optim.lr", "method.sigma", "train.eval_sigmas")):
        with pytest.raises(ConfigError, match=FINITE) as err:
            validate(cfg, check_paths=False)
        assert str(err.value).startswith(f"{key}=")


def test_sweep_ranges_must_be_finite():
    for spec in ("uniform:0,inf", "loguniform:1e-4,inf", "uniform:nan,1"):
        with pytest.raises(ConfigError, match="finite"):
            parse_spec("optim.lr", spec)


# ----------------------------------------------------------------------------- certification config


@pytest.mark.parametrize("item", ["smoothing.sigma=inf", "smoothing.sigma=nan", "smoothing.alpha=nan",
                                  "compute.progress_every_s=inf"])
def test_non_finite_certify_overrides_are_refused(item):
    with pytest.raises(ConfigError, match=FINITE):
        config_from_args(["model=m.pt", item])


def test_validate_certify_refuses_a_python_built_non_finite_sigma():
    for sigma in (math.inf, math.nan):
        with pytest.raises(ConfigError):
            validate_certify(CertifyConfig(model="m.pt", smoothing=SmoothingConfig(sigma=sigma)))


def test_certify_sigma_inf_on_the_command_line_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["certify", "--model", "m.pt", "--sigma", "inf"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1 and FINITE in err[0]


@pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", "/abs", "a b", "ü"])
def test_certify_job_name_is_one_folder_name(name):
    with pytest.raises(ConfigError, match="one path component") as err:
        validate_certify(CertifyConfig(model="m.pt", name=name))
    assert str(err.value).startswith("name=")


def test_certify_job_name_accepts_letters_digits_dash_underscore_dot():
    assert validate_certify(CertifyConfig(model="m.pt", name="sigma_0.25-run.2")).name == "sigma_0.25-run.2"


# ----------------------------------------------------------------------------- certification rows


def _record(**kw):
    rec = dict(idx=3, label=1, time=0.5, device="cpu", predict=1, radius=0.4, top_class=1, n_a=90, n=100,
               p_a_lower=0.9, counts_selection=[0, 10], counts_estimation=[10, 90], correct=1)
    rec.update(kw)
    return rec


@pytest.mark.parametrize("bad", [dict(radius=math.inf), dict(radius=math.nan), dict(p_a_lower=math.nan),
                                 dict(radius=-0.1), dict(radius=np.float64("inf"))])
def test_a_row_with_a_non_finite_number_is_never_written(tmp_path, bad):
    with pytest.raises(NonFiniteResult, match="image 3"):
        write_part(tmp_path / "rows", [_record(), _record(idx=3, **bad)])
    assert not list((tmp_path / "rows").glob("*")) if (tmp_path / "rows").exists() else True


def test_cohen_tsv_writer_refuses_an_infinite_radius(tmp_path):
    df = pd.DataFrame([_record(radius=math.inf)])
    with pytest.raises(ValueError, match="image 3"):
        write_cohen_tsv(df, tmp_path / "out.tsv")
    assert not (tmp_path / "out.tsv").exists()


# ----------------------------------------------------------------------------- analyze

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
GOOD = "0\t3\t3\t0.5\t1\t0:00:01.500000\n"


def _tsv(tmp_path, *lines, name="r.tsv"):
    path = tmp_path / name
    path.write_text(HEADER + "".join(lines))
    return path


@pytest.mark.parametrize("line, fragment", [
    ("1\t3\t3\tnan\t1\t0:00:01\n", "line 3: radius is nan"),
    ("1\t3\t3\tinf\t1\t0:00:01\n", "line 3: radius is inf"),
    ("1\t3\t3\t-1\t1\t0:00:01\n", "line 3: radius is -1.0"),
    ("garbage\n", "line 3: expected 6 tab-separated fields"),
    ("1\t3\t3\t0.5\t1\tgarbage\n", "line 3: time is 'garbage'"),
    ("1\t3\tx\t0.5\t1\t0:00:01\n", "line 3: predict is 'x'"),
])
def test_a_bad_tsv_line_is_named_by_its_number(tmp_path, line, fragment):
    path = _tsv(tmp_path, GOOD, line)
    with pytest.raises(ValueError, match=fragment):
        read_results(path)
    with pytest.raises(ConfigError, match=fragment) as err:
        analyze([str(path)], log=False, out=tmp_path / "a")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "a").exists()


def test_a_parquet_row_with_a_nan_radius_is_refused(tmp_path):
    rows = tmp_path / "job" / "rows"
    rows.mkdir(parents=True)
    pd.DataFrame([_record(), _record(idx=7, radius=math.nan)]).to_parquet(rows / "part-1.parquet", index=False)
    with pytest.raises(ConfigError, match=r"row 2 \(image 7\): radius is nan"):
        analyze([str(tmp_path / "job")], log=False)


def test_analyze_on_an_empty_folder_or_a_header_only_file_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no certification rows") as err:
        analyze([str(tmp_path / "empty")], log=False)
    assert str(tmp_path / "empty") in str(err.value)
    with pytest.raises(ConfigError, match="has no certification rows"):
        analyze([str(_tsv(tmp_path))], log=False, out=tmp_path / "a")
    assert not (tmp_path / "empty" / "analysis").exists()


def test_analyze_good_rows_still_work(tmp_path):
    table, files = analyze([str(_tsv(tmp_path, GOOD, "5\t2\t-1\t0.000000\t0\t1 day, 1:00:00\n"))], radii=[0, 0.5],
                           log=False, out=tmp_path / "a")
    assert table["images"].tolist() == [2] and table["0.50"].tolist() == [0.5] and all(f.exists() for f in files)


@pytest.mark.parametrize("radii", ["-1,nan", "0,inf", "nan", "-0.5"])
def test_bad_radii_on_the_command_line_exit_2_with_one_line(tmp_path, capsys, radii):
    path = _tsv(tmp_path, GOOD)
    with pytest.raises(SystemExit) as ex:
        main(["analyze", str(path), f"--radii={radii}", "--no-log", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1 and err[0].startswith("rayrcm: error: radii=")
    assert not (tmp_path / "a").exists()


def test_analyze_on_an_empty_folder_exits_2_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as ex:
        main(["analyze", str(tmp_path), "--no-log"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1 and str(tmp_path) in err[0]


# ----------------------------------------------------------------------------- training


class _Objective(nn.Module):
    """A linear model whose loss turns NaN from step ``bad_from`` on."""

    def __init__(self, bad_from: int) -> None:
        super().__init__()
        self.lin, self.bad_from = nn.Linear(2, 1), bad_from

    def forward(self, views, target, step):
        loss = self.lin(views[0]).pow(2).mean()
        return LossOutput(loss * math.nan if step >= self.bad_from else loss)

    def on_step_end(self, step):
        pass


class _Schedule:
    def step_update(self, step):
        pass


def test_a_non_finite_loss_stops_training_before_the_update_and_any_checkpoint():
    obj = _Objective(bad_from=3)
    loop = Loop(obj, obj, torch.optim.SGD(obj.parameters(), lr=0.1), _Schedule(), torch.device("cpu"))
    batches = iter(lambda: ([torch.ones(4, 2)], torch.zeros(4)), None)
    checkpoints, params = [], None

    def on_checkpoint(step, metrics):
        checkpoints.append(step)

    def before(step):
        nonlocal params
        params = [p.detach().clone() for p in obj.parameters()]

    with pytest.raises(NonFiniteLoss, match=r"^loss is nan at step 3: training stopped; no checkpoint or model") as err:
        run_steps(loop, batches, start=0, total=10, seed=0, rank=0, batch_size=4, log_every=1, checkpoint_every=2,
                  on_log=lambda s, m: None, on_checkpoint=on_checkpoint, before_step=before)
    assert err.value.step == 3 and math.isnan(err.value.value) and "\n" not in str(err.value)
    assert checkpoints == [2]  # none after the NaN step
    assert all(torch.equal(a, b) and torch.isfinite(b).all() for a, b in zip(params, obj.parameters()))  # no NaN update
    again = pickle.loads(pickle.dumps(err.value))
    assert isinstance(again, NonFiniteLoss) and again.step == 3 and str(again) == str(err.value)
