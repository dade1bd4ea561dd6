"""First-day problems: overrides that do nothing (a key in steps shadowed by its twin in epochs; a
shorter run that is all warm-up) and per-dataset defaults (the native image size; the image size
in the certification protocol)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from helpers import make_model

from rayrcm.cli import main
from rayrcm.config import (
    ExperimentConfig,
    apply_overrides,
    load_recipe,
    resolve_epochs,
    to_dict,
    validate,
)
from rayrcm.data import DATASETS, DatasetSpec
from rayrcm.errors import ConfigError
from rayrcm.sections import DataConfig


def _yaml(tmp_path, text: str, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


EPOCH_RECIPE = """
data: {batch_size: 10}
train: {epochs: 30, checkpoint_epochs: 5}
optim: {warmup_epochs: 5, schedule_epochs: 30, milestone_epochs: [10, 20]}
"""


# ----------------------------------------------------------------------------- A: shadowed keys


def test_steps_override_with_epochs_in_effect_is_refused_in_one_line(tmp_path, capsys):
    recipe = _yaml(tmp_path, "train: {epochs: 3}\n")
    with pytest.raises(ConfigError) as err:
        apply_overrides(load_recipe(recipe), ["train.steps=20"])
    assert str(err.value) == ("train.steps=20 is invalid: train.epochs=3 sets the length; set train.epochs=0 to use "
                              "train.steps, or change train.epochs")
    with pytest.raises(SystemExit) as exit_:
        main(["config", str(recipe), "--set", "train.steps=20"])
    out = capsys.readouterr()
    assert exit_.value.code == 2 and out.out == ""
    assert out.err.strip().splitlines() == [f"rayrcm: error: {err.value}"]


@pytest.mark.parametrize("override, by", [
    ("train.checkpoint_every=3", "train.checkpoint_epochs=5"),
    ("optim.warmup_steps=4", "optim.warmup_epochs=5"),
    ("optim.schedule_steps=100", "optim.schedule_epochs=30"),
    ("optim.milestones=50", "optim.milestone_epochs=10,20"),
])
def test_every_step_key_shadowed_by_its_epoch_twin_is_refused(tmp_path, override, by):
    base = load_recipe(_yaml(tmp_path, EPOCH_RECIPE))
    with pytest.raises(ConfigError) as err:
        apply_overrides(base, [override])
    key = override.split("=")[0]
    assert err.value.key == key and str(err.value).count("\n") == 0
    assert f"{by} sets" in err.value.allowed and f"to use {key}" in err.value.allowed


def test_a_rescale_notice_does_not_add_a_line_to_an_error(tmp_path, capsys):
    recipe = _yaml(tmp_path, "train: {epochs: 30}\noptim: {schedule_epochs: 30, warmup_epochs: 5}\n")
    with pytest.raises(SystemExit):
        main(["config", str(recipe), "--set", "train.epochs=2", "--set", "optim.lr=-1"])
    assert capsys.readouterr().err.strip().splitlines() == ["rayrcm: error: optim.lr=-1.0 is invalid: must be > 0"]
    main_out = _run_config(recipe, capsys, "train.epochs=2")
    assert main_out.err.startswith("[rayrcm] train.epochs 30 -> 2: optim.schedule_epochs 30 -> 2")
    assert "schedule_epochs: 2.0" in main_out.out  # the printed YAML stays clean


def _run_config(recipe, capsys, *overrides: str):
    with pytest.raises(SystemExit) as exit_:
        main(["config", str(recipe), *[f"--set={o}" for o in overrides]])
    assert exit_.value.code in (0, None)
    return capsys.readouterr()


def test_switching_the_epoch_twin_off_makes_the_step_key_count(tmp_path):
    base = load_recipe(_yaml(tmp_path, "train: {epochs: 3}\n"))
    cfg = resolve_epochs(validate(apply_overrides(base, ["train.epochs=0", "train.steps=20"])), 1000)
    assert (cfg.train.epochs, cfg.train.steps) == (0, 20)


def test_a_recipe_setting_both_twins_is_refused_unless_the_step_key_is_the_default(tmp_path):
    with pytest.raises(ConfigError, match=r"train.steps=300 is invalid: recipe .* also sets train.epochs=30"):
        load_recipe(_yaml(tmp_path, "train: {epochs: 30, steps: 300}\n"))
    cfg = load_recipe(_yaml(tmp_path, "train: {epochs: 30, steps: 200}\n", "default_steps.yaml"))
    assert cfg.train.epochs == 30


# ----------------------------------------------------------------------------- A: the schedule follows the length


def test_shorter_run_rescales_schedule_and_warmup_so_the_run_is_not_all_warmup(tmp_path, capsys):
    base = load_recipe(_yaml(tmp_path, EPOCH_RECIPE))
    per_epoch = 10  # 100 images, batch 10
    untouched = resolve_epochs(validate(base), 100)
    assert (untouched.train.steps, untouched.optim.warmup_steps, untouched.optim.schedule_steps) == (300, 50, 300)
    capsys.readouterr()
    cfg = apply_overrides(base, ["train.epochs=2"])
    assert capsys.readouterr().err == ""  # said once the config is valid: bad input stays one line
    r = resolve_epochs(validate(cfg), 100)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[rayrcm] train.epochs 30 -> 2: optim.schedule_epochs 30 -> 2, optim.warmup_epochs 5 -> 0.333"]
    validate(cfg)
    assert capsys.readouterr().err == ""  # once
    assert r.train.steps == 2 * per_epoch and r.optim.schedule_steps == r.train.steps
    assert 0 < r.optim.warmup_steps < r.train.steps / 2  # a fraction of the run, as in the recipe (5 of 30)


def test_a_step_schedule_s_milestones_follow_the_length(tmp_path):
    base = load_recipe(_yaml(tmp_path, "train: {epochs: 25}\noptim: {schedule: step, milestone_epochs: [10, 20]}\n"))
    assert apply_overrides(base, ["train.epochs=5"]).optim.milestone_epochs == (2, 4)


def test_steps_recipe_rescales_schedule_steps_and_warmup_steps(tmp_path):
    base = load_recipe(_yaml(tmp_path, "train: {steps: 1000}\noptim: {schedule_steps: 1000, warmup_steps: 100}\n"))
    o = apply_overrides(base, ["train.steps=50"]).optim
    assert (o.schedule_steps, o.warmup_steps) == (50, 5)


def test_a_schedule_that_follows_the_run_keeps_a_fixed_warmup_unless_it_covers_the_run(tmp_path):
    """The ACL authors' fixed 10-epoch warm-up is kept in a shorter run (the fidelity tests need it), but
    never becomes the whole run."""
    base = load_recipe(_yaml(tmp_path, "train: {epochs: 1000}\noptim: {warmup_epochs: 10}\n"))
    assert apply_overrides(base, ["train.epochs=40"]).optim.warmup_epochs == 10
    short = apply_overrides(base, ["train.epochs=5"]).optim
    assert 0 < short.warmup_epochs < 5 and short.schedule_epochs == 0


def test_a_schedule_the_user_sets_is_not_rescaled(tmp_path):
    base = load_recipe(_yaml(tmp_path, EPOCH_RECIPE))
    o = apply_overrides(base, ["train.epochs=2", "optim.schedule_epochs=30"]).optim
    assert (o.schedule_epochs, o.warmup_epochs, o.milestone_epochs) == (30, 5, (10, 20))


def test_without_a_length_override_the_recipe_is_unchanged(tmp_path):
    base = load_recipe(_yaml(tmp_path, EPOCH_RECIPE))
    assert apply_overrides(base, ["optim.lr=2e-4"]).optim == replace(base.optim, lr=2e-4)


# ----------------------------------------------------------------------------- B: native image sizes


@pytest.mark.parametrize("name, size", [("digits", 16), ("cifar10", 32), ("cifar100", 32), ("imagefolder", 224)])
def test_each_dataset_defaults_to_its_native_size(tmp_path, name, size):
    assert DataConfig().image_size == 0  # "the dataset's native size"
    cfg = validate(ExperimentConfig(data=DataConfig(name=name)), check_paths=False)
    assert cfg.data.image_size == size
    recipe = load_recipe(_yaml(tmp_path, f"data: {{name: {name}}}\n"))
    assert validate(recipe, check_paths=False).data.image_size == size
    assert load_recipe(_yaml(tmp_path, f"data: {{name: {name}, image_size: 64}}\n", "set.yaml")).data.image_size == 64


def test_patch_size_is_checked_against_the_resolved_size():
    def cifar(patch: int) -> ExperimentConfig:
        model = replace(ExperimentConfig().model, patch_size=patch)
        return ExperimentConfig(data=DataConfig(name="cifar10"), model=model)

    with pytest.raises(ConfigError, match=r"model.patch_size=5 is invalid: must divide data.image_size=32"):
        validate(cifar(5), check_paths=False)
    cfg = validate(cifar(8), check_paths=False)
    assert to_dict(cfg)["data"]["image_size"] == 32  # what job_config.json and the model file's meta record


def test_switching_the_dataset_moves_a_native_size_to_the_new_one(capsys):
    digits = apply_overrides(ExperimentConfig(), ["data.image_size=16"])
    capsys.readouterr()
    cfg = apply_overrides(digits, ["data.name=cifar10"])
    assert cfg.data.image_size == 32
    validate(cfg, check_paths=False)
    assert "data.image_size 16 -> 32" in capsys.readouterr().err
    assert apply_overrides(digits, ["data.name=cifar10", "data.image_size=16"]).data.image_size == 16
    small = apply_overrides(ExperimentConfig(), ["data.name=imagefolder", "data.image_size=32"])
    assert apply_overrides(small, ["data.name=cifar10"]).data.image_size == 32  # 32 was chosen, not native


def test_a_dataset_without_a_native_size_needs_data_image_size(monkeypatch):
    from rayrcm.data.native import NATIVE_SIZES

    spec = DATASETS.get("digits")
    monkeypatch.setitem(DATASETS._items, "toyset", DatasetSpec("toyset", spec.load, spec.check_path))
    with pytest.raises(ConfigError, match=r"data.image_size=0 is invalid: dataset toyset declares no native size"):
        validate(ExperimentConfig(data=DataConfig(name="toyset")))
    monkeypatch.setitem(NATIVE_SIZES, "toyset", 12)
    assert validate(ExperimentConfig(data=DataConfig(name="toyset"))).data.image_size == 12


# ----------------------------------------------------------------------------- B: the certification protocol


def _certify(tmp_path, model):
    from rayrcm.orchestration import certify_job

    cfg = certify_job.config_from_args([f"model={model}", f"out_dir={tmp_path / 'out'}", "tracking.enabled=false",
                                        "name=job", "smoothing.max=4", "smoothing.n=100", "smoothing.n0=10",
                                        "smoothing.chunk=100"])
    return certify_job, cfg


def test_the_certification_protocol_records_the_image_size(tmp_path):
    certify_job, cfg = _certify(tmp_path, make_model(tmp_path / "model.pt"))
    p = certify_job.prepare(cfg)
    assert p.protocol["image_size"] == 8 == p.meta["image_size"] and p.images.shape[-2:] == (8, 8)
    assert "crop_pct" not in p.protocol  # digits are not centre-cropped
    certify_job._start(p)  # writes protocol.json (no tracking: no MLflow run)
    assert json.loads((p.out / certify_job.PROTOCOL_FILE).read_text())["image_size"] == 8


def test_an_older_protocol_without_the_image_size_still_resumes(tmp_path):
    certify_job, cfg = _certify(tmp_path, make_model(tmp_path / "model.pt"))
    p = certify_job.prepare(cfg)
    f = p.out / certify_job.PROTOCOL_FILE
    p.out.mkdir(parents=True)
    old = {k: v for k, v in p.protocol.items() if k != "image_size"}
    f.write_text(json.dumps(old))
    assert certify_job.prepare(cfg).protocol["image_size"] == 8  # absent from the old file: compared as equal
    f.write_text(json.dumps({**old, "image_size": 16}))
    fresh = certify_job.prepare(cfg)  # no results yet under the other protocol: it gives way, said once
    assert fresh.superseded and any("starting afresh with this one" in w for w in fresh.warnings)
    from rayrcm.result_parts import write_part

    write_part(p.out / "rows", [{"idx": 0, "label": 0, "predict": 0, "radius": 0.1, "correct": 1, "time": 0.1}])
    with pytest.raises(ConfigError, match=r"holds results of another protocol \(image_size 16 != 8\)"):
        certify_job.prepare(cfg)


def test_milestones_in_epochs_written_as_whole_numbers_rescale_to_fractions():
    """A 90-epoch recipe with milestone_epochs 30,60 shortened to 1 epoch decays at 1/3 and 2/3 of it
    (not at epoch 1 twice, which would leave the whole run at the first lr)."""
    from rayrcm.config import ExperimentConfig, apply_overrides

    recipe = apply_overrides(ExperimentConfig(), ["train.epochs=90", "optim.schedule=step", "optim.milestone_epochs=30,60"])
    short = apply_overrides(recipe, ["train.epochs=1"])
    assert short.optim.milestone_epochs == pytest.approx((1 / 3, 2 / 3), abs=1e-6)


def test_a_job_recorded_before_a_config_key_existed_still_resumes(tmp_path):
    """Upgrading rayrcm adds config keys: a job whose recorded config lacks one resumes while the key
    holds its default, and is refused (naming the key) when the rerun sets another value."""
    from rayrcm.config import ExperimentConfig, apply_overrides
    from rayrcm.errors import ConfigError
    from rayrcm.orchestration.trainer import (
        check_rerun,
        default_job_config,
        job_config,
        write_job_config,
    )

    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", "train.name=old-job"])
    recorded = job_config(cfg)
    older = {k: v for k, v in recorded.items() if k != "optim.clip_after_warmup"}  # as an older version wrote it
    write_job_config(str(tmp_path), "old-job", older)
    assert check_rerun(str(tmp_path), "old-job", recorded, default_job_config(cfg)) is True
    changed = job_config(apply_overrides(cfg, ["optim.clip_after_warmup=true"]))
    with pytest.raises(ConfigError, match=r"optim.clip_after_warmup \('<unset>' -> True\)"):
        check_rerun(str(tmp_path), "old-job", changed, default_job_config(cfg))


def test_two_jobs_on_one_results_folder_the_second_is_refused_before_ray(tmp_path):
    """Two identical certify commands at once: the folder's lock (held here as the first job would hold
    it) refuses the second in one line, before any Ray work; the lock goes with its holder."""
    from rayrcm.orchestration import job_files

    certify_job, cfg = _certify(tmp_path, make_model(tmp_path / "model.pt"))
    p = certify_job.prepare(cfg)
    from unittest import mock

    no_ray = mock.patch("rayrcm.orchestration.cluster.ensure_ray", side_effect=AssertionError("reached Ray"))
    with job_files.folder_lock(p.out, p.name), no_ray:
        with pytest.raises(ConfigError, match=r"another rayrcm job \(pid \d+\) is writing .*job; wait for it"):
            certify_job.run(cfg)
    with job_files.folder_lock(p.out, p.name):  # released: free again
        pass


def test_a_results_part_that_cannot_be_written_is_one_line_and_leaves_the_earlier_parts_whole(tmp_path):
    """A real write failure (the file-size limit of the writing process, as a full disk would): the
    part is not left half-written, the earlier part stands, and the error is one RunFailed line."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        from rayrcm.result_parts import ResultsNotWritten, write_part
        rows = Path({str(tmp_path / "rows")!r})
        row = {{"idx": 0, "label": 0, "predict": 0, "radius": 0.1, "correct": 1, "time": 0.1}}
        write_part(rows, [row])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))  # no new file may grow beyond 64 bytes
        try:
            write_part(rows, [dict(row, idx=i) for i in range(1, 500)])
        except ResultsNotWritten as err:
            print(err)
            sys.exit(3)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert "could not write results to" in out.stdout and "rerun the same command to resume" in out.stdout
    from rayrcm.analysis.results import read_rows_dir

    assert read_rows_dir(tmp_path).idx.tolist() == [0]  # the earlier part, whole
    assert not list((tmp_path / "rows").glob(".*.tmp"))  # nothing half-written left behind
