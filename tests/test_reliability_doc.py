"""docs/reliability.md stays true: every row of its command-line table runs here and must end
with the exit status and the exact one-line error the table shows, before Ray starts (``ray.init``
fails the row)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from rayrcm.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


def _rows() -> list[tuple[str, str, int, str]]:
    text = DOC.read_text().split("## Bad input on the command line", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 4 and cells[1].startswith("`rayrcm "):
            kind, command, code, shown = cells
            rows.append((kind, command.strip("`"), int(code), shown.strip("`")))
    return rows


ROWS = _rows()


def test_the_table_is_not_empty():
    assert len(ROWS) >= 15


@pytest.fixture
def builtins_only(monkeypatch):
    """The registries as a fresh process has them: extensions other tests registered (plugins)
    would add their names to "choose one of" lines."""
    from rayrcm.registry import Registry

    names = Registry.names

    def module(item) -> str:
        item = item[0] if isinstance(item, tuple) else item  # methods register (config class, builder)
        return getattr(item, "__module__", None) or "rayrcm"

    def builtin_names(self):
        return [n for n in names(self) if module(self._items[n]).startswith("rayrcm")]

    monkeypatch.setattr(Registry, "names", builtin_names)


def _write_data(root: Path) -> None:
    """``holes/``: CIFAR-10 without ``data_batch_3`` and ``batches.meta``; ``cut/``: CIFAR-10 with
    ``data_batch_2`` cut in half; ``pics/``: an ImageFolder whose ``train/b/2.jpg`` is a text file."""
    import pickle

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("holes", "cut"):
        folder = root / name / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(20)]}
            (folder / batch).write_bytes(pickle.dumps(data))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    (root / "holes" / "cifar-10-batches-py" / "data_batch_3").unlink()
    (root / "holes" / "cifar-10-batches-py" / "batches.meta").unlink()
    cut = root / "cut" / "cifar-10-batches-py" / "data_batch_2"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / "pics" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 80 * i, np.uint8)).save(root / "pics" / split / c / f"{i}.jpg")
    (root / "pics" / "train" / "b" / "2.jpg").write_text("not an image\n")


@pytest.mark.parametrize("kind,command,code,shown", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_row(kind, command, code, shown, tmp_path, monkeypatch, capsys, builtins_only):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("data:\n  name: digits\noptim:\n  lr: 0.001\n")
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: [1, 2\n")
    (tmp_path / "list.yaml").write_text("optim:\n  lr: [1, 2]\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.tsv").write_text("bad\tline\n")
    (tmp_path / "boom.py").write_text("raise RuntimeError('boom from plugin')\n")  # plugins that fail to import
    (tmp_path / "syntax.py").write_text("def f(:\n")
    (tmp_path / "missing.py").write_text("import no_such_module_xyz\n")
    _write_data(tmp_path)
    import ray

    def no_ray(*args, **kwargs):  # every row is refused before any Ray work starts
        raise AssertionError(f"{kind}: Ray was started for a bad input")

    monkeypatch.setattr(ray, "init", no_ray)
    argv = shlex.split(command)[1:]
    with pytest.raises(SystemExit) as ex:
        main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert ex.value.code == code, err
    assert err == [shown], f"{kind}: {command}"
    assert not re.search(r"Traceback", "\n".join(err))
