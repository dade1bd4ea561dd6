"""``rayrcm certify --denoiser``: denoised smoothing (DDS) certifies ``classifier(denoiser(x + sigma z))``
on the Ray Data job; the denoiser is checked before Ray starts, recorded in the protocol, and the
counts are the single-process reference's, on 1 and 2 actors alike."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import fails_in_one_line, make_model

from rayrcm.certify import Smoother, certify
from rayrcm.certify.collect import Collector, CountSettings
from rayrcm.errors import ConfigError
from rayrcm.models.denoised import DenoisedClassifier
from rayrcm.models.export import build_from_file
from rayrcm.objectives.ddpm import DDPMConfig, DDPMObjective
from rayrcm.orchestration import certify_job
from rayrcm.orchestration.certify_prepare import PROTOCOL_FILE
from rayrcm.train.checkpoint import model_meta, save_model

SIGMA = 0.25


def make_denoiser(path, *, image_size=8, seed=0):
    """A small (untrained, non-trivial) ddpm denoiser file: linear schedule, T = 1000 (sigma <= 78.7)."""
    torch.manual_seed(seed)
    cfg = DDPMConfig(base_channels=8, channel_mults=(1, 2), schedule="linear", steps=1000)
    obj = DDPMObjective(cfg)
    torch.nn.init.normal_(obj.denoiser.eps_model.out.weight, std=0.1)
    method = {"name": "ddpm", "schedule": "linear", "steps": 1000, "base_channels": 8, "channel_mults": [1, 2],
              "channels": 3}
    cfg_dict = {"method": method, "model": {"encoder": "vit_digits"}, "data": {"name": "digits", "image_size": image_size}}
    save_model(path, obj.export(), model_meta(cfg_dict, "denoiser", 10))
    return path


def _cfg(model, out, *extra, denoiser=None, name=None, workers=1):
    return certify_job.config_from_args([
        f"model={model}", f"out_dir={out}", "tracking.enabled=false", f"smoothing.sigma={SIGMA}", "smoothing.n0=100",
        "smoothing.n=200", "smoothing.chunk=100", "smoothing.max=40", "smoothing.skip=10", "compute.batch=100",
        f"compute.workers={workers}", "compute.flush_every=1", "compute.progress_every_s=2",
        *([f"denoiser={denoiser}"] if denoiser else []), *([f"name={name}"] if name else []), *extra])


@pytest.fixture
def files(tmp_path):
    return make_model(tmp_path / "model.pt", seed=1), make_denoiser(tmp_path / "denoiser.pt")


def _reference(p, model_file, denoiser_file):
    classifier, _ = build_from_file(model_file)
    denoiser, _ = build_from_file(denoiser_file)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors
    try:
        sm = Smoother(DenoisedClassifier(classifier, denoiser, SIGMA), 10, sigma=SIGMA, batch=100, block=100, device="cpu")
        ref = {}
        for pos, idx in enumerate(p.indices):
            cert, sel, est, _ = certify(sm, p.images[pos].float().div_(255), n0=100, n=200, alpha=0.001, seed=0,
                                        index=idx, chunk=100)
            ref[idx] = (cert, sel.tolist(), est.tolist())
    finally:
        torch.set_num_threads(threads)
    return ref


def _assert_reference(rows, ref):
    assert sorted(rows["idx"]) == sorted(ref) and not rows["idx"].duplicated().any()
    for r in rows.itertuples():
        cert, sel, est = ref[r.idx]
        assert list(r.counts_selection) == sel and list(r.counts_estimation) == est, r.idx
        assert r.predict == cert.prediction and r.radius == cert.radius, r.idx


def test_prepare_checks_the_denoiser_and_records_it_in_the_protocol(files, tmp_path):
    model_file, den_file = files
    p = certify_job.prepare(_cfg(model_file, tmp_path / "out", denoiser=den_file))
    sha = hashlib.sha256(den_file.read_bytes()).hexdigest()
    assert p.protocol["denoiser_sha256"] == sha and p.protocol["denoiser"] == str(den_file)
    assert f"-den{sha[:8]}-" in p.name and p.denoiser_file == den_file
    plain = certify_job.prepare(_cfg(model_file, tmp_path / "out"))
    assert plain.protocol["denoiser_sha256"] == "" and "denoiser" not in plain.protocol and "-den" not in plain.name
    assert not CountSettings.from_config(plain.cfg).denoised and CountSettings.from_config(p.cfg).denoised


def test_the_actors_counts_are_the_single_process_reference_of_the_composite(files, tmp_path, monkeypatch):
    import types

    from rayrcm.orchestration.certify_actor import CountActor

    model_file, den_file = files
    p = certify_job.prepare(_cfg(model_file, tmp_path / "out", denoiser=den_file))
    ref = _reference(p, model_file, den_file)
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(get=lambda ref: ref))  # refs are the objects
    settings = CountSettings.from_config(p.cfg)
    assert settings.denoised
    actor = CountActor(model_file.read_bytes(), p.images, settings, p.denoiser_file.read_bytes())
    assert isinstance(actor.sm.model, DenoisedClassifier) and actor.sm.model.sigma == SIGMA
    collector = Collector(p.cfg, p.todo, p.labels, 10)
    records = []
    for row in collector.rows:
        records += collector.add(actor({k: np.asarray([v]) for k, v in row.items()}))
    _assert_reference(pd.DataFrame.from_records(records), ref)
    # the denoiser changes the answers: the plain classifier's counts differ on some image
    plain, _ = build_from_file(model_file)
    sm = Smoother(plain, 10, sigma=SIGMA, batch=100, block=100, device="cpu")
    assert any(certify(sm, p.images[pos].float().div_(255), n0=100, n=200, seed=0, index=idx, chunk=100)[2].tolist()
               != ref[idx][2] for pos, idx in enumerate(p.indices))


def test_a_denoised_classifier_is_told_the_certification_sigma():
    from rayrcm.models.denoisers import WienerDenoiser
    from rayrcm.orchestration.certify_actor import _denoised

    model = DenoisedClassifier(torch.nn.Identity(), WienerDenoiser(torch.zeros(3, 1, 1), torch.ones(3, 1, 1)), 0.5)
    settings = CountSettings(sigma=SIGMA, seed=0, block=100, chunk=100, batch=0, precision="fp32", channels_last=False,
                             use_gpu=False, cpus_per_worker=1)
    assert _denoised(model, settings, None) is model and model.sigma == SIGMA


def _fails(capsys, argv, needle):
    fails_in_one_line(capsys, argv, needle)


def test_bad_denoisers_are_one_line_before_ray(capsys, files, tmp_path):
    model_file, den_file = files
    out = ["--out", str(tmp_path / "out"), "--set", "tracking.enabled=false", "--max", "20"]
    base = ["certify", "--model", str(model_file), *out]
    _fails(capsys, [*base, "--denoiser", str(make_model(tmp_path / "c.pt"))], "is a classifier model file, not a denoiser")
    _fails(capsys, [*base, "--denoiser", str(den_file), "--sigma", "100"], "beyond the denoiser's diffusion schedule")
    big = make_denoiser(tmp_path / "den16.pt", image_size=16)
    _fails(capsys, [*base, "--denoiser", str(big)], "works on 16 px images but model")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _fails(capsys, [*base, "--denoiser", str(tmp_path / "junk.pt")], "denoiser=")
    _fails(capsys, [*base, "--denoiser", str(tmp_path / "missing.pt")], "denoiser=")
    _fails(capsys, [*base, "--denoiser", "adm:pkg.mod:model"], "the adm source is for the cadis objective")


ROW = {"idx": 0, "label": 0, "predict": 0, "radius": 0.1, "correct": 1, "time": 0.1}  # one finished image


def test_a_plain_jobs_name_is_refused_with_a_denoiser_and_an_older_protocol_still_resumes(files, tmp_path):
    from rayrcm.result_parts import write_part

    model_file, den_file = files
    plain = certify_job.prepare(_cfg(model_file, tmp_path / "out", name="job"))
    plain.out.mkdir(parents=True)
    old = {k: v for k, v in plain.protocol.items() if k != "denoiser_sha256"}  # written before the key existed
    (plain.out / PROTOCOL_FILE).write_text(json.dumps({**old, "model": str(model_file)}))
    write_part(plain.out / "rows", [ROW])  # it holds results: another protocol is refused, not started afresh
    certify_job.prepare(_cfg(model_file, tmp_path / "out", name="job"))  # resumes
    with pytest.raises(ConfigError, match="another protocol.*denoiser_sha256 '' != '") as err:
        certify_job.prepare(_cfg(model_file, tmp_path / "out", denoiser=den_file, name="job"))
    assert "\n" not in str(err.value)
    # the same denoiser under another reference resumes: the file's SHA-256 decides, not its path
    den = certify_job.prepare(_cfg(model_file, tmp_path / "out", denoiser=den_file, name="den"))
    den.out.mkdir(parents=True)
    (den.out / PROTOCOL_FILE).write_text(json.dumps(den.protocol))
    write_part(den.out / "rows", [ROW])
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "model.pt").write_bytes(den_file.read_bytes())
    certify_job.prepare(_cfg(model_file, tmp_path / "out", denoiser=tmp_path / "copy", name="den"))
    with pytest.raises(ConfigError, match="denoiser_sha256"):
        certify_job.prepare(_cfg(model_file, tmp_path / "out", denoiser=make_denoiser(tmp_path / "d2.pt", seed=3),
                                 name="den"))


@pytest.mark.slow
def test_one_and_two_actors_give_identical_rows_and_the_reference(files, tmp_path, ray_cluster):
    model_file, den_file = files
    p = certify_job.prepare(_cfg(model_file, tmp_path / "out", denoiser=den_file))
    ref = _reference(p, model_file, den_file)
    one = certify_job.run(_cfg(model_file, tmp_path / "out", denoiser=den_file, name="one", workers=1))
    two = certify_job.run(_cfg(model_file, tmp_path / "out", denoiser=den_file, name="two", workers=2))
    _assert_reference(one.rows, ref)
    _assert_reference(two.rows, ref)
    cols = ["idx", "predict", "radius", "p_a_lower"]
    assert one.rows.sort_values("idx")[cols].reset_index(drop=True).equals(two.rows.sort_values("idx")[cols].reset_index(drop=True))
    saved = json.loads((one.out / PROTOCOL_FILE).read_text())
    assert saved["denoiser_sha256"] == hashlib.sha256(den_file.read_bytes()).hexdigest() and saved["model"] == str(model_file)
