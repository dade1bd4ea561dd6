"""Bad input: one line on stderr, exit status 2, before any Ray work."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import fails_in_one_line

from rayrcm.cli import main
from rayrcm.config import ModelConfig
from rayrcm.models import build_encoder
from rayrcm.train.checkpoint import save_model


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text("method:\n  name: gaussian\ntrain:\n  steps: 2\n")
    return p


def _fails(capsys, argv, needle):
    fails_in_one_line(capsys, argv, needle, before_ray=False)


@pytest.mark.parametrize("override, needle", [
    ("data.name=imagenet21k", "data.name='imagenet21k'"),
    ("method.name=byol", "method.name='byol'"),
    ("model.encoder=vit_g", "model.encoder='vit_g'"),
    ("data.name=cifar10", "data.path=None"),
    ("optim.lr=-1", "optim.lr=-1.0"),
    ("method.sigma=-0.5", "method.sigma=-0.5"),
    ("train.eval_sigmas=0", "train.eval_sigmas=0.0"),
    ("optim.nosuch=1", "optim.nosuch"),
    ("tracking.uri=http://127.0.0.1:9", "unreachable"),
    ("tracking.uri=./mlruns", "tracking.uri='./mlruns'"),
])
def test_bad_input_is_one_line(capsys, recipe, override, needle):
    _fails(capsys, ["train", str(recipe), "--set", override], needle)


def test_checkpoint_of_another_architecture(capsys, recipe, tmp_path):
    path = tmp_path / "vit.pt"
    save_model(path, build_encoder(ModelConfig(encoder="vit_digits"), 16), {"encoder": "vit_digits"})
    _fails(capsys, ["train", str(recipe), "--set", "tracking.enabled=false", "--set", "model.encoder=resnet18",
                    "--set", f"model.init_from={path}"], "holds encoder 'vit_digits'")


def test_missing_recipe_and_unknown_model_reference(capsys, recipe):
    _fails(capsys, ["train", "no/such/recipe.yaml"], "no such file")
    _fails(capsys, ["train", str(recipe), "--set", "tracking.enabled=false", "--set", "model.init_from=not-a-model"], "model")


def test_config_command_prints_the_resolved_config(capsys, recipe):
    with pytest.raises(SystemExit) as exit_:
        main(["config", str(recipe), "--set", "optim.lr=0.02"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "lr: 0.02" in out and "name: gaussian" in out


def test_console_entry_point_exit_status(recipe):
    proc = subprocess.run([sys.executable, "-m", "rayrcm.cli", "train", str(recipe), "--set", "data.name=nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "data.name='nope'" in proc.stderr


def test_a_recipe_stage_answers_a_certify_flag_with_its_own_syntax_in_one_line():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for argv, shown in ((["examples/cifar10_gaussian.py", "certify", "--n", "1000"], "--set smoothing.n=1000"),
                        (["experiments/rcm_digits.py", "certify", "--gpu"], "--set compute.use_gpu=true"),
                        (["experiments/rcm_digits.py", "finetune", "--sigmaa", "0.5"], "did you mean --sigma?")):
        out = subprocess.run([sys.executable, *argv], cwd=root, capture_output=True, text=True, timeout=60)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and shown in lines[0], out.stderr


def test_a_recipe_imports_the_helpers_beside_it_and_a_multi_stage_recipe_says_how_to_run(tmp_path):
    from pathlib import Path

    from rayrcm.config import ExperimentConfig, load_recipe
    from rayrcm.errors import ConfigError

    (tmp_path / "_shared.py").write_text("LR = 0.003\n")
    (tmp_path / "mine.py").write_text("from _shared import LR\n"
                                      "def config():\n    return {'optim': {'lr': LR}}\n")
    assert isinstance(load_recipe(tmp_path / "mine.py"), ExperimentConfig)
    assert load_recipe(tmp_path / "mine.py").optim.lr == 0.003
    (tmp_path / "broken.py").write_text("import not_a_module_here\n")
    with pytest.raises(ConfigError, match="failed to load: ModuleNotFoundError: No module named 'not_a_module_here'"):
        load_recipe(tmp_path / "broken.py")
    staged = Path(__file__).resolve().parents[1] / "experiments" / "rcm_digits.py"
    with pytest.raises(ConfigError, match=r"runs as `python .*rcm_digits.py STAGE`"):
        load_recipe(staged)
