"""scripts/export.py: each exported file, loaded by its own runtime, reproduces the PyTorch model
for any batch size, and the sidecar JSON describes the preprocessing cspx actually applies."""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from conftest import run_py
from cspx import export as ex
from cspx.checkpoint import FORMAT, FORMAT_VERSION
from cspx.errors import run_cli
from cspx.models import create_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import export as script  # noqa: E402

# torch 2.9+ deprecates the TorchScript-based ONNX exporter and 2.14 TorchScript itself
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

TINY, SIZE, CLASSES = "cspresnext_tiny", 64, [f"n{i:08d}" for i in range(10)]
TOL = 1e-4


def trained_like(name: str, num_classes: int, seed: int) -> torch.nn.Module:
    """Random weights with BN statistics and logits of a trained model's scale (freshly
    initialised ones give near-zero logits, against which any export would look exact)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes, zero_init_last=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
        model.head.fc.weight.mul_(100)
    return model.eval()


def cli(argv):
    """(exit code, stdout, stderr) of scripts/export.py run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_cli(script.main, [str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A cspx checkpoint (model and distinct EMA weights, class list) and a non-square JPEG."""
    d = tmp_path_factory.mktemp("export")
    model, ema = trained_like(TINY, 10, 1), trained_like(TINY, 10, 2)
    ckpt = d / "tiny.pt"
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.state_dict(),
                "ema": ema.state_dict(), "model_name": TINY, "num_classes": 10,
                "classes": CLASSES}, ckpt)
    image = d / "photo.jpg"
    Image.effect_noise((97, 71), 60).convert("RGB").save(image, "JPEG")
    return {"dir": d, "ckpt": ckpt, "model": model, "ema": ema, "image": image}


@pytest.fixture(scope="module")
def exported(tiny):
    """`--format all --ema` on the tiny checkpoint: (prefix, stdout, stderr)."""
    prefix = tiny["dir"] / "out" / "tiny"
    rc, out, err = cli(["--checkpoint", tiny["ckpt"], "--ema", "--img-size", SIZE,
                        "--image", tiny["image"], "--out", prefix])
    assert rc == 0, err
    return prefix, out, err


def load_runner(fmt, path):
    """Independent of cspx.export: each runtime's own loader."""
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed "
                                                        "(pip install -e '.[dev]')")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    return torch.export.load(str(path)).module()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "export"])
def test_export_matches_pytorch(tiny, exported, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="onnx not installed (pip install -e '.[dev]')")
    prefix, _, _ = exported
    path = Path(str(prefix) + ex.SUFFIX[fmt])
    assert path.is_file()
    run = load_runner(fmt, path)
    gen = torch.Generator().manual_seed(7)
    for batch in (1, 3):  # the trace used 2: both prove the batch axis is dynamic
        x = torch.randn(batch, 3, SIZE, SIZE, generator=gen)
        with torch.no_grad():
            ref, got, other = tiny["ema"](x), run(x), tiny["model"](x)
        assert got.shape == (batch, 10)
        assert (got - ref).abs().max().item() <= TOL
        assert (got - other).abs().max().item() > 1.0  # --ema exported the EMA weights
    assert ref.abs().max() > 1.0  # logits of a real scale, so the comparison means something


def test_onnx_batch_axis_is_symbolic(exported):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    prefix, _, _ = exported
    session = ort.InferenceSession(str(prefix) + ".onnx", providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, SIZE, SIZE]
    assert isinstance(out.shape[0], str) and out.shape[1:] == [10]


def test_preprocessing_json(tiny, exported):
    prefix, out, err = exported
    meta = json.loads(Path(str(prefix) + ".json").read_text())
    pre = meta["preprocessing"]
    assert pre["img_size"] == SIZE and pre["crop_pct"] == 0.875
    assert pre["resize_shorter_side"] == 73  # floor(64 / 0.875)
    assert pre["center_crop"] == [SIZE, SIZE] and pre["interpolation"] == "bilinear"
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    assert pre["channel_order"] == "RGB"
    assert meta["input"] == {"name": "input", "shape": ["batch", 3, SIZE, SIZE],
                             "dtype": "float32", "layout": "NCHW", "channel_order": "RGB"}
    assert meta["output"]["shape"] == ["batch", 10]
    assert meta["num_classes"] == 10 and meta["classes"] == CLASSES
    assert meta["model"] == TINY and meta["weights"] == "EMA"
    formats = ["onnx", "torchscript", "export"] if "onnx" in meta["artefacts"] else \
        ["torchscript", "export"]
    for fmt in formats:
        assert meta["artefacts"][fmt]["file"] == "tiny" + ex.SUFFIX[fmt]
        check = meta["verification"][fmt]
        assert check.get("ok") or "onnxruntime" in check.get("skipped", ""), check
    assert "resize_shorter_side: 73" in out and "verification:" in out  # printed as well
    assert f"{tiny['image']}: n" in out  # the image's top-5, named by the class list


def test_json_describes_cspx_preprocessing(tiny, exported):
    """The JSON's recipe, rebuilt with plain torchvision, gives exactly the tensor cspx feeds the
    model for the --image check."""
    prefix, _, _ = exported
    pre = json.loads(Path(str(prefix) + ".json").read_text())["preprocessing"]
    tf = T.Compose([T.Resize(pre["resize_shorter_side"],
                             interpolation=T.InterpolationMode(pre["interpolation"])),
                    T.CenterCrop(pre["center_crop"]), T.ToTensor(),
                    T.Normalize(pre["mean"], pre["std"])])
    expected = tf(Image.open(tiny["image"]).convert("RGB")).unsqueeze(0)
    got = ex.check_inputs(SIZE, 0.875, "bilinear", [str(tiny["image"])])[-1]
    assert torch.equal(got, expected)


def test_defaults_follow_model_card():
    pre = ex.preprocessing(224, 0.875, "bilinear")
    assert pre["resize_shorter_side"] == 256 and pre["center_crop"] == [224, 224]
    args = script.parse(["--checkpoint", "c.pt", "--out", "x"])
    # not given: the model's evaluation preset, which for cspresnext50 is the model card's
    assert (args.img_size, args.crop_pct, args.interpolation, args.format) == \
        (None, None, None, "all")
    from cspx.models import EvalPreset, eval_preset
    assert eval_preset("cspresnext50") == EvalPreset(224, 0.875, "bilinear")
    assert ex.out_prefix("dir/m.onnx") == ex.out_prefix("dir/m.pt2") == "dir/m"


def test_missing_checkpoint_is_one_line_exit_2(tmp_path):
    r = run_py(["scripts/export.py", "--checkpoint", str(tmp_path / "nope.pt"),
                "--out", str(tmp_path / "x")], timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {tmp_path / 'nope.pt'}: weights file not found"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra, message", [
    (["--model", "resnet50"], "--model: unknown model 'resnet50'"),
    (["--format", "tflite"], "--format: unknown format 'tflite'"),
    (["--interpolation", "lanczos"], "--interpolation: unknown 'lanczos'"),
    (["--img-size", "16"], "--img-size: 16 px"),
])
def test_bad_input_is_one_line_exit_2(tiny, tmp_path, extra, message):
    rc, out, err = cli(["--checkpoint", tiny["ckpt"], "--out", tmp_path / "x", *extra])
    assert rc == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_ema_requested_but_absent(tiny, tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(tiny["model"].state_dict(), plain)
    rc, _, err = cli(["--checkpoint", plain, "--model", TINY, "--ema", "--out", tmp_path / "x"])
    assert rc == 2 and "--ema given but the checkpoint holds no EMA weights" in err


def test_mismatch_exits_1(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "TOLERANCE", -1.0)  # no file can pass: the failure path runs
    rc, _, err = cli(["--checkpoint", tiny["ckpt"], "--format", "torchscript",
                      "--img-size", SIZE, "--out", tmp_path / "x"])
    assert rc == 1 and "torchscript output differs from PyTorch" in err.splitlines()[-1]
    assert json.loads((tmp_path / "x.json").read_text())["verification"]["torchscript"]["ok"] \
        is False


def test_onnx_check_skipped_without_onnxruntime(tiny, tmp_path, monkeypatch):
    pytest.importorskip("onnx", reason="onnx not installed")
    real = ex.has_module
    monkeypatch.setattr(ex, "has_module", lambda name: name != "onnxruntime" and real(name))
    rc, out, err = cli(["--checkpoint", tiny["ckpt"], "--format", "onnx", "--img-size", SIZE,
                        "--out", tmp_path / "x"])
    assert rc == 0 and (tmp_path / "x.onnx").is_file()
    assert ("onnx: wrote" in err and "verification skipped: onnxruntime is not installed "
            "(pip install 'cspx[export]')" in err), err


def test_cspresnext50_from_timm_state_dict(tmp_path):
    """Full size at 224 px from a timm-format state_dict (as released), via torch.export."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("cspresnext50", pretrained=False).eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.0)
    ckpt = tmp_path / "cspresnext50_timm.pth"
    torch.save(ref.state_dict(), ckpt)
    rc, out, err = cli(["--checkpoint", ckpt, "--format", "export", "--out", tmp_path / "c50"])
    assert rc == 0, err
    assert json.loads((tmp_path / "c50.json").read_text())["model"] == "cspresnext50"
    program = torch.export.load(str(tmp_path / "c50.pt2")).module()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (program(x) - ref(x)).abs().max().item() <= TOL
