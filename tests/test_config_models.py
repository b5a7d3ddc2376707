"""Config layering and errors; every stage and toggle builds and trains a step."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.config import STAGES, Config, ConfigError, build, parse_set
from pipeline.models import FerClassifier, build_model
from tests.conftest import ROOT

STAGE_FILES = sorted((ROOT / "ablations" / "stages").glob("*.yaml"))


def test_every_stage_has_a_yaml_that_loads():
    assert {p.stem for p in STAGE_FILES} == set(STAGES)
    for p in STAGE_FILES:
        assert build(p).stage == p.stem


def test_layers_and_overrides():
    cfg = build(ROOT / "ablations/stages/improved.yaml",
                parse_set(["epochs=1", "tta=false", "lr=0.01 width=0.5"]))
    assert (cfg.epochs, cfg.tta, cfg.lr, cfg.width) == (1, False, 0.01, 0.5)
    assert cfg.label_smoothing == 0.1  # from the YAML
    assert Config().label_smoothing == 0.0  # the default underneath


@pytest.mark.parametrize("item, needle", [
    ("epoch=3", "unknown key 'epoch'. Valid keys: augment"),
    ("epochs=two", "epochs='two' is a str; expected int"),
    ("tta=3", "expected bool"),
    ("scheduler=linear", "choose one of plateau, cosine, onecycle, step, none"),
    ("data_fraction=1.5", "out of range"),
    ("lr=0", "out of range"),
    ("stage=vgg", "choose one of basic"),
    ("device=tpu", "expected auto, cpu, cuda"),
    ("noequals", "expected key=value"),
])
def test_bad_overrides_say_what_is_valid(item, needle):
    with pytest.raises(ConfigError, match=None) as e:
        build(ROOT / "ablations/stages/basic.yaml", parse_set([item]))
    assert needle in str(e.value)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: basic\nbogus: 1\n")
    with pytest.raises(ConfigError, match=f"{p}: unknown key 'bogus'"):
        build(p)
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        build(p)


COMBOS = [(s, bn, res) for s, bn, res in itertools.product(STAGES, (True, False), (True, False))]


@pytest.mark.parametrize("stage, bn, residual", COMBOS)
def test_every_stage_and_toggle_trains_a_step(stage, bn, residual):
    cfg = Config(stage=stage, batchnorm=bn, residual=residual, width=0.125, conv_dropout=0.1)
    model = build_model(cfg)
    x = torch.randn(4, 1, 48, 48)
    out = model(x)
    assert out.shape == (4, 7)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    has_bn = any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d))
                 for m in model.modules())
    assert has_bn == bn


def test_residual_toggle_changes_the_network():
    plain = build_model(Config(stage="resnet", residual=False, width=0.125))
    skip = build_model(Config(stage="resnet", residual=True, width=0.125))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(skip) > n(plain)  # the 1x1 projections
    conv_plain = build_model(Config(stage="improved", residual=False, width=0.125))
    conv_skip = build_model(Config(stage="improved", residual=True, width=0.125))
    assert n(conv_skip) > n(conv_plain)


def test_design_shapes():
    """The head widths the study describes."""
    m = build_model(Config(stage="improved"))
    assert m.head[1].in_features == 256 * 6 * 6 and m.head[1].out_features == 512
    b = build_model(Config(stage="basic", batchnorm=False))
    assert b.head[1].in_features == 128 * 6 * 6 and b.head[1].out_features == 512
    r = build_model(Config(stage="resnet", residual=True))
    assert r.stem[0].kernel_size == (7, 7) and r.head[-1].in_features == 512


def test_classifier_takes_raw_pixels():
    clf = FerClassifier(build_model(Config(stage="basic", width=0.125)), "symmetric").eval()
    p = clf(torch.randint(0, 256, (3, 48, 48)).float())
    assert p.shape == (3, 7) and torch.allclose(p.sum(1), torch.ones(3), atol=1e-5)
