"""The ACL digits recipe's whole table in one command (``python experiments/acl_digits.py all
--method acl``), at CI size, on a real local Ray cluster (2 Ray Train workers per stage) tracked in a
real MLflow server: adversarial contrastive pretraining, then SLF, ALF and AFF from its encoder,
each evaluated with SA, PGD-20 and the standard AutoAttack on the same test images; a row per mode.
At this size the fine-tunings stay at chance (6 steps each, the head starting at zero): the test checks
the table, its invariants and its lineage, not what the recipe learns at its own size."""

from __future__ import annotations

import math

import pytest

MODES = ("slf", "alf", "aff")
ROWS = ["SLF", "ALF", "AFF"]
SA, PGD, AA, APGD = "SA", "PGD-20", "AutoAttack (standard)", "APGD-CE+APGD-T (upper bound)"
IMAGES = 32
# CI size: each stage's length in epochs (the recipe's schedules rescale with it), the evaluation on the
# first 32 test images (one batch) with a short AutoAttack (APGD 5 iterations, 2 target classes, Square
# 20 queries); PGD-20, the attack budget (L-inf 8/255) and everything else stay the recipe's
TINY = ["pretrain:train.epochs=0.5", "pretrain:train.embedding_points=0",
        *[f"finetune-{m}:train.epochs=0.5" for m in MODES],
        f"method.eval_max_images={IMAGES}", "method.eval_aa_iters=5", "method.eval_aa_targets=2",
        "method.eval_aa_queries=20"]


@pytest.mark.slow  # a real Ray cluster and MLflow server; about 100 s on a shared 2-CPU machine
def test_acl_digits_table_has_sa_pgd_and_autoattack_per_fine_tuning_mode(tmp_path, ray_cluster, mlflow_server, capsys):
    """``all --method acl``: the pretraining, then SLF, ALF and AFF from its encoder. The table has a row
    per mode in the recipe's order, its SA, PGD-20, AutoAttack and APGD columns the fine-tunings' own
    test metrics on the same 32 images, each in [0, 1]. AutoAttack attacks only the images classified
    right and its first two attacks (APGD-CE, APGD-T) are an upper bound on it, so AA <= APGD <= SA by
    construction; PGD-20 (an ascent on the true class's loss) is not above SA. AA <= PGD-20 is not
    asserted: two independent attacks, one may break an image the other misses. Every stage's MLflow
    run is nested under the table's run and carries its fingerprint, the table's run links them and
    holds the table, the fine-tunings name the pretraining's run as their source, and the Markdown table is printed."""
    from helpers import load_experiment
    from mlflow import MlflowClient

    from rayrcm.orchestration.lineage import NOTE_TAG, SOURCE_RUN_TAG
    from rayrcm.orchestration.pipeline_job import FINGERPRINT_TAG, PIPELINE_TAG, run_all

    recipe, seed = load_experiment("acl_digits"), load_experiment("_acl_seed")
    sets = [*TINY, f"train.storage_path={tmp_path / 'storage'}", f"tracking.uri={mlflow_server}",
            "tracking.experiment=e2e-acl-table", "tracking.register_as=", "tracking.alias="]
    result = run_all("acl-digits", seed.table_stages(recipe.pretrain_config, recipe.finetune_config, "acl"), sets)
    printed = capsys.readouterr().out

    table = result.table.table
    assert list(table.index) == ROWS and {SA, PGD, AA, APGD} <= set(table.columns), table
    for row, mode in zip(ROWS, MODES):
        metrics = result.outputs[f"finetune-{mode}"].metrics
        assert metrics["test_robust_images"] == IMAGES
        acc = {col: float(table.loc[row, col]) for col in (SA, PGD, AA, APGD)}
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in acc.values()), (row, acc)
        for col, key in ((SA, "test_sa"), (PGD, "test_pgd20"), (AA, "test_aa"), (APGD, "test_aa_apgd")):
            assert acc[col] == pytest.approx(metrics[key]), (row, col)
        assert acc[AA] <= acc[APGD] <= acc[SA] and acc[PGD] <= acc[SA], (row, acc)
    md = (result.folder / "table.md").read_text().strip()
    assert md in printed and "| SLF |" in md and f"| {SA} | {PGD} |" in md

    client = MlflowClient(mlflow_server)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {"table.md", "table.tex"} <= {a.path for a in client.list_artifacts(result.parent_run_id)}
    pretrain_run = result.outputs["pretrain"].run_id
    for name, out in result.outputs.items():
        run = client.get_run(out.run_id)
        assert run.info.status == "FINISHED" and not out.reused
        assert run.data.tags[PIPELINE_TAG] == result.parent_run_id and run.data.tags[FINGERPRINT_TAG] == out.fingerprint
        assert out.run_id in parent.data.tags[NOTE_TAG]
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id, name  # nested under the table's run
        if name != "pretrain":
            assert run.data.tags[SOURCE_RUN_TAG] == pretrain_run, name
        print(f"{name}: {(run.info.end_time - run.info.start_time) / 1000:.1f} s")
    print(table.to_string())
