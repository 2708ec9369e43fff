"""`lddm-export build`, `inspect` and `doctor` through the CLI: the bundle, its manifest, the
export cache, atomic replacement, and a clear refusal of every bad input."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from fixtures import tiny_checkpoint
from lddm_export import build
from lddm_export.cli import cli, main
from lddm_export.commands.doctor import jetpack_release
from runtimes.bundle import Bundle, sha256_file

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="module")
def ckpt(workdir) -> Path:
    return tiny_checkpoint(workdir / "mdlm.pt", "mdlm")


@pytest.fixture(scope="module")
def bundle(workdir, ckpt) -> Path:
    """One FP32 + FP16 bundle of the tiny MDLM checkpoint, built through the CLI."""
    out = workdir / "bundle"
    result = CliRunner().invoke(cli, ["build", "--ckpt", str(ckpt), "--out", str(out), "--engines", "off",
                                      "--batch", "1,4,16"])
    assert result.exit_code == 0, result.output
    return out


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """Run the real entry point (its error handling included); return (exit code, stderr+stdout)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
        sys.exit(0)
    captured = capsys.readouterr()
    return info.value.code, captured.err + captured.out


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ----------------------------------------------------------------------------- the bundle

def test_bundle_layout_and_manifest(bundle, ckpt):
    b = Bundle.open(bundle)  # runtimes' reader: schema and every file's sha256
    m = b.manifest
    onnx_files = [f"onnx/{g}.{p}.onnx" for g in ("denoiser", "head", "trunk") for p in ("fp16", "fp32")]
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) == [
        "manifest.json", *onnx_files]
    assert m["files"] == {rel: sha256_file(bundle / rel) for rel in onnx_files}
    assert m["checkpoint"] == {"path": str(ckpt.resolve()), "sha256": sha256_file(ckpt)}
    assert m["shapes"] == {"L": 16, "P": 2, "D": 4, "V": 6, "W": 32, "mask_id": 5} and m["head"] == "trunk+head"
    assert m["schedule"] == {"mask": {"kind": "loglinear", "eps": 0.001}, "latent": {"kind": "sqrt", "eps": 0.0001}}
    assert m["batch_profile"] == {"min": 1, "opt": 4, "max": 16} and m["opset"] == build.DEFAULT_OPSET and m["engines"] == []
    assert m["tokenizer"] is None and m["config"]["variant"] == "mdlm"
    assert {"torch", "onnx", "onnxruntime", "lddm_export"} <= set(m["tools"])
    assert m["graphs"]["denoiser"]["outputs"] == [{"name": "log_probs", "dtype": "float32", "shape": ["B", 16, 6]}]
    assert m["graphs"]["trunk"]["outputs"] == [{"name": "hidden", "dtype": "float32", "shape": ["B", 16, 32]}]
    assert m["graphs"]["head"]["inputs"] == [{"name": "hidden", "dtype": "float32", "shape": ["N", 32]}]


def test_onnx_files_record_their_config(bundle):
    for precision in ("fp32", "fp16"):
        model = onnx.load(bundle / f"onnx/denoiser.{precision}.onnx")
        props = {p.key: p.value for p in model.metadata_props}
        assert props["lddm.graph"] == "denoiser" and props["lddm.precision"] == precision
        assert json.loads(props["lddm.config"])["seq_len"] == 16
        assert props["lddm.exporter"] == "torch.onnx.export(dynamo=True)"


def test_bundle_graphs_run_and_agree(bundle):
    import onnxruntime as ort

    feed = {"x_t": np.random.default_rng(0).integers(0, 6, (3, 16)), "t": np.array([0.1, 0.5, 0.9], np.float32)}
    outs = [ort.InferenceSession(str(bundle / f"onnx/denoiser.{p}.onnx"), providers=["CPUExecutionProvider"])
            .run(None, feed)[0] for p in ("fp32", "fp16")]
    probs = [np.exp(o) for o in outs]
    assert np.linalg.norm(probs[1] - probs[0]) / np.linalg.norm(probs[0]) < 1e-2


def test_unchanged_checkpoint_skips_export(bundle, ckpt):
    before = snapshot(bundle)
    result = CliRunner().invoke(cli, ["build", "--ckpt", str(ckpt), "--out", str(bundle), "--engines", "off",
                                      "--batch", "2,8,32"])
    assert result.exit_code == 0, result.output
    assert "[export] skipped" in result.output
    after = snapshot(bundle)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {k: v for k, v in before.items() if k != "manifest.json"}
    assert json.loads(after["manifest.json"])["batch_profile"] == {"min": 2, "opt": 8, "max": 32}
    Bundle.open(bundle)


def test_default_out_dir(workdir, ckpt, monkeypatch):
    monkeypatch.chdir(workdir)
    result = CliRunner().invoke(cli, ["build", "--ckpt", str(ckpt), "--engines", "off", "--precision", "fp16",
                                      "--no-calibrate"])
    assert result.exit_code == 0, result.output
    assert Bundle.open(workdir / "bundles" / "mdlm").manifest["graphs"]["denoiser"]["onnx"] == {
        "fp16": "onnx/denoiser.fp16.onnx"}


# ----------------------------------------------------------------------------- atomicity

@pytest.mark.parametrize("exception", [RuntimeError("injected"), KeyboardInterrupt()])
def test_failure_mid_build_leaves_the_previous_bundle(bundle, ckpt, monkeypatch, exception):
    before = snapshot(bundle)

    def fail_after_fp32(*args, **kwargs):  # the FP32 graph is already written when this runs
        raise exception

    monkeypatch.setattr("lddm_export.fp16.to_mixed_fp16_with_report", fail_after_fp32)
    with pytest.raises(type(exception)):
        build.build_bundle(ckpt, bundle, build.parse_options(engines="off", force=True, calibrate=False),
                           log=lambda line: None)
    assert snapshot(bundle) == before
    assert leftovers(bundle.parent, bundle.name) == []


def _sigint_as_in_a_terminal() -> None:
    """A Ctrl-C'able child even where this test runs with SIGINT ignored (a background job of a
    non-interactive shell: `cmd &` ignores SIGINT, the child inherits it, and CPython then installs
    no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_mid_build_leaves_the_previous_bundle(bundle, ckpt):
    before = snapshot(bundle)
    process = subprocess.Popen(
        [sys.executable, "-m", "lddm_export.cli", "build", "--ckpt", str(ckpt), "--out", str(bundle),
         "--engines", "off", "--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_sigint_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 120
        while not leftovers(bundle.parent, bundle.name):  # the temporary bundle exists: export has begun
            assert process.poll() is None and time.monotonic() < deadline, "the build ended before its export stage"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    # 130, or killed by SIGINT (which a shell also reports as 130): CPython may end the process
    # with SIGINT at exit once an interrupt has passed through its runner (Py_RunMain's
    # unhandled-KeyboardInterrupt flag), even after lddm-export caught it and exited with 130.
    assert process.returncode in (130, -signal.SIGINT), err
    assert "interrupted; nothing was left half-written" in err
    assert snapshot(bundle) == before and leftovers(bundle.parent, bundle.name) == []


def test_force_rebuilds_and_replaces(workdir, ckpt):
    out = workdir / "forced"
    other = tiny_checkpoint(workdir / "other.pt", "mdlm", seed=1)
    build.build_bundle(other, out, build.parse_options(engines="off", precision="fp32"), log=lambda line: None)
    lines = []
    build.build_bundle(ckpt, out, build.parse_options(engines="off", precision="fp32", force=True), log=lines.append)
    assert not any("skipped" in line for line in lines)
    assert Bundle.open(out).manifest["checkpoint"]["sha256"] == sha256_file(ckpt)
    assert leftovers(workdir, "forced") == []


# ----------------------------------------------------------------------------- bad input

def _nan_checkpoint(path: Path) -> Path:
    tiny_checkpoint(path, "mdlm")
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["denoiser.head.linear.weight"][0, 0] = float("nan")
    torch.save(raw, path)
    return path


BAD_INPUTS = {
    "missing checkpoint": (lambda d, ck: ["--ckpt", str(d / "nope.pt")], r"nope\.pt does not exist"),
    "corrupt checkpoint": (lambda d, ck: ["--ckpt", str(_write(d / "bad.pt", b"\x00garbage"))], r"checkpoint \S*bad\.pt .*(torch file|truncated)"),
    "NaN weights": (lambda d, ck: ["--ckpt", str(_nan_checkpoint(d / "nan.pt"))], r"NaN or Inf weights"),
    "unknown precision": (lambda d, ck: ["--ckpt", str(ck), "--precision", "fp8"],
                          r"--precision 'fp8' names \['fp8'\]; use a comma-separated subset of fp32,fp16"),
    "MIN > OPT": (lambda d, ck: ["--ckpt", str(ck), "--batch", "8,4,16"], r"1 <= MIN <= OPT <= MAX \(got MIN 8, OPT 4"),
    "OPT > MAX": (lambda d, ck: ["--ckpt", str(ck), "--batch", "1,32,16"], r"got MIN 1, OPT 32, MAX 16"),
    "non-integer batch": (lambda d, ck: ["--ckpt", str(ck), "--batch", "1,x,16"], r"three positive integers"),
    "opset too low": (lambda d, ck: ["--ckpt", str(ck), "--opset", "16"], r"--opset 16 is too low.*LayerNormalization"),
    "both --ckpt and --bundle": (lambda d, ck: ["--ckpt", str(ck), "--bundle", str(d)], r"exactly one of --ckpt"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_sentence(case, tmp_path, ckpt, capsys):
    args, pattern = BAD_INPUTS[case]
    argv = ["build", *args(tmp_path, ckpt), "--out", str(tmp_path / "out"), "--engines", "off"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, output = run_main(argv, capsys)
    assert code == 1
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lddm-export: error: "), output
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_existing_out_without_force_is_refused(tmp_path, ckpt, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, output = run_main(["build", "--ckpt", str(ckpt), "--out", str(out), "--engines", "off"], capsys)
    assert code == 1
    assert f"--out {out} already exists and is not an lddm bundle; pass --force to replace it" in output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and leftovers(tmp_path, "out") == []


def test_out_that_is_a_file_is_refused(tmp_path, ckpt, capsys):
    (tmp_path / "out").write_text("mine")
    code, output = run_main(["build", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--engines", "off"], capsys)
    assert code == 1 and "exists and is not a directory; choose another --out" in output
    assert (tmp_path / "out").read_text() == "mine" and leftovers(tmp_path, "out") == []


def test_a_checkpoint_without_sampling_graphs_is_refused(tmp_path, capsys):
    from training.checkpoint import save_checkpoint
    from training.config import ModelConfig
    from training.model import LDDM

    ar = tmp_path / "ar.pt"
    save_checkpoint(ar, LDDM(ModelConfig(variant="ar", seq_len=16, width=32, heads=2, depth=1)), None, {})
    code, output = run_main(["build", "--ckpt", str(ar), "--out", str(tmp_path / "out"), "--engines", "off"], capsys)
    assert code == 1 and "holds a model of variant 'ar', which has no sampling graphs" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ar.pt"]


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the refusal where tensorrt is absent")
def test_engines_on_without_tensorrt_is_refused(tmp_path, ckpt, capsys):
    code, output = run_main(["build", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--engines", "on",
                             "--precision", "fp16"], capsys)
    assert code == 1
    assert "import tensorrt" in output and "--engines off" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the refusal where tensorrt is absent")
def test_engines_for_a_bundle_import_neither_torch_nor_training(bundle):
    before = snapshot(bundle)
    code = ("import sys\nfrom lddm_export.cli import main\n"
            "try:\n    main(['build', '--bundle', sys.argv[1], '--engines', 'on'])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, sorted(m for m in ('torch', 'training') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.stdout.strip().splitlines()[-1] == "exit 1 []", result.stdout + result.stderr
    assert "import tensorrt" in result.stderr
    assert snapshot(bundle) == before and leftovers(bundle.parent, bundle.name) == []


def test_engines_for_a_bundle_refuse_changed_files(workdir, ckpt):
    out = workdir / "tampered"
    build.build_bundle(ckpt, out, build.parse_options(engines="off", precision="fp32"), log=lambda line: None)
    with open(out / "onnx/denoiser.fp32.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(build.BundleError, match=r"changed since it was built \(\['onnx/denoiser.fp32.onnx'\]\)"):
        build.build_engines_for_bundle(out, build.parse_options(engines="on", precision="fp32"))
    with pytest.raises(build.BundleError, match="has no fp16 ONNX graphs"):
        (out / "onnx/denoiser.fp32.onnx").write_bytes((out / "onnx/denoiser.fp32.onnx").read_bytes()[:-1])
        build.build_engines_for_bundle(out, build.parse_options(engines="on", precision="fp16"))


def fake_engine_builder(gpu, trt_version: str, payload: bytes):
    """A stand-in for lddm_export.engines.build_engines that writes `payload` as every "engine"
    and returns manifest entries for `gpu` and `trt_version`: it exercises the bundle's engine
    bookkeeping only, not TensorRT."""
    from lddm_export.engines import engine_file_name

    def build_engines(bundle_dir, manifest, precisions, profile, workspace_mb=None, log=print, timing_cache=None):
        entries = []
        for graph, table in manifest["graphs"].items():
            for precision in precisions:
                file = engine_file_name(graph, precision, gpu, trt_version)
                (bundle_dir / file).parent.mkdir(parents=True, exist_ok=True)
                (bundle_dir / file).write_bytes(payload)
                entries.append({"graph": graph, "precision": precision, "file": file,
                                "onnx_file": table["onnx"][precision],
                                "onnx_sha256": sha256_file(bundle_dir / table["onnx"][precision]),
                                "trt_version": trt_version, "gpu_name": gpu.name,
                                "compute_capability": gpu.compute_capability, "profile": dict(profile)})
        return entries
    return build_engines


def test_engine_bookkeeping_keeps_other_machines_engines(workdir, ckpt, monkeypatch):
    """Bookkeeping only (placeholder engine files, no TensorRT): a Jetson build adds its engines
    beside a server's, and a rebuild for the same GPU and TensorRT version replaces only its own."""
    from lddm_export import engines
    from runtimes.cuda_util import GpuIdentity

    out = workdir / "two-machines"
    build.build_bundle(ckpt, out, build.parse_options(engines="off"), log=lambda line: None)
    server, jetson = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0"), GpuIdentity("Orin", "8.7")

    def build_for(gpu, trt_version, payload, precision):
        monkeypatch.setattr(engines, "build_engines", fake_engine_builder(gpu, trt_version, payload))
        build.build_engines_for_bundle(out, build.parse_options(engines="on", precision=precision),
                                       log=lambda line: None)
        return Bundle.open(out).manifest  # checks every file against its sha256

    build_for(server, "10.13.0", b"server", "fp32,fp16")
    m = build_for(jetson, "10.3.0", b"jetson", "fp16")
    graphs = ("denoiser", "trunk", "head")   # an mdlm bundle's
    engine_files = {(e["graph"], e["gpu_name"], e["precision"], e["trt_version"]): e["file"] for e in m["engines"]}
    assert sorted(engine_files) == sorted((g, *k) for g in graphs for k in [
        ("NVIDIA H100 80GB HBM3", "fp16", "10.13.0"), ("NVIDIA H100 80GB HBM3", "fp32", "10.13.0"),
        ("Orin", "fp16", "10.3.0")])
    assert sorted(p.name for p in (out / "engines").iterdir()) == sorted(Path(f).name for f in engine_files.values())
    assert all(f in m["files"] for f in engine_files.values())

    m = build_for(jetson, "10.3.0", b"jetson, rebuilt", "fp16")  # same GPU and version: replaced, not added
    assert len(m["engines"]) == 3 * len(graphs) and m["tools"]["tensorrt"] == "10.3.0"
    assert (out / engine_files[("head", "Orin", "fp16", "10.3.0")]).read_bytes() == b"jetson, rebuilt"
    assert (out / engine_files[("trunk", "NVIDIA H100 80GB HBM3", "fp32", "10.13.0")]).read_bytes() == b"server"

    m = build_for(jetson, "10.4.0", b"jetson, newer TensorRT", "fp16")  # another version: both kept
    assert sorted(e["trt_version"] for e in m["engines"] if e["gpu_name"] == "Orin" and e["graph"] == "head") == [
        "10.3.0", "10.4.0"]
    assert len(list((out / "engines").iterdir())) == 4 * len(graphs)


@pytest.mark.trt
@pytest.mark.gpu
def test_engines_are_built_hashed_and_listed(workdir, ckpt):
    out = workdir / "with-engines"
    result = CliRunner().invoke(cli, ["build", "--ckpt", str(ckpt), "--out", str(out), "--engines", "on",
                                      "--precision", "fp16", "--batch", "1,2,4"])
    assert result.exit_code == 0, result.output
    m = Bundle.open(out).manifest  # hashes of the engine files included
    (engine,) = m["engines"]
    assert engine["graph"] == "denoiser" and engine["precision"] == "fp16"
    assert engine["onnx_sha256"] == m["files"]["onnx/denoiser.fp16.onnx"] and engine["file"] in m["files"]
    assert engine["profile"] == {"min": 1, "opt": 2, "max": 4} and m["tools"]["tensorrt"] == engine["trt_version"]
    assert engine["file"] in CliRunner().invoke(cli, ["inspect", str(out)]).output


# ----------------------------------------------------------------------------- inspect, doctor

def test_inspect_shows_the_manifest(bundle):
    result = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert result.exit_code == 0, result.output
    for text in ("L=16 P=2 D=4 V=6 W=32 mask_id=5", "x_t int64[B,16], t float32[B]",
                 "log_probs float32[B,16,6]", "fp32: onnx/denoiser.fp32.onnx (", "hidden float32[N,32]",
                 "trunk+head", "engines: none", "6 files, all match their sha256", "onnxruntime"):
        assert text in result.output, text
    assert re.search(r"variant\s+mdlm", result.output)
    assert re.search(r"fp16 calibration\s+(yes|no)", result.output)


def test_inspect_lists_engines(bundle, tmp_path):
    from lddm_export.manifest import read_manifest, write_manifest

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "engines").mkdir()
    (copy / "engines/denoiser.fp16.orin-sm87.trt10.3.0.plan").write_bytes(b"\0" * 2_000_000)
    entry = {"graph": "denoiser", "precision": "fp16", "file": "engines/denoiser.fp16.orin-sm87.trt10.3.0.plan",
             "onnx_file": "onnx/denoiser.fp16.onnx", "onnx_sha256": "0" * 64, "trt_version": "10.3.0",
             "gpu_name": "Orin", "compute_capability": "8.7", "profile": {"min": 1, "opt": 8, "max": 64}}
    write_manifest(copy, {**read_manifest(copy), "engines": [entry]})
    output = CliRunner().invoke(cli, ["inspect", str(copy)]).output
    assert "engines/denoiser.fp16.orin-sm87.trt10.3.0.plan (2.00 MB)  10.3.0    Orin (sm 8.7)  1/8/64" in output
    assert "7 files, all match their sha256" in output


def test_inspect_of_a_non_bundle(tmp_path, capsys):
    code, output = run_main(["inspect", str(tmp_path)], capsys)
    assert code == 1 and f"bundle {tmp_path} has no manifest.json" in output


def test_inspect_of_a_bundle_with_a_changed_file_shows_it_and_exits_1(bundle, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "onnx/denoiser.fp32.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(copy)])
    out, err = capsys.readouterr()
    assert info.value.code == 1
    assert "1 of 6 files missing or changed since the build: ['onnx/denoiser.fp32.onnx']" in out  # the tables
    assert err == (f"lddm-export: error: bundle {copy}: 1 of 6 files are missing or changed since the build "
                   f"(onnx/denoiser.fp32.onnx); rebuild it with lddm-export build\n")


def test_doctor_reports_versions_and_capabilities():
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    assert f"torch          {torch.__version__}" in result.output
    assert "CPUExecutionProvider" in result.output and "JetPack (L4T)" in result.output
    rows = {line.split("  ")[0]: line.split()[-1] for line in result.output.splitlines() if "  " in line}
    assert rows["export bundles (lddm-export build --ckpt)"] == "yes"
    if not HAS_TENSORRT:
        assert "build TensorRT engines (--engines on)  " in result.output
        assert result.output.count("no: needs tensorrt and a CUDA GPU") == 1
    serving = importlib.util.find_spec("pytriton") is not None
    assert rows["serve on Triton (lddm-export serve)"] == ("yes" if serving else "'lddm-export[serve]'")
    # doctor's serving probe imports neither torch nor PyTriton (a Jetson may have neither)
    code = "import sys, lddm_export.serve; assert not {'torch', 'pytriton'} & set(sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2]).returncode == 0


def test_jetpack_release_line(tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64\n")
    assert jetpack_release(release).startswith("R36 (release), REVISION: 3.0")
    assert jetpack_release(tmp_path / "absent") is None
