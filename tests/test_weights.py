"""Weight loading: every file layout the project meets loads, and every bad file is one clear
CspxError line that names the file."""
from __future__ import annotations

import argparse
import os

import pytest
import timm
import torch

from cspx.checkpoint import FORMAT, FORMAT_VERSION
from cspx.errors import CspxError
from cspx.models import create_model
from cspx.weights import load_into, load_weights

TINY = "cspresnext_tiny"


def tiny_state(seed: int, num_classes: int = 1000):
    torch.manual_seed(seed)
    return create_model(TINY, num_classes=num_classes, zero_init_last=False).state_dict()


@pytest.fixture(scope="module")
def weights():
    return tiny_state(1), tiny_state(2)  # (model, EMA): distinguishable values


def save(tmp_path, obj, name="ckpt.pt", **kw):
    path = str(tmp_path / name)
    torch.save(obj, path, **kw)
    return path


def cspx_ckpt(sd, ema):
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": sd, "ema": ema,
            "optimizer": {"state": {}, "param_groups": []}, "model_name": TINY,
            "num_classes": 1000, "progress": {"step": 10}}


def assert_loaded(model, expected):
    got = model.state_dict()
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def assert_fails(path, pattern, **kw):
    with pytest.raises(CspxError) as e:
        load_into(create_model(TINY), path, **kw)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    assert pattern in msg, msg
    return msg


# ---- accepted layouts --------------------------------------------------------------------------
@pytest.mark.parametrize("prefer_ema", [False, True])
def test_cspx_checkpoint(tmp_path, weights, prefer_ema):
    sd, ema = weights
    path = save(tmp_path, cspx_ckpt(sd, ema))
    model = create_model(TINY)
    info = load_into(model, path, prefer_ema=prefer_ema)
    assert_loaded(model, ema if prefer_ema else sd)
    assert info["kind"] == "cspx" and info["ema"] is prefer_ema
    assert info["model_name"] == TINY and info["num_classes"] == 1000 and info["dropped"] == []


def test_cspx_checkpoint_without_ema_falls_back(tmp_path, weights):
    path = save(tmp_path, cspx_ckpt(weights[0], None))
    model = create_model(TINY)
    info = load_into(model, path, prefer_ema=True)
    assert_loaded(model, weights[0])
    assert info["ema"] is False and "no EMA weights" in str(info)


@pytest.mark.parametrize("layout,prefer_ema,expect,kind", [
    ("plain", False, 0, "plain"),
    ("plain", True, 0, "plain"),
    ("state_dict", False, 0, "state_dict"),
    ("model", False, 0, "model"),
    ("state_dict+ema", False, 0, "state_dict"),
    ("state_dict+ema", True, 1, "state_dict_ema"),
    ("ema_only", False, 1, "state_dict_ema"),
    ("model+model_ema", True, 1, "model_ema"),
])
def test_dict_layouts(tmp_path, weights, layout, prefer_ema, expect, kind):
    sd, ema = weights
    obj = {"plain": sd,
           "state_dict": {"state_dict": sd, "epoch": 3, "arch": TINY},
           "model": {"model": sd, "epoch": 3},
           "state_dict+ema": {"state_dict": sd, "state_dict_ema": ema},
           "ema_only": {"state_dict_ema": ema},
           "model+model_ema": {"model": sd, "model_ema": ema}}[layout]
    path = save(tmp_path, obj)
    model = create_model(TINY)
    info = load_into(model, path, prefer_ema=prefer_ema)
    assert_loaded(model, weights[expect])
    assert info["kind"] == kind and info["ema"] is (expect == 1)
    state, info2 = load_weights(path, prefer_ema=prefer_ema)
    assert info2["kind"] == kind and set(state) == set(sd)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.",
                                    "_orig_mod.module.", "module.module."])
def test_prefixes_are_stripped(tmp_path, weights, prefix):
    sd = {prefix + k: v for k, v in weights[0].items()}
    path = save(tmp_path, {"state_dict": sd})
    model = create_model(TINY)
    load_into(model, path)
    assert_loaded(model, weights[0])


def test_load_into_wrapped_model(tmp_path, weights):
    """A torch.compile'd model (keys under _orig_mod.) gets the weights of its inner module."""
    path = save(tmp_path, weights[0])
    model = create_model(TINY)
    load_into(torch.compile(model), path)
    assert_loaded(model, weights[0])


def test_timm_release_layout_into_cspresnext50(tmp_path):
    """timm's cspresnext50_ra_224-648b4713.pth is a plain state_dict of timm's model."""
    ref = timm.create_model("cspresnext50")
    path = save(tmp_path, ref.state_dict(), "cspresnext50_ra_224-648b4713.pth")
    model = create_model("cspresnext50")
    info = load_into(model, path)
    assert_loaded(model, ref.state_dict())
    assert info["kind"] == "plain" and info["num_classes"] == 1000


def test_legacy_serialization(tmp_path, weights):
    path = save(tmp_path, weights[0], _use_new_zipfile_serialization=False)
    model = create_model(TINY)
    load_into(model, path)
    assert_loaded(model, weights[0])


# ---- fine-tuning with another class count ------------------------------------------------------
def test_drop_classifier_if_mismatch(tmp_path, weights):
    path = save(tmp_path, cspx_ckpt(weights[0], None))
    model = create_model(TINY, num_classes=10)
    own_fc = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.fc.")}
    info = load_into(model, path, drop_classifier_if_mismatch=True)
    assert info["dropped"] == ["head.fc.bias", "head.fc.weight"]
    assert "dropped classifier: checkpoint has 1000 classes, model has 10" in str(info)
    got = model.state_dict()
    for k, v in weights[0].items():
        assert torch.equal(got[k], own_fc[k] if k in own_fc else v), k
    # same class count: nothing is dropped
    same = create_model(TINY)
    assert load_into(same, path, drop_classifier_if_mismatch=True)["dropped"] == []
    assert_loaded(same, weights[0])


def test_non_strict_reports_missing_and_unexpected(tmp_path, weights):
    sd = dict(weights[0])
    sd.pop("stem.conv1.conv.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = save(tmp_path, sd)
    info = load_into(create_model(TINY), path, strict=False)
    assert info["missing"] == ["stem.conv1.conv.weight"] and info["unexpected"] == ["extra.weight"]


# ---- bad input ---------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    assert_fails(str(tmp_path / "nope.pt"), "not found")


def test_directory(tmp_path):
    assert_fails(str(tmp_path), "is a directory")


def test_text_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    assert_fails(str(path), "not a PyTorch checkpoint")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pt"
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(b"\x13" + data)
    assert_fails(str(path), "not a PyTorch checkpoint")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert_fails(str(path), "empty file")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint(tmp_path, weights, legacy):
    path = save(tmp_path, cspx_ckpt(*weights), _use_new_zipfile_serialization=not legacy)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    assert_fails(path, "truncated or corrupt")


def test_wrong_architecture(tmp_path):
    path = save(tmp_path, timm.create_model("resnet18").state_dict(), "resnet18.pth")
    msg = assert_fails(path, "does not match cspresnext_tiny: ")
    assert ("missing keys (stem.conv1.conv.weight, stem.conv1.bn.weight, stem.conv1.bn.bias, ...)"
            in msg)
    assert "unexpected keys (conv1.weight, bn1.weight, bn1.bias, ...)" in msg
    assert "1 shape mismatches (fc.weight" not in msg  # resnet's fc is under another name


def test_wrong_class_count_without_drop(tmp_path):
    path = save(tmp_path, cspx_ckpt(tiny_state(1, num_classes=10), None))
    msg = assert_fails(path, "2 shape mismatches (head.fc.weight: checkpoint [10, 256] vs "
                             "model [1000, 256], head.fc.bias: checkpoint [10] vs model [1000])")
    assert "missing" not in msg and "unexpected" not in msg


def test_other_cspx_model_is_named(tmp_path):
    torch.manual_seed(0)
    other = create_model(TINY, depth=(1, 1, 1, 1)).state_dict()
    path = save(tmp_path, {**cspx_ckpt(other, None), "model_name": "cspresnext_other"})
    assert_fails(path, "does not match cspresnext_tiny (checkpoint is cspresnext_other): "
                       "15 missing keys (stages.2.blocks.1.conv1.conv.weight")


class _Boom:
    """Unpickling this would create a directory: proof that pickled code is never run."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_pickled_code_is_refused_not_run(tmp_path, weights):
    marker = str(tmp_path / "pwned")
    path = save(tmp_path, {"state_dict": weights[0], "hook": _Boom(marker)})
    assert_fails(path, "mkdir) that a weights-only load refuses")
    assert not os.path.exists(marker)


def test_timm_train_checkpoint_with_args_is_explained(tmp_path, weights):
    path = save(tmp_path, {"state_dict": weights[0], "args": argparse.Namespace(lr=0.1)})
    assert_fails(path, "holds a Python object (argparse.Namespace) that a weights-only load")


@pytest.mark.parametrize("obj,pattern", [
    (torch.zeros(3), "holds a Tensor, not model weights"),
    ({"epoch": 3, "optimizer": {}}, "no model weights found (top-level keys: epoch, optimizer)"),
    ({"state_dict": {"a": 1}}, "is not a state_dict ('a' holds a int"),
    ({"format": FORMAT, "format_version": FORMAT_VERSION, "model": {}}, "holds no weights"),
    ({"format": FORMAT, "format_version": FORMAT_VERSION + 1, "model": {}}, "newer cspx"),
])
def test_not_weights(tmp_path, obj, pattern):
    assert_fails(save(tmp_path, obj), pattern)
