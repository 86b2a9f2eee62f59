"""Checkpoint save / load / refusal, and the bundled checkpoints' cards."""
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

from app.engine import checkpoints as C
from app.engine import datasets as D
from app.engine.nn.networks import TwoStageNet
from app.engine.types import Volume

TINY = {"kind": "two_stage", "affine": {"kind": "affine", "channels": [4, 4]},
        "deformable": {"kind": "deformable", "enc": [4, 8], "dec": [8], "out_level": 1}}


def tiny_model():
    from app.engine.nn.networks import build_model
    torch.manual_seed(0)
    return build_model(TINY)


def save_tiny(path, paradigm="unsupervised", prep=None, **kw):
    prep = prep or D.Preprocessing(grid_shape=(12, 16, 16), spacing_mm=8.0).to_dict()
    return C.save_checkpoint(path, paradigm=paradigm, model=tiny_model(), preprocessing=prep,
                             training={"steps": 3, "data": "test"}, **kw)


def test_roundtrip_rebuilds_model_strictly(tmp_path):
    p = save_tiny(tmp_path / "m.pt")
    ck = C.load_checkpoint(p, "unsupervised")
    for key in ("format_version", "paradigm", "network", "state_dict", "preprocessing", "training", "created"):
        assert key in ck
    model = ck["model"]
    assert isinstance(model, TwoStageNet) and not model.training
    ref = tiny_model().state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    assert ck["preprocessing"]["grid_shape"] == [12, 16, 16]
    assert ck["preprocessing"]["spatial_dims"] == 3
    assert D.Preprocessing.from_dict(ck["preprocessing"]).grid_shape == (12, 16, 16)


def test_wrong_paradigm_refused(tmp_path):
    p = save_tiny(tmp_path / "m.pt", paradigm="weakly")
    with pytest.raises(ValueError, match="trained for paradigm 'weakly', not 'unsupervised'"):
        C.load_checkpoint(p, "unsupervised")


def test_2d_checkpoint_refused(tmp_path):
    prep = {"grid_shape": [64, 64], "spacing_mm": 2.0}
    p = save_tiny(tmp_path / "m2d.pt", prep=prep)
    with pytest.raises(ValueError, match="2D model"):
        C.load_checkpoint(p, "unsupervised")


def test_not_a_checkpoint_refused(tmp_path):
    txt = tmp_path / "notes.pt"
    txt.write_text("hello, I am not a model")
    with pytest.raises(ValueError, match="not a RegStation checkpoint"):
        C.load_checkpoint(txt)
    other = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="expected keys"):
        C.load_checkpoint(other)
    with pytest.raises(ValueError, match="not found"):
        C.load_checkpoint(tmp_path / "missing.pt")


def test_mismatched_weights_refused(tmp_path):
    p = save_tiny(tmp_path / "m.pt")
    ck = torch.load(p, weights_only=True)
    ck["network"]["deformable"]["enc"] = [4, 16]
    torch.save(ck, p)
    with pytest.raises(ValueError, match="do not fit"):
        C.load_checkpoint(p)


def test_newer_format_refused(tmp_path):
    p = save_tiny(tmp_path / "m.pt")
    ck = torch.load(p, weights_only=True)
    ck["format_version"] = C.FORMAT_VERSION + 1
    torch.save(ck, p)
    with pytest.raises(ValueError, match="format"):
        C.load_checkpoint(p)


class _Evil:
    """Unpickling this would create a file (a stand-in for arbitrary code execution)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("container", ["torch", "pickle"])
def test_foreign_pickle_refused_without_executing(tmp_path, container):
    target = tmp_path / "pwned.txt"
    p = tmp_path / "evil.pt"
    payload = {"format_version": 1, "paradigm": "unsupervised", "network": TINY, "state_dict": {},
               "preprocessing": {}, "hook": _Evil(str(target))}
    if container == "torch":
        torch.save(payload, p)
        assert zipfile.is_zipfile(p)
    else:
        with open(p, "wb") as fh:
            pickle.dump(payload, fh)
    with pytest.raises(ValueError, match="foreign or unsafe pickle|not a RegStation checkpoint"):
        C.load_checkpoint(p)
    assert not target.exists()


def test_cards_and_listing(tmp_path):
    p = save_tiny(tmp_path / "unsupervised.pt")
    save_tiny(tmp_path / "other.pt", paradigm="weakly")
    (tmp_path / "junk.pt").write_text("junk")
    card = C.read_card(p)                     # no card file: metadata from the checkpoint
    assert card["paradigm"] == "unsupervised" and "state_dict" not in card
    C.write_card(p, {"title": "tiny", "paradigm": "unsupervised", "test": {"dice": 0.5}})
    assert C.read_card(p)["test"]["dice"] == 0.5
    assert C.card_paths(p)[1].read_text().startswith("# tiny")
    assert C.list_checkpoints("unsupervised", tmp_path) == [p]
    assert C.list_checkpoints("weakly", tmp_path) == [tmp_path / "other.pt"]


def test_default_checkpoint_missing_is_a_clear_error():
    with pytest.raises(ValueError, match="no bundled checkpoint"):
        C.default_checkpoint("unsupervised", "no_such_variant")


def test_grid_compatibility_checks():
    prep = D.Preprocessing()
    ok = Volume(np.zeros((90, 120, 120), np.float32), (2, 2, 2), direction=np.asarray(D.IXI_DIRECTION).T)
    D.check_compatible(ok, prep)
    with pytest.raises(ValueError, match="2D"):
        D.check_compatible(Volume(np.zeros((1, 120, 120), np.float32), (2, 2, 2)), prep)
    with pytest.raises(ValueError, match="cannot be resampled"):
        D.check_compatible(Volume(np.zeros((20, 20, 20), np.float32), (0.5, 0.5, 0.5)), prep)


@pytest.mark.parametrize("path", C.list_checkpoints("unsupervised") + C.list_checkpoints("weakly"),
                         ids=lambda p: p.name)
def test_bundled_checkpoints_load_and_have_cards(path):
    ck = C.load_checkpoint(path)
    assert isinstance(ck["model"], TwoStageNet)
    card = json.loads(C.card_paths(path)[0].read_text())
    assert card["paradigm"] == ck["paradigm"]
    assert path.stat().st_size < 8 * 2**20


def test_lineage_lists_the_runs_first_to_last(tmp_path):
    first = {"stage": "affine", "steps": 10, "losses": {"similarity": "lncc", "lncc_window": 9}}
    second = {"stage": "deformable", "steps": 20, "losses": {"similarity": "lncc", "lncc_window": 5, "w_dice": 1.0},
              "init": {"stages_loaded": {"affine": "/x/a.pt"}, "training": first}}
    lines = C.lineage(second)
    assert lines == ["affine stage, 10 steps; lncc window 9",
                     "deformable stage, 20 steps; lncc window 5; w_dice 1.0; started from affine of a.pt"]
    pt = tmp_path / "m.pt"
    C.write_card(pt, {"title": "m", "training": second})
    md = C.card_paths(pt)[1].read_text()
    assert "## lineage" in md and "started from affine of a.pt" in md and "stages_loaded" not in md


def test_a_network_kind_the_paradigm_does_not_accept_is_refused(tmp_path):
    """A checkpoint names its paradigm and its network kind: both must fit the paradigm."""
    from app.engine.nn.registry import build_network
    from app.engine.paradigms.unsupervised import UnsupervisedRegistrar
    net = build_network({"kind": "deformable", "enc": [4, 8], "dec": [8], "out_level": 1})
    p = C.save_checkpoint(tmp_path / "field_only.pt", paradigm="unsupervised", model=net,
                          preprocessing=D.Preprocessing(grid_shape=(12, 16, 16), spacing_mm=8.0).to_dict())
    assert C.load_checkpoint(p, "unsupervised")["network"]["kind"] == "deformable"   # no kinds: accepted
    with pytest.raises(ValueError, match="holds a 'deformable' network; it needs 'two_stage'"):
        C.load_checkpoint(p, "unsupervised", kinds=("two_stage",))
    vol = Volume(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), (4, 4, 4))
    with pytest.raises(ValueError, match="needs 'two_stage'"):
        UnsupervisedRegistrar().register(vol, vol, None, checkpoint=p, device="cpu")


def test_network_registry_rebuilds_and_refuses_unknown_kinds():
    from app.engine.nn import registry
    again = registry.build_network(tiny_model().config)
    assert isinstance(again, TwoStageNet)
    with pytest.raises(ValueError, match="unknown network kind 'nope'; kinds: .*two_stage"):
        registry.build_network({"kind": "nope"})
    with pytest.raises(ValueError, match="already registered"):
        registry.register_network("two_stage", "somewhere:Else")
