"""A researcher's first day: the example recipes, their help, and the README's CIFAR-10 walk-through
run as written (on a tiny CIFAR-format folder, with tiny overrides through ``--set``)."""

from __future__ import annotations

import os
import pickle
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ("cifar10_gaussian", "imagefolder_gaussian")
STAGES = ("train", "certify", "analyze")
# tiny settings for the walk-through, passed as the README documents: --set on the stage's line
TINY_N0, TINY_N = 10, 100
TINY = {
    "train": ["train.epochs=1", "data.batch_size=10", "train.checkpoint_epochs=1"],
    "certify": [f"smoothing.n0={TINY_N0}", f"smoothing.n={TINY_N}", "smoothing.skip=2", "smoothing.chunk=100"],
}


def walkthrough(name: str = "cifar10") -> list[str]:
    """The commands of README's ``<!-- walkthrough:NAME -->`` block (comments and blank lines dropped)."""
    text = README.read_text()
    m = re.search(rf"<!-- walkthrough:{name} -->\s*```bash\n(.*?)```\s*<!-- /walkthrough:{name} -->", text, re.S)
    assert m, f"README.md has no walkthrough:{name} block"
    lines = [line.split("#", 1)[0].strip() for line in m.group(1).splitlines()]
    return [line for line in lines if line]


def write_cifar10(root: Path, per_batch: int = 20) -> Path:
    """A CIFAR-10-format folder (``cifar-10-batches-py/``): ``per_batch`` random images per file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [(b * per_batch + i) % 10 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return root


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` is this interpreter
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAYRCM_STORAGE", None)
    return env


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("example", EXAMPLES)
@pytest.mark.parametrize("stage", STAGES)
def test_every_example_stage_has_its_own_help_with_flags_and_an_example(example, stage):
    t = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "examples" / f"{example}.py"), stage, "--help"], cwd=ROOT,
                         capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.perf_counter() - t < 5  # no Ray, no torch to answer --help
    assert f"{example}.py {stage}" in out.stdout.splitlines()[0]  # usage of this stage, not the whole script
    assert "example:" in out.stdout and f"examples/{example}.py {stage}" in out.stdout.split("example:", 1)[1]
    if stage != "analyze":
        assert "--set KEY=VALUE" in out.stdout and "--dry-run" in out.stdout


def test_train_help_answers_fast_and_says_how_to_list_the_keys():
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "rayrcm.cli", "train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env=_env(), timeout=60)
    wall = time.perf_counter() - t
    assert out.returncode == 0 and "rayrcm config" in out.stdout and "example:" in out.stdout, out.stdout
    assert wall < 3, wall  # generous for a loaded CI machine; the check below is the exact one
    probe = ("import sys; from rayrcm.cli import _parser; p = _parser(); "
             "print(sorted(m for m in ('ray', 'torch', 'mlflow') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(),
                          timeout=60).stdout.strip() == "[]"


@pytest.mark.parametrize("verb", ["quickstart", "train", "config", "tune", "certify", "predict", "analyze", "compare",
                                  "mlflow-server"])
def test_every_cli_verb_help_has_an_example(verb, capsys):
    from rayrcm.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and f"rayrcm {verb}" in out.split("example:", 1)[1]


def test_example_configs_validate_and_list_their_keys(tmp_path, capsys):
    from rayrcm.cli import main

    for example in EXAMPLES:
        with pytest.raises(SystemExit) as exit_:  # no data on disk yet: the keys are still listed
            main(["config", str(ROOT / "examples" / f"{example}.py")])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and "method:\n  name: gaussian" in out and "register_as:" in out


def test_imagefolder_example_trains_from_a_folder_of_class_folders(tmp_path):
    from PIL import Image

    from rayrcm.config import apply_overrides, load_recipe, validate

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 30), (40 * i, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    cfg = validate(apply_overrides(load_recipe(ROOT / "examples" / "imagefolder_gaussian.py"),
                                   [f"data.path={tmp_path}", "data.image_size=32", "data.val_fraction=0.5"]))
    assert (cfg.data.name, cfg.method.name, cfg.method.sigma) == ("imagefolder", "gaussian", 0.5)


# ----------------------------------------------------------------------------- README


def test_readme_certify_commands_use_certification_keys():
    """``--set`` on a ``certify`` line of the README or a docs page is a CertifyConfig key (``data_path``,
    not ``data.path``)."""
    from rayrcm.orchestration.certify_job import config_from_args

    found = 0
    text = "\n".join(f.read_text() for f in [README, *sorted((ROOT / "docs").glob("*.md"))])
    for line in text.splitlines():
        if re.search(r"(experiments|examples)/\S+\.py\s+certify\b", line):
            keys = re.findall(r"--set\s+(\S+=\S+)", line.split("#", 1)[0])
            config_from_args([k.replace("$", "") for k in keys])  # unknown keys raise one line
            found += bool(keys)
    assert found


def test_size_help_names_only_the_sizes_a_recipe_accepts():
    from helpers import load_experiment

    for name, sizes in (("rcm_cifar10", {"b"}), ("rcm_imagenet", {"b", "s"})):
        out = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), "pretrain", "--help"], cwd=ROOT,
                             capture_output=True, text=True, env=_env(), timeout=120)
        assert out.returncode == 0, out.stderr
        options = out.stdout.split("options:", 1)[1]
        size_help = " ".join(options.split("--size", 1)[1].split("\n  -", 1)[0].split())
        assert ("RCM-S" in size_help) == ("s" in sizes), size_help
        assert "example:" in out.stdout
        assert load_experiment(name).pretrain_config  # the recipe still loads as a module


def _interrupt_then_rerun_is_accepted(command: str, work: Path, env: dict[str, str]) -> None:
    """The README's certify at its default n = 100,000 (minutes per image on a CPU): the bar says it is
    starting; Ctrl-C (SIGINT to the process group, as a terminal sends it) is one line and exit 130;
    the folder then holds no result, so the tiny rerun (another n) is not locked out of it."""
    line = command + "".join(f" --set {shlex.quote(o)}" for o in TINY["certify"] if not o.startswith("smoothing.n="))
    proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = []
    assert proc.stdout is not None
    for text in proc.stdout:  # the job's header: Ray is up and the counting has begun
        seen.append(text)
        if "[rayrcm] certify:" in text:
            break
    assert any("starting Ray" in t for t in seen), "".join(seen)
    time.sleep(2)
    os.killpg(proc.pid, 2)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + rest + err
    assert err.strip().splitlines() == ["rayrcm: interrupted; rerun the same command to resume"], err


@pytest.mark.slow
def test_readme_cifar10_walkthrough_runs_as_written(tmp_path):
    """The README's commands, in order, on a tiny CIFAR-10 folder: the last prints the table."""
    commands = walkthrough("cifar10")
    assert [c.split()[2] for c in commands] == ["train", "certify", "analyze"], commands
    data = write_cifar10(tmp_path / "data")
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")  # the commands name examples/ from the repository root
    # Ray's session folder: private, and short (its socket paths must fit in 107 bytes)
    env = _env(DATA=str(data), RAY_TMPDIR=tempfile.mkdtemp(prefix="rx", dir="/tmp"), HOME=str(tmp_path / "home"))
    out = ""
    for command in commands:
        stage = command.split()[2]
        if stage == "certify":  # first as a new user does: the README's n = 100,000, then Ctrl-C
            _interrupt_then_rerun_is_accepted(command, work, env)
        line = command + "".join(f" --set {shlex.quote(o)}" for o in TINY.get(stage, []))
        run = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{line}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        assert "rayrcm: error" not in run.stderr
        if stage == "certify":  # the interrupted job left no result: its protocol gave way, said once
            assert run.stderr.count("starting afresh") == 1, run.stderr
        out = run.stdout
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| run | 0.00 | 0.25 |") and "ACR" in table[0], out
    head = [c.strip() for c in table[0].strip("|").split("|")]
    row = [c.strip() for c in table[2].strip("|").split("|")]
    assert row[0] == "cifar10-gaussian-sigma-0_25" and row[head.index("images")] == "10", out
    assert row[head.index("samples")] == f"{10 * (TINY_N0 + TINY_N):,}", out  # the draws spent, n0 + n per image
    assert "0.50" not in table[0]  # n = 100 cannot certify 0.5 (reach 0.375): no column claims it
    folder = work / "rayrcm_results" / "certify" / "cifar10-gaussian-sigma-0_25"
    assert (folder / "analysis" / "table.md").is_file()
    # the job's MLflow run holds the protocol that ran; the interrupted one's run is kept, renamed out of the job
    import json

    import mlflow

    record = json.loads((folder / "mlflow_run.json").read_text())
    client = mlflow.MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.data.params["protocol.n"] == str(TINY_N) and run.info.status == "FINISHED"
    old = client.search_runs([run.info.experiment_id], "tags.`rayrcm.job` = 'cifar10-gaussian-sigma-0_25 (superseded)'")
    assert len(old) == 1 and old[0].data.params["protocol.n"] == "100000" and old[0].info.status != "RUNNING"


def test_the_python_page_runs_as_written(tmp_path):
    """docs/python.md's code block of the pieces underneath ``rayrcm.api``, as a notebook would run it, on
    a model file made here (the api itself runs in tests/test_python_api.py and the example notebook)."""
    import runpy

    from helpers import make_model

    text = (ROOT / "docs" / "python.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "MODEL_FILE" in b)
    (tmp_path / "page.py").write_text(code)
    out = runpy.run_path(str(tmp_path / "page.py"), init_globals={"MODEL_FILE": str(make_model(tmp_path / "m.pt"))})
    assert out["cert"].prediction in range(-1, 10) and out["cert"].radius >= 0
    assert len(out["seq"].decisions) == 3 and 0 < out["seq"].samples <= 10_000
