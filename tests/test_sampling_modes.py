"""The contract of a certification sampling mode (rayrcm.certify.sampling): every registered mode
accepts a valid config and refuses what it cannot serve in one line, records its own protocol keys
and job-name parts, maps its command-line flags to config keys, and, end to end on a tiny linear
classifier whose smoothed radius is known in closed form, certifies only the true class and never
beyond the true radius. The numbers of the built-in modes are pinned: they are those of the code
before the registry (same noise, same rows, same results)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rayrcm.certify.collect import Collector, CountSettings
from rayrcm.certify.protocol import (
    CertifyConfig,
    ComputeConfig,
    SmoothingConfig,
    protocol_dict,
    protocol_diff,
    validate_certify,
)
from rayrcm.certify.sampling import SAMPLING_MODES, SamplingMode, mode_flags, sampling_mode
from rayrcm.certify.smoothing import Smoother
from rayrcm.errors import ConfigError

MODES = SAMPLING_MODES.names()
VALUES = [255, 230, 150, 128, 64, 0]  # pixel values of 1x1 one-channel images
IMAGES = torch.tensor(VALUES, dtype=torch.uint8).view(-1, 1, 1, 1)
BOUNDARY = 0.5
LABELS = torch.tensor([int(v / 255 > BOUNDARY) for v in VALUES])
TRUE_RADII = [abs(v / 255 - BOUNDARY) for v in VALUES]  # a linear classifier's smoothed radius: its distance to the boundary
TODO = [3, 8, 13, 21, 34, 55]  # the dataset indices (they seed the noise)


class Linear(torch.nn.Module):
    """Class 1 iff the pixel is above 0.5: f(x + sigma z) = 1 with probability Phi((x - 0.5) / sigma)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.flatten(1)[:, 0] - BOUNDARY) * 1000
        return torch.stack([-z, z], 1)


def _cfg(name: str, mode: str = "certify") -> CertifyConfig:
    s = SmoothingConfig(sigma=0.25, n0=100, n=2000, chunk=1000, block=100, alpha=0.001, seed=5, sampling=name)
    return CertifyConfig(model="m.pt", mode=mode, smoothing=s, compute=ComputeConfig(batch=300, sequential_images=4))


def _certify(name: str, mode: str = "certify") -> list[dict]:
    """The job's path without Ray: the mode's rows, its counting (as an actor does, rows in reverse
    order, every batch delivered twice) and the collector's records."""
    cfg = validate_certify(_cfg(name, mode))
    entry = sampling_mode(name)
    collector = Collector(cfg, TODO, LABELS, num_classes=2)
    counter = SimpleNamespace(sm=Smoother(Linear(), 2, cfg.smoothing.sigma, batch=300, block=100, device="cpu"),
                              images=IMAGES, settings=CountSettings.from_config(cfg), device_name="cpu")
    per = entry.images_per_call(cfg, len(collector.rows))
    rows, records = collector.rows[::-1], []
    for i in range(0, len(rows), per):
        part = rows[i:i + per]
        out = entry.count(counter, {k: np.asarray([r[k] for r in part]) for k in part[0]})
        records += collector.add(out)
        assert collector.add(out) == []  # a retried batch delivered twice: counted once
    assert sorted(r["idx"] for r in records) == TODO  # every image finished once
    return sorted(records, key=lambda r: r["idx"])


def test_every_entry_is_a_sampling_mode_registered_under_its_name():
    assert MODES[:3] == ["fixed", "iss", "sequential"]
    for name in MODES:
        entry = SAMPLING_MODES.get(name)
        assert isinstance(entry, SamplingMode) and entry.name == name and entry.help and entry.modes
        assert set(entry.modes) <= {"certify", "predict"}


@pytest.mark.parametrize("name", MODES)
def test_a_valid_config_is_accepted_and_a_mode_it_cannot_serve_is_one_line(name):
    entry = sampling_mode(name)
    for mode in ("certify", "predict"):
        if mode in entry.modes:
            assert validate_certify(_cfg(name, mode)).smoothing.sampling == name
        else:
            with pytest.raises(ConfigError, match=rf"^sampling='{name}' is invalid: .*is for certify, not {mode}$") as err:
                validate_certify(_cfg(name, mode))
            assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="choose one of: " + ", ".join(MODES)):
        validate_certify(_cfg(name + "x"))


def _key_exists(cfg: object, key: str) -> bool:
    head, _, rest = key.partition(".")
    if not is_dataclass(cfg) or head not in {f.name for f in fields(cfg)}:
        return False
    return not rest or _key_exists(getattr(cfg, head), rest)


def test_every_flag_sets_a_config_key_and_reaches_the_command_line(capsys):
    from rayrcm.cli import main
    from rayrcm.cli_parse import CERTIFY_FLAGS

    with pytest.raises(SystemExit):
        main(["certify", "--help"])
    help_text = capsys.readouterr().out
    for name, flag in mode_flags():
        assert _key_exists(CertifyConfig(), flag.key), (name, flag)
        assert CERTIFY_FLAGS[flag.name] == flag.key and "--" + flag.name.replace("_", "-") in help_text
    for name in MODES:
        assert f"{name} (" in help_text  # the --sampling help names every mode


def test_a_flag_of_another_mode_is_one_line():
    from rayrcm.cli import _parser, certify_config

    for name, flag in mode_flags():
        other = next(m for m in MODES if m != name)
        if not flag.refused_elsewhere:
            continue
        args = _parser().parse_args(["certify", "--model", "m.pt", "--sampling", other,
                                     "--" + flag.name.replace("_", "-"), "1"])
        with pytest.raises(ConfigError, match=rf"is for --sampling {name}, not sampling={other}"):
            certify_config(args)


@pytest.mark.parametrize("name", MODES)
def test_the_protocol_records_the_modes_own_keys_and_another_mode_is_a_protocol_change(name):
    def proto(sampling: str) -> dict:
        return protocol_dict(_cfg(sampling), dataset="digits", model_sha256="0" * 64, num_classes=2, indices=TODO)

    mine = proto(name)
    assert mine["sampling"] == name and set(sampling_mode(name).protocol_keys) <= set(mine)
    assert protocol_diff(mine, mine) == []
    for other in MODES:
        if other != name:
            theirs = proto(other)
            assert protocol_diff(mine, theirs) and protocol_diff(theirs, mine)
            assert not set(sampling_mode(other).protocol_keys) & set(mine)


def test_each_mode_names_its_own_folder():
    parts = {name: tuple(sampling_mode(name).name_parts(_cfg(name).smoothing)) for name in MODES}
    assert parts["fixed"] == () and len(set(parts.values())) == len(MODES)


@pytest.mark.parametrize("name", MODES)
def test_end_to_end_every_certificate_is_the_true_class_within_the_true_radius(name):
    for mode in sampling_mode(name).modes:
        records = _certify(name, mode)
        for rec, truth, label in zip(records, TRUE_RADII, LABELS.tolist()):
            assert rec["label"] == label and rec["predict"] in (-1, label), rec  # never the wrong class
            assert rec["correct"] == int(rec["predict"] == label)
            if mode == "certify":
                assert 0 <= rec["radius"] <= truth + 1e-9, (rec, truth)
        # far from the boundary (true radius 0.5): certified, by a radius within reach
        far = [r for r, t in zip(records, TRUE_RADII) if t >= 0.5]
        assert all(r["predict"] == r["label"] for r in far)
        if mode == "certify":
            reach = sampling_mode(name).reach(_cfg(name).smoothing)
            assert all(0 < r["radius"] <= reach + 1e-9 for r in far)


# (predict, radius, n_a, n (predict: n_b), samples[, decisions]) per image, as the code before the registry gave them
PINNED = {
    ("fixed", "certify"): [(1, 0.435594, 1945, 2000, 2100), (1, 0.370552, 1896, 2000, 2100), (1, 0.069642, 1287, 2000, 2100),
                           (-1, 0.0, 1018, 2000, 2100), (0, 0.229525, 1694, 2000, 2100), (0, 0.468702, 1962, 2000, 2100)],
    ("fixed", "predict"): [(1, 0.0, 1951, 49, 2000), (1, 0.0, 1897, 103, 2000), (1, 0.0, 1270, 730, 2000),
                           (-1, 0.0, 1018, 982, 2000), (0, 0.0, 1695, 305, 2000), (0, 0.0, 1933, 67, 2000)],
    ("iss", "certify"): [(1, 0.434393, 1171, 1200, 1300), (1, 0.362274, 669, 700, 800), (1, 0.005919, 180, 300, 400),
                         (-1, 0.0, 95, 200, 300), (0, 0.202153, 341, 400, 500), (0, 0.440563, 979, 1000, 1100)],
    ("sequential", "certify"): [(1, 0.415773, 1945, 2000, 2000, (1, 1, -1)), (1, 0.346766, 1048, 1100, 1100, (1, 1, 0)),
                                (1, 0.004548, 304, 500, 500, (1, 0, 0)), (-1, 0.0, 1018, 2000, 2000, (-1, 0, 0)),
                                (0, 0.21663, 1694, 2000, 2000, (1, -1, 0)), (0, 0.446877, 1962, 2000, 2000, (1, 1, -1))],
}
COLUMNS = {  # the Parquet columns of an image's row, in order
    ("fixed", "certify"): ["idx", "label", "time", "device", "predict", "radius", "top_class", "n_a", "n", "p_a_lower",
                           "samples", "counts_selection", "counts_estimation", "correct"],
    ("fixed", "predict"): ["idx", "label", "time", "device", "predict", "radius", "n_a", "n_b", "p_value", "samples",
                           "counts", "correct"],
    ("sequential", "certify"): ["idx", "label", "time", "device", "predict", "radius", "n_a", "n", "p_a_lower", "p_upper",
                                "samples", "decisions", "correct"],
}
COLUMNS[("iss", "certify")] = COLUMNS[("fixed", "certify")]


@pytest.mark.parametrize("name, mode", sorted(PINNED))
def test_the_built_in_modes_give_the_results_they_gave_before_the_registry(name, mode):
    records = _certify(name, mode)
    got = [(r["predict"], round(r["radius"], 6), r["n_a"], r["n"] if "n" in r else r["n_b"], r["samples"])
           + ((tuple(r["decisions"]),) if "decisions" in r else ()) for r in records]
    assert got == PINNED[(name, mode)]
    assert [list(r) for r in records] == [COLUMNS[(name, mode)]] * len(records)


def test_the_sequential_cap_and_radii_are_the_modes_checks():
    seq = _cfg("sequential")
    for smoothing, needle in ((replace(seq.smoothing, n=1050), "positive multiple of block=100"),
                              (replace(seq.smoothing, radii=(0.5, 0.25)), "must be increasing"),
                              (replace(seq.smoothing, radii=(0.0, 0.9)), "every radius must be <")):
        with pytest.raises(ConfigError, match=needle):
            validate_certify(replace(seq, smoothing=smoothing))
    with pytest.raises(ConfigError, match="radii are decided by --sampling sequential"):
        validate_certify(replace(seq, smoothing=replace(seq.smoothing, sampling="fixed", radii=(0.25,))))
