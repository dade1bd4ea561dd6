"""LoRA on q and v of a timm ViT (``model.lora_rank``, ``model.lora_alpha``): the FT-CADIS ImageNet
recipe (``third_party/lora_vit/lora.py:324-421``). CPU, small digits ViTs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from rayrcm.config import ExperimentConfig, apply_overrides, to_dict, validate
from rayrcm.errors import ConfigError
from rayrcm.models import build_classifier
from rayrcm.models.export import build_from_file
from rayrcm.models.lora import LORA_NAMES, LoRAQKV, apply_lora, merge_lora
from rayrcm.train.checkpoint import load_state, model_meta, save_model, save_state

SIZE, CLASSES = 8, 10


def lora_parameters(module):
    """The ``A`` and ``B`` weights of every LoRA layer in ``module``."""
    layers = [m for m in module.modules() if isinstance(m, LoRAQKV)]
    return [p for m in layers for n in LORA_NAMES for p in getattr(m, n).parameters()]


def _cfg(*extra: str) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), ["method.name=gaussian", f"data.image_size={SIZE}",
                                                "model.patch_size=4", *extra])


def _lora_classifier(rank: int = 4, alpha: float = 4.0, seed: int = 0):
    torch.manual_seed(seed)
    cfg = _cfg(f"model.lora_rank={rank}", f"model.lora_alpha={alpha}")
    return cfg, build_classifier(cfg.model, SIZE, CLASSES).eval()


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _randomize_b(model: torch.nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAQKV):
                for b in (m.lora_b_q, m.lora_b_v):
                    b.weight.copy_(0.1 * torch.randn(b.weight.shape, generator=g))


def test_at_initialisation_the_output_is_the_base_models_exactly():
    torch.manual_seed(0)
    base = build_classifier(_cfg().model, SIZE, CLASSES).eval()
    wrapped = copy.deepcopy(base)
    apply_lora(wrapped.encoder.model, 4, 4.0)
    x = _images()
    assert torch.equal(wrapped(x), base(x))
    # the config path: a plain classifier's state dict (no LoRA keys) loads into the LoRA one, B stays 0
    _, lora = _lora_classifier()
    lora.load_state_dict(base.state_dict(), strict=True)
    assert torch.equal(lora(x), base(x))
    qkv = lora.encoder.model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRAQKV) and qkv.scaling == 1.0 and not qkv.lora_b_q.weight.any()
    assert qkv.lora_a_q.weight.abs().max() > 0  # A: kaiming-uniform, as nn.Linear and the authors


def test_only_lora_and_head_parameters_train():
    _, clf = _lora_classifier()
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    for n in trainable:
        assert n.startswith("head.") or any(f".{k}." in n for k in ("lora_a_q", "lora_b_q", "lora_a_v", "lora_b_v")), n
    blocks = len(clf.encoder.model.blocks)
    assert len(lora_parameters(clf)) == 4 * blocks
    assert {"head.weight", "head.bias"} <= trainable and len(trainable) == 4 * blocks + 2
    assert not clf.encoder.model.blocks[0].attn.qkv.weight.requires_grad
    assert not clf.encoder.model.patch_embed.proj.weight.requires_grad


def test_a_gradient_step_moves_q_and_v_but_not_k():
    _, clf = _lora_classifier()
    clf.train()
    d = clf.encoder.model.embed_dim
    before = [copy.deepcopy(b.attn.qkv) for b in clf.encoder.model.blocks]
    opt = torch.optim.SGD([p for p in clf.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # the first step moves B (A's gradient is 0 while B = 0), the second moves A too
        opt.zero_grad()
        F.cross_entropy(clf(_images(8)), torch.arange(8) % CLASSES).backward()
        opt.step()
    for old, blk in zip(before, clf.encoder.model.blocks):
        new = blk.attn.qkv
        assert torch.equal(new.weight, old.weight)  # frozen base
        w_old, w_new = old.weight + old.delta_weight(), new.weight + new.delta_weight()
        assert not torch.equal(w_new[:d], w_old[:d]), "q slice did not change"
        assert torch.equal(w_new[d:2 * d], w_old[d:2 * d]), "k slice changed"
        assert not torch.equal(w_new[2 * d:], w_old[2 * d:]), "v slice did not change"
        assert not torch.equal(new.lora_a_q.weight, old.lora_a_q.weight)


def test_merged_weights_compute_the_unmerged_function():
    cfg, clf = _lora_classifier(rank=2, alpha=3.0)
    _randomize_b(clf)
    x = _images()
    unmerged = clf(x)
    merged = merge_lora(copy.deepcopy(clf))
    assert not any(isinstance(m, LoRAQKV) for m in merged.modules())
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)
    plain = build_classifier(_cfg().model, SIZE, CLASSES).eval()  # merged = a plain classifier's keys
    plain.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(plain(x), unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmerged, build_classifier(_cfg().model, SIZE, CLASSES).eval()(x))


def test_exported_lora_classifier_reloads_through_the_certification_loader(tmp_path):
    cfg, clf = _lora_classifier()
    _randomize_b(clf)
    path = tmp_path / "model.pt"
    save_model(path, clf, model_meta(to_dict(cfg), "classifier", CLASSES))
    rebuilt, meta = build_from_file(path)
    assert meta["config"]["model"]["lora_rank"] == 4
    assert isinstance(rebuilt.encoder.model.blocks[-1].attn.qkv, LoRAQKV)
    x = _images()
    assert torch.equal(rebuilt.eval()(x), clf(x))


def test_checkpoint_state_keeps_the_lora_parameters(tmp_path):
    _, clf = _lora_classifier()
    _randomize_b(clf)
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad])
    save_state(tmp_path, clf, opt, None, 3, {})
    state = load_state(tmp_path)
    assert any(k.endswith("attn.qkv.lora_b_v.weight") for k in state["objective"])
    _, fresh = _lora_classifier(seed=5)
    fresh.load_state_dict(state["objective"], strict=True)
    for a, b in zip(lora_parameters(fresh), lora_parameters(clf)):
        assert torch.equal(a, b)


def test_layer_decay_groups_hold_only_the_trainable_parameters():
    from rayrcm.sections import OptimConfig
    from rayrcm.train.optim import param_groups

    _, clf = _lora_classifier()
    groups = param_groups(clf, clf, OptimConfig(layer_decay=0.65, weight_decay=0.04))
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in clf.parameters() if p.requires_grad}


@pytest.mark.parametrize("override, key", [
    ("model.lora_rank=-1", "model.lora_rank"),
    ("model.lora_alpha=0", "model.lora_alpha"),
    ("model.lora_alpha=nan", "model.lora_alpha"),
])
def test_bad_lora_values_are_one_line(override, key):
    with pytest.raises(ConfigError) as err:
        validate(_cfg(override))
    assert err.value.key == key and "\n" not in str(err.value)


def test_lora_on_an_encoder_without_attention_is_one_line():
    cfg = apply_overrides(ExperimentConfig(), ["method.name=gaussian", "model.encoder=cifar_resnet8",
                                               "model.lora_rank=4"])
    with pytest.raises(ConfigError) as err:
        build_classifier(cfg.model, 8, CLASSES)
    assert err.value.key == "model.lora_rank" and "\n" not in str(err.value)


def test_a_plain_encoder_file_initialises_the_lora_classifier(tmp_path):
    torch.manual_seed(0)
    base = build_classifier(_cfg().model, SIZE, CLASSES).eval()
    torch.save({"model": base.encoder.state_dict(), "meta": {"encoder": "vit_digits"}}, tmp_path / "enc.pt")
    cfg = _cfg("model.lora_rank=4", f"model.init_from={tmp_path / 'enc.pt'}")
    clf = build_classifier(cfg.model, SIZE, CLASSES).eval()
    clf.head.load_state_dict(base.head.state_dict())
    assert torch.equal(clf(_images()), base(_images()))


def test_cadis_fine_tunes_only_lora_and_head_through_its_frozen_attack():
    from torch import nn

    from rayrcm.objectives.cadis import CADISConfig, CADISObjective

    class Clip(nn.Module):  # a stand-in denoiser: noisy image -> clean image in [0, 1]
        def forward(self, y, sigma):
            return y.clamp(0, 1)

    cfg, clf = _lora_classifier()
    frozen = {n for n, p in clf.named_parameters() if not p.requires_grad}
    obj = CADISObjective(CADISConfig(sigma=0.25, m=2, steps=1, lbd=1.0), clf.train(), Clip())
    out = obj([_images(4)], torch.tensor([0, 1, 2, 3]), 0)
    out.loss.backward()
    assert {n for n, p in clf.named_parameters() if not p.requires_grad} == frozen  # restored after the attack
    grads = {n for n, p in clf.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("head.") or ".lora_" in n for n in grads)
    assert any(".lora_b_" in n for n in grads)
