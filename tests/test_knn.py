"""The weighted k-NN evaluation: solo-learn's classifier, a number for pretraining runs, and the t-SNE map.

* On a tiny set the predictions are the hand computation, including a query where the exp(cos / T)
  weights overturn the majority of its neighbours (an unweighted vote, the unsound variant, fails).
* On random features they equal an independent transcription of solo-learn's
  ``WeightedKNNClassifier.compute`` (one-hot retrieval, sort of the class scores).
* The RCM digits encoder after 30 steps of the quickstart's pretraining classifies the test split
  far above chance and better than before by k-NN, and ``train.encoder_evals`` reports it at every checkpoint and on the test split
  of a real pretraining session, with the t-SNE map written for the run.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from rayrcm.eval.knn import KNNAccuracy, spread, weighted_knn


def test_weighted_votes_are_the_hand_computation():
    # reference: unit vectors at angles (degrees); labels
    angles = torch.tensor([0.0, 10.0, 60.0, 70.0, 180.0])
    ref = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], 1)
    labels = torch.tensor([0, 0, 1, 1, 2])
    # query at 40 degrees, k = 3: neighbours at 60 (1), 70 (1) and 10 (0)
    # weights exp(cos(20)/T), exp(cos(30)/T) for class 1 and exp(cos(30)/T) for class 0
    q = torch.tensor([[math.cos(math.radians(40)), math.sin(math.radians(40))]])
    assert weighted_knn(ref, labels, q, k=3, temperature=0.07, num_classes=3).tolist() == [1]
    # query at 2 degrees, k = 4: neighbours 0 (0), 10 (0), 60 (1), 70 (1): two votes each, but class 0's
    # cosines (0.9994, 0.9903) outweigh class 1's (0.4848, 0.3746): class 0
    q2 = torch.tensor([[math.cos(math.radians(2)), math.sin(math.radians(2))]])
    assert weighted_knn(ref, labels, q2, k=4, temperature=0.07, num_classes=3).tolist() == [0]
    # the case the weights decide: k = 3 at 35 degrees with the class-0 point moved to 25 degrees and a
    # second class-1 point far away (95): neighbours 25 (0, cos 10 deg) vs 60 (1, cos 25) and 95 (1, cos 60)
    angles3 = torch.tensor([25.0, 60.0, 95.0, 180.0])
    ref3 = torch.stack([torch.cos(torch.deg2rad(angles3)), torch.sin(torch.deg2rad(angles3))], 1)
    labels3 = torch.tensor([0, 1, 1, 2])
    q3 = torch.tensor([[math.cos(math.radians(35)), math.sin(math.radians(35))]])
    w = {0: math.exp(math.cos(math.radians(10)) / 0.07),
         1: math.exp(math.cos(math.radians(25)) / 0.07) + math.exp(math.cos(math.radians(60)) / 0.07)}
    hand = max(w, key=w.get)
    assert hand == 0  # exp(0.985/0.07) > exp(0.906/0.07) + exp(0.5/0.07)
    assert weighted_knn(ref3, labels3, q3, k=3, temperature=0.07, num_classes=3).tolist() == [hand]
    # the unsound variant, a plain majority of the 3 neighbours, says 1
    nearest = (F.normalize(q3) @ F.normalize(ref3).T).topk(3).indices[0]
    assert torch.bincount(labels3[nearest], minlength=3).argmax().item() == 1
    # a high temperature makes the votes nearly equal: the majority wins
    assert weighted_knn(ref3, labels3, q3, k=3, temperature=100.0, num_classes=3).tolist() == [1]


def _solo_learn_compute(train_f, train_y, test_f, k, T, num_classes):
    """solo-learn's ``WeightedKNNClassifier.compute`` (cosine), transcribed from its description: top-k of
    the similarity matrix, one-hot of the retrieved labels weighted by exp(sim / T), summed, sorted."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    similarity = torch.mm(test_f, train_f.t())
    distances, indices = similarity.topk(k, largest=True, sorted=True)
    candidates = train_y.view(1, -1).expand(len(test_f), -1)
    retrieved = torch.gather(candidates, 1, indices)
    one_hot = torch.zeros(len(test_f) * k, num_classes).scatter_(1, retrieved.view(-1, 1), 1)
    probs = torch.sum(one_hot.view(len(test_f), -1, num_classes) * distances.clone().div_(T).exp_().view(len(test_f), -1, 1), 1)
    return probs.sort(1, True)[1][:, 0]


def test_predictions_equal_solo_learns_computation_on_random_features():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(500, 16, generator=g), torch.randn(200, 16, generator=g)
    train_y = torch.randint(0, 7, (500,), generator=g)
    for k, T in ((20, 0.07), (5, 0.5), (1, 0.07)):
        ours = weighted_knn(train_f, train_y, test_f, k=k, temperature=T, num_classes=7, chunk=64)
        assert torch.equal(ours, _solo_learn_compute(train_f, train_y, test_f, k, T, 7))


def test_bank_indices_are_spread_evenly():
    assert spread(10, 0) == list(range(10)) and spread(10, 20) == list(range(10))
    assert spread(10, 5) == [0, 2, 4, 6, 8]


@pytest.fixture(scope="module")
def rcm_session(tmp_path_factory):
    """30 steps of the quickstart's RCM pretraining (16 px digits, ViT; the quickstart runs 150), in process,
    through the session a Ray worker runs."""
    from rayrcm.config import apply_overrides, to_dict, validate
    from rayrcm.quickstart import pretrain_config
    from rayrcm.train.selection import Validator, embedding_plot, test_metrics
    from rayrcm.train.session import build_session, run_training

    storage = tmp_path_factory.mktemp("knn")
    cfg = validate(apply_overrides(pretrain_config(), ["train.workers=1", "train.steps=30", "train.checkpoint_every=15",
                                                       f"train.storage_path={storage}", "train.embedding_points=200"]))
    torch.manual_seed(0)
    s = build_session(cfg, to_dict(cfg), device=torch.device("cpu"))
    before = KNNAccuracy.from_config(cfg)
    before.reference = s.bank_set
    untrained = before.metrics(before.counts(s.objective.export(), s.test_set), "test")["test_knn_acc"]
    validator, logged = Validator(s), []
    run_training(s, s.objective, on_log=lambda *_: None, on_checkpoint=lambda step, m: logged.append(validator(step)))
    final, tested = validator.finish(), test_metrics(s)
    embedding_plot(s)
    return s, untrained, logged, final, tested


def test_an_rcm_digits_encoder_is_far_above_chance_by_knn(rcm_session):
    s, untrained, logged, final, tested = rcm_session
    assert [set(m) for m in logged] == [{"val_knn_acc"}]  # at the checkpoint (step 15 of 30)
    assert set(final) == {"val_knn_acc"} and set(tested) == {"test_knn_acc"}
    # chance is 0.1; the untrained ViT's features already give 0.41, 30 steps of RCM 0.56
    assert tested["test_knn_acc"] > 0.45 and tested["test_knn_acc"] > untrained + 0.05
    # the number is the evaluation's own: the same features, reference and votes computed here
    from rayrcm.eval.knn import embed, feature_map, weighted_knn

    enc = s.objective.export().eval()
    fn = feature_map(enc, s.cfg.model.input_scale, s.cfg.model.input_resize)
    ref, ref_y = embed(fn, s.bank_set, range(len(s.bank_set)))
    q, y = embed(fn, s.test_set, range(len(s.test_set)))
    pred = weighted_knn(ref, ref_y, q, k=20, temperature=0.07, num_classes=10)
    assert tested["test_knn_acc"] == pytest.approx((pred == y).float().mean().item())
    assert len(ref) == len(s.bank_set) and not set(s.bank_set.base.indices) & set(s.val_set.base.indices)


def test_the_embedding_map_is_written_for_the_run(rcm_session):
    import pandas as pd

    from rayrcm.train.selection import EMBEDDING_DIR

    s = rcm_session[0]
    out = s.work_dir / EMBEDDING_DIR
    coords = pd.read_csv(out / "embedding.csv")
    assert (out / "embedding.png").stat().st_size > 10_000
    assert len(coords) == 200 and set(coords.columns) == {"x", "y", "label"} and coords["label"].nunique() == 10


def test_a_classifier_evaluation_cannot_run_on_an_encoder():
    from rayrcm.config import ExperimentConfig, apply_overrides, validate
    from rayrcm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.encoder_evals='noisy'.*choose from: knn"):
        validate(apply_overrides(ExperimentConfig(), ["train.encoder_evals=noisy"]), check_paths=False)
    with pytest.raises(ConfigError, match=r"train.knn_k"):
        validate(apply_overrides(ExperimentConfig(), ["train.knn_k=0"]), check_paths=False)
