"""Validation during training, the kept checkpoint, and the test evaluation at the end.

For methods whose exported network predicts classes: at every checkpoint the evaluations of
``train.evals`` run on the held-out validation split (never the test set); rank 0 keeps the model
best on ``train.select_metric`` in ``<job>/best_model.pt`` (ties keep the earlier one). At the end
the best model is loaded back on every worker, and ``train.test_evals`` plus the method's own
evaluations run on the test split. Counts are summed over workers with the session's collectives.

An encoder (pretraining) stage runs ``train.encoder_evals`` (the weighted k-NN accuracy by default)
on the validation split at every checkpoint and on the test split at the end; it keeps the last
model.
"""

from __future__ import annotations

from collections.abc import Callable

from rayrcm.eval import build_evaluations, evaluate
from rayrcm.train.checkpoint import BEST_MODEL_FILE, load_model_file, read_best, write_best
from rayrcm.train.session import Log, Session


class Validator:
    """``validator(step)`` -> validation metrics (and the best model kept); ``finish()`` at the end."""

    def __init__(self, s: Session, log: Log = lambda *_: None, say: Callable[[str], None] = lambda _: None) -> None:
        self.s, self.log, self.say = s, log, say
        self.classifier = s.cfg.method.stage == "classifier"
        encoder = s.cfg.method.export == "encoder"
        names = s.cfg.train.evals if self.classifier else s.cfg.train.encoder_evals if encoder else ()
        self.enabled = len(s.val_set) > 0 and bool(self.classifier or names)
        self.evals = build_evaluations(names, s.cfg, s.bank_set) if self.enabled else []
        self.best_file = s.work_dir / BEST_MODEL_FILE

    def __call__(self, step: int) -> dict[str, float]:
        s, t = self.s, self.s.cfg.train
        if not self.enabled:
            return {}
        val = s.objective.on_validation(s.val_set, device=s.device, rank=s.rank, world=s.world,
                                        reduce=s.comm.sum) if self.classifier else {}
        val.update(evaluate(self.evals, s.objective.export().to(s.device), s.val_set, prefix="val", device=s.device, rank=s.rank,
                            world=s.world, seed=t.seed, reduce=s.comm.sum))
        if s.rank == 0:
            self.log(step, val)
            best = read_best(self.best_file)
            if t.select_metric and (best is None or val[t.select_metric] > best["value"]):
                write_best(self.best_file, s.objective.export(), s.meta, step, t.select_metric, val[t.select_metric])
        return val

    def finish(self) -> dict[str, float]:
        """The last validation; every worker loads the kept model back. Returns the metrics."""
        s, t = self.s, self.s.cfg.train
        if not self.enabled:
            return {}
        out = self(t.steps)
        s.comm.barrier()  # rank 0 has written the best model
        best = read_best(self.best_file) if t.select_metric else None
        if best is not None:
            s.objective.export().load_state_dict(load_model_file(self.best_file)["model"], strict=True)
            out.update(selected_step=float(best["step"]), selected_value=float(best["value"]))
            if s.rank == 0:
                self.say(f"[rayrcm] selected the step-{best['step']} model: {t.select_metric} = {best['value']:.4f} (validation split)")
        return out


def test_metrics(s: Session, say: Callable[[str], None] = lambda _: None) -> dict[str, float]:
    """``train.test_evals`` and the method's evaluations on the test split; an encoder stage's ``train.encoder_evals``."""
    if s.cfg.method.stage == "classifier":
        names: tuple[str, ...] = (*s.cfg.train.test_evals, *s.cfg.method.evals())
    elif s.cfg.method.export == "encoder":
        names = s.cfg.train.encoder_evals
    else:
        return {}
    evals = build_evaluations(names, s.cfg, s.bank_set)
    out: dict[str, float] = {}
    for ev in evals:
        if ev.describe() and s.rank == 0:
            say(f"[rayrcm] {ev.describe()} on the test split")
        metrics = evaluate([ev], s.objective.export().to(s.device), s.test_set, prefix="test", device=s.device, rank=s.rank,
                           world=s.world, seed=s.cfg.train.seed, reduce=s.comm.sum)
        if ev.describe() and s.rank == 0:
            say("[rayrcm] " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_images")))
        out.update(metrics)
    return out


EMBEDDING_DIR = "embedding"  # <job>/embedding/: the encoder stage's t-SNE plot and coordinates, logged by the driver


def embedding_plot(s: Session, say: Callable[[str], None] = lambda _: None) -> None:
    """Rank 0 of an encoder stage: the 2-D t-SNE map of ``train.embedding_points`` test features
    (evenly spread over the test split) in ``<job>/embedding/``."""
    from rayrcm.analysis.embedding import write_embedding
    from rayrcm.eval.knn import embed, feature_map, spread

    t = s.cfg.train
    if s.rank != 0 or s.cfg.method.export != "encoder" or not t.embedding_points or "://" in t.storage_path:
        return
    model = s.objective.export().to(s.device)
    was_training = model.training
    model.eval()
    try:
        feats, labels = embed(feature_map(model, s.cfg.model.input_scale, s.cfg.model.input_resize), s.test_set,
                              spread(len(s.test_set), t.embedding_points), device=s.device)
    finally:
        model.train(was_training)
    if write_embedding(feats, labels, s.work_dir / EMBEDDING_DIR, seed=t.seed,
                       title=f"{s.cfg.job_name}: t-SNE of {len(feats)} test features ({s.cfg.method.name})"):
        say(f"[rayrcm] wrote the t-SNE map of {len(feats)} test features to {s.work_dir / EMBEDDING_DIR}")
