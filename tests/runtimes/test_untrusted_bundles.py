"""Untrusted bundles (issue 11, classes 1 and 2): damage a real bundle, run the real commands.

A hypothesis layer draws damage of every kind -- a manifest key dropped, retyped, out of range
or NaN; a path that leaves the bundle (``..``, absolute, through a symlink); a symlink, pipe or
ONNX external-data reference that leads out; an ONNX file that is not its graph -- and runs
`lddm-export inspect`, `sample` or `build --bundle` on it in-process (lddm_export.cli.main).
Each must end with exit 1 and one sentence of the bundle validator on stderr, no traceback;
nothing under the decoy directory the damage points at may be opened (a sys.addaudithook
records every open from Python); nothing may be left behind or changed.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx.external_data_helper import set_external_data

from fixtures import cached_tiny_bundle, copy_bundle
from lddm_export.cli import main
from lddm_export.manifest import file_table, read_manifest, write_manifest
from runtimes.bundle import MAX_BATCH, REQUIRED, sha256_file
from runtimes.errors import BundleError

ONNX = "onnx/denoiser.fp32.onnx"        # the fuji bundle's two graphs
ENCODER = "onnx/encoder.fp32.onnx"
SETTINGS = settings(max_examples=8, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ----------------------------------------------------------------------------- the harness

class OpenLog:
    """Every path opened from Python while `paths` is a list (one audit hook for the session:
    hooks cannot be removed)."""
    paths: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and OpenLog.paths is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        OpenLog.paths.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@dataclass
class Case:
    """A private copy of the bundle to damage, with decoys outside it that must never be opened."""
    root: Path
    outside: Path
    manifest: dict

    def write(self) -> None:
        if not (self.root / "manifest.json").is_symlink():
            (self.root / "manifest.json").write_text(json.dumps(self.manifest))

    def rehash(self, rel: str) -> None:
        self.manifest["files"][rel] = sha256_file(self.root / rel)


def prepare(source: Path, work: Path) -> Case:
    """Copy the bundle to work/<n>/bundle; work/<n>/outside holds decoys (secret, ONNX copies)."""
    top = Path(tempfile.mkdtemp(dir=work))
    root = copy_bundle(source, top / "bundle")
    outside = top / "outside"
    shutil.copytree(root / "onnx", outside)
    (outside / "secret.txt").write_text("outside the bundle\n")
    return Case(root, outside, json.loads((root / "manifest.json").read_text()))


def snapshot(top: Path) -> dict[str, object]:
    """Every entry under top: file bytes, symlink targets, and the kind of anything else."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            state[path] = (os.readlink(path) if stat.S_ISLNK(mode) else Path(path).read_bytes()
                           if stat.S_ISREG(mode) else stat.S_IFMT(mode))
    return state


def run(argv: list[str]) -> tuple[int, str, list[str]]:
    """main(argv) in-process: (exit code, stderr, paths opened). An exception main lets through
    (a traceback) fails the test."""
    err = io.StringIO()
    OpenLog.paths = []
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        opened, OpenLog.paths = OpenLog.paths, None
    return code, err.getvalue(), opened


def argv(command: str, case: Case) -> list[str]:
    return {"inspect": ["inspect", str(case.root)],
            "sample": ["sample", "--bundle", str(case.root), "--steps", "2", "--num", "2",
                       "--out", str(case.root.parent / "samples.npy")],
            "build": ["build", "--bundle", str(case.root), "--engines", "on"]}[command]


def assert_refused(case: Case, command: str) -> str:
    """exit 1, one line from the bundle validator, no traceback, no decoy opened, nothing changed."""
    before = snapshot(case.root.parent)
    code, err, opened = run(argv(command, case))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, f"{command}: exit {code}, stderr {err!r}"
    assert re.match(r"lddm-export: error: (bundle|manifest) ", lines[0]) and "Traceback" not in err, lines[0]
    outside = os.path.realpath(case.outside)
    assert not [p for p in opened if os.path.realpath(p).startswith(outside + os.sep)], f"{command} opened a decoy"
    assert snapshot(case.root.parent) == before, f"{command} changed or left something"
    return lines[0]


@pytest.fixture(scope="module")
def source(bundle_cache) -> Path:  # noqa: F811
    return cached_tiny_bundle(bundle_cache, "fuji")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("untrusted")


# ----------------------------------------------------------------------------- damage

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
bad_numbers = (st.sampled_from([0, -1, 0.5, float("nan"), float("inf"), float("-inf"), True, None, "8", [8],
                                MAX_BATCH + 1, 10**9, 2**63])
               | st.integers() | st.floats(allow_nan=True, allow_infinity=True))


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def profile_ok(p) -> bool:
    return (isinstance(p, dict) and all(is_count(p.get(k)) for k in ("min", "opt", "max"))
            and p["min"] <= p["opt"] <= p["max"] <= MAX_BATCH)


def could_be_valid(key: str, value, m: dict) -> bool:
    """Whether m[key] = value might still be a valid manifest (such draws are skipped)."""
    return same(value, m[key]) or {
        "data": value is None or isinstance(value, str), "tokenizer": value is None, "engines": value == [],
        "tools": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
        "opset": is_count(value), "fp16_calibration": isinstance(value, bool)}.get(key, False)


def engine_entry(case: Case, **changes) -> dict:
    """A well-formed engine entry for the fp32 denoiser (a placeholder plan file, listed)."""
    rel = "engines/denoiser.fp32.test-sm90.trt10.0.0.plan"
    (case.root / "engines").mkdir(exist_ok=True)
    (case.root / rel).write_bytes(b"not a TensorRT engine")
    case.rehash(rel)
    entry = {"graph": "denoiser", "precision": "fp32", "file": rel, "onnx_file": ONNX,
             "onnx_sha256": case.manifest["files"][ONNX], "trt_version": "10.0.0", "gpu_name": "Test GPU",
             "compute_capability": "9.0", "profile": {"min": 1, "opt": 2, "max": 4}}
    return {**entry, **changes}


def damage_key(case: Case, draw) -> None:
    """A top-level key dropped, or replaced by any JSON value that cannot be valid there."""
    key = draw(st.sampled_from(REQUIRED + ("fp16_calibration",)))
    if key != "fp16_calibration" and draw(st.booleans()):
        del case.manifest[key]
    else:
        case.manifest[key] = draw(json_values.filter(lambda v: not could_be_valid(key, v, case.manifest)))


NUMBERS = [("shapes", k) for k in ("L", "P", "D", "V", "mask_id")] + [
    ("schedule", "mask", "eps"), ("schedule", "latent", "eps"), ("opset",),
    ("batch_profile", "min"), ("batch_profile", "opt"), ("batch_profile", "max"),
    ("config", "seq_len"), ("config", "vocab_size"), ("config", "n_latent"), ("config", "latent_dim"),
    ("config", "mask_eps"), ("config", "latent_eps")]


def damage_number(case: Case, draw) -> None:
    """A number zero, negative, fractional, NaN, infinite, a bool, a string, huge, or disagreeing."""
    path = draw(st.sampled_from(NUMBERS))
    parent = case.manifest
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = draw(bad_numbers.filter(lambda v: not same(v, parent[path[-1]])))
    assume(not (path[0] == "batch_profile" and profile_ok(parent)) and not (path == ("opset",) and is_count(parent["opset"])))


def damage_schedule_kind(case: Case, draw) -> None:
    part = draw(st.sampled_from(["mask", "latent"]))
    entry = case.manifest["schedule"][part]
    entry["kind"] = draw(json_values.filter(lambda v: not same(v, entry["kind"])))


MIRRORED = ("variant", "vocab_size", "seq_len", "n_latent", "latent_dim", "mask_schedule", "mask_eps",
            "latent_schedule", "latent_eps")


def damage_config(case: Case, draw) -> None:
    """A mirrored config field disagreeing with the manifest, or any field not a plain value."""
    config = case.manifest["config"]
    key = draw(st.sampled_from(sorted(config)))
    if key in MIRRORED and draw(st.booleans()):
        config[key] = draw(json_values.filter(lambda v: not same(v, config[key])))
    else:
        config[key] = draw(st.lists(scalars, max_size=2) | st.dictionaries(st.text(max_size=3), scalars, max_size=2))


def damage_graph(case: Case, draw) -> None:
    """A graph dropped, added, or its spec, ONNX table or islands changed."""
    graphs = case.manifest["graphs"]
    name = draw(st.sampled_from(sorted(graphs)))
    g = graphs[name]
    tensor = draw(st.sampled_from(g["inputs"] + g["outputs"]))
    what = draw(st.sampled_from(["drop", "add", "dim", "dtype", "name", "onnx", "precision", "islands", "entry"]))
    if what == "drop":
        del graphs[name]
    elif what == "add":
        graphs[draw(st.text(min_size=1, max_size=6).filter(lambda n: n not in graphs))] = copy.deepcopy(g)
    elif what == "dim":
        i = draw(st.integers(0, len(tensor["shape"]) - 1))
        tensor["shape"][i] = draw((st.integers(-2, 40) | st.sampled_from(["B", "L", None, 16.0, True]))
                                  .filter(lambda d: not same(d, tensor["shape"][i])))
    elif what == "dtype":
        tensor["dtype"] = draw(st.sampled_from(["float16", "int32", "float64", "bool", "int64", "float32", 1])
                               .filter(lambda d: d != tensor["dtype"]))
    elif what == "name":
        tensor["name"] = draw(scalars.filter(lambda n: n != tensor["name"]))
    elif what == "onnx":
        g["onnx"] = draw(st.sampled_from([[], None, "onnx/x.onnx", {"fp32": None}, {"fp32": 3}]))
    elif what == "precision":
        g["onnx"][draw(st.sampled_from(["int8", "fp64", "FP32", ""]))] = g["onnx"]["fp32"]
    elif what == "islands":
        g["fp16_islands"] = draw(st.sampled_from(["x", [1], [{"node": 1, "op_type": "Add", "reason": "r"}], {}]))
    else:
        graphs[name] = draw(scalars | st.lists(scalars, max_size=2))


BAD_PATHS = ["../outside/denoiser.fp32.onnx", "../../{name}/outside/denoiser.fp32.onnx",
             "onnx/../../outside/denoiser.fp32.onnx", "{top}/outside/denoiser.fp32.onnx", "/etc/hostname",
             "onnx//denoiser.fp32.onnx", "./onnx/denoiser.fp32.onnx", "onnx/./denoiser.fp32.onnx",
             "onnx/denoiser.fp32.onnx/", "", "onnx\\denoiser.fp32.onnx", "onnx/denoiser.fp32.onnx\x00",
             "*/_ORT_MEM_ADDR_/*", "~/denoiser.fp32.onnx"]


def damage_path(case: Case, draw) -> None:
    """A named path that leaves the bundle or is not plain, listed in the files table with the hash
    of what it would reach (so that only the path rule can refuse it) or not listed."""
    top = case.root.parent
    rel = draw(st.sampled_from(BAD_PATHS)).format(top=top, name=top.name)
    target = os.path.join(case.root, rel.replace("\x00", ""))
    where = draw(st.sampled_from(["graph", "engine", "engine-onnx", "files"]))
    if where == "files" or draw(st.booleans()):
        case.manifest["files"][rel] = sha256_file(target) if os.path.isfile(target) else "0" * 64
    if where == "graph":
        case.manifest["graphs"]["denoiser"]["onnx"]["fp32"] = rel
    elif where == "engine":
        case.manifest["engines"] = [engine_entry(case, file=rel)]
    elif where == "engine-onnx":
        case.manifest["engines"] = [engine_entry(case, onnx_file=rel)]


def engine_field_could_be_valid(key: str, value, entry: dict) -> bool:
    return (same(value, entry[key]) or (key in ("trt_version", "gpu_name") and isinstance(value, str))
            or (key == "profile" and profile_ok(value))
            or (key == "compute_capability" and isinstance(value, str) and re.fullmatch(r"\d+\.\d+", value))
            or (key == "onnx_sha256" and isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)))


def damage_engine(case: Case, draw) -> None:
    """An engine entry with a field dropped or of another type or value, or not an object."""
    entry = engine_entry(case)
    key = draw(st.sampled_from(sorted(entry)))
    what = draw(st.sampled_from(["drop", "value", "entry"]))
    if what == "drop":
        del entry[key]
    elif what == "value":
        entry[key] = draw(json_values.filter(lambda v: not engine_field_could_be_valid(key, v, entry)))
    else:
        entry = draw(scalars | st.lists(scalars, max_size=2))
    case.manifest["engines"] = [entry]


def word_tokenizer(n: int) -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return Tokenizer(WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0")).to_str()


def damage_tokenizer(case: Case, draw) -> None:
    """A tokenizer entry whose JSON does not load, of another size, or missing or retyped fields."""
    vocab = case.manifest["shapes"]["V"] - 1
    entry = {"kind": "bpe", "json": word_tokenizer(vocab), "vocab_size": vocab}
    what = draw(st.sampled_from(["json", "vocab_size", "size", "drop", "type"]))
    if what == "json":
        entry["json"] = draw(st.text(max_size=30) | st.sampled_from(["{}", "null", entry["json"][:-4]]))
    elif what == "vocab_size":
        entry["vocab_size"] = draw(bad_numbers.filter(lambda v: not same(v, vocab)))
    elif what == "size":
        entry["json"] = word_tokenizer(vocab + draw(st.sampled_from([-2, -1, 1, 7])))
    elif what == "drop":
        del entry[draw(st.sampled_from(sorted(entry)))]
    else:
        key = draw(st.sampled_from(["kind", "json"]))
        entry[key] = draw(scalars.filter(lambda v: not isinstance(v, str)))
    case.manifest["tokenizer"] = entry


def damage_records(case: Case, draw) -> None:
    """The checkpoint record, tools table, data entry, format or version of the wrong type."""
    m = case.manifest
    what = draw(st.sampled_from(["checkpoint", "checkpoint.path", "checkpoint.sha256", "tools", "data",
                                 "format", "version"]))
    if what.startswith("checkpoint."):
        key = what.split(".")[1]
        m["checkpoint"][key] = draw(scalars.filter(lambda v: not (isinstance(v, str) and (
            key == "path" or re.fullmatch(r"[0-9a-f]{64}", v)))))
    elif what == "tools":
        m["tools"][draw(st.text(max_size=5))] = draw(scalars.filter(lambda v: not isinstance(v, str)))
    else:
        m[what] = draw(json_values.filter(lambda v: not could_be_valid(what, v, m)))


def damage_files(case: Case, draw) -> None:
    """The files table empty, partial, pointing out of the bundle, or with bad or wrong digests."""
    files = case.manifest["files"]
    rel = draw(st.sampled_from(sorted(files)))
    secret = sha256_file(case.outside / "secret.txt")
    what = draw(st.sampled_from(["empty", "drop", "outside", "absolute", "digest", "wrong digest", "missing"]))
    if what == "empty":
        case.manifest["files"] = {}
    elif what == "drop":
        del files[rel]
    elif what == "outside":
        files["../outside/secret.txt"] = secret
    elif what == "absolute":
        files[str(case.outside / "secret.txt")] = secret
    elif what == "digest":
        files[rel] = draw(scalars.filter(lambda v: not (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v))))
    else:  # a file changed or missing: inspect shows it and exits 1, sample and build refuse it
        files[rel if what == "wrong digest" else "onnx/gone.onnx"] = "0" * 64


def damage_symlink(case: Case, draw) -> None:
    """A symlink in the bundle that leads out of it (or nowhere), hashes and all intact."""
    root, outside = case.root, case.outside
    what = draw(st.sampled_from(["file", "directory", "stray", "relative", "manifest", "dangling", "loop"]))
    if what == "file":  # the decoy is an identical copy: only the symlink rule can refuse it
        (root / ONNX).unlink()
        os.symlink(outside / "denoiser.fp32.onnx", root / ONNX)
    elif what == "directory":
        shutil.rmtree(root / "onnx")
        os.symlink(outside, root / "onnx")
    elif what == "stray":
        os.symlink(outside / "secret.txt", root / "notes.txt")
    elif what == "relative":
        os.symlink("../../outside/secret.txt", root / "onnx" / "notes.txt")
    elif what == "manifest":
        (outside / "manifest.json").write_text(json.dumps(case.manifest))
        (root / "manifest.json").unlink()
        os.symlink(outside / "manifest.json", root / "manifest.json")
    elif what == "dangling":
        os.symlink("nowhere", root / "onnx" / "dangling")
    else:
        os.symlink("loop", root / "loop")


def damage_special(case: Case, draw) -> None:
    """A named pipe in the bundle (hashing or copying it would block), listed or not."""
    os.mkfifo(case.root / "onnx" / "pipe")
    if draw(st.booleans()):
        case.manifest["files"]["onnx/pipe"] = "0" * 64


EXTERNAL = {"out": "../../outside/weights.bin", "absolute": "{outside}/weights.bin",
            "unlisted": "denoiser.fp32.onnx.data", "memory": "*/_ORT_MEM_ADDR_/*", "range": "denoiser.fp32.onnx.data",
            "offset": "denoiser.fp32.onnx.data"}


def damage_onnx(case: Case, draw) -> None:
    """An ONNX file (rehashed) whose external data lead out of the bundle or out of their file, or
    that declares another graph's inputs and outputs, or that is not ONNX."""
    what = draw(st.sampled_from(sorted(EXTERNAL) + ["swap", "dim", "garbage"]))
    path = case.root / ONNX
    if what == "swap":
        shutil.copy(case.root / ENCODER, path)
    elif what == "garbage":
        path.write_bytes(draw(st.binary(max_size=64)))
    else:
        model = onnx.load(path)
        if what == "dim":
            model.graph.input[0].type.tensor_type.shape.dim[1].dim_value += draw(st.sampled_from([-1, 1, 100]))
        else:
            _to_external(case, model, EXTERNAL[what].format(outside=case.outside), what)
        path.write_bytes(model.SerializeToString())
    case.rehash(ONNX)


def _to_external(case: Case, model: onnx.ModelProto, location: str, what: str) -> None:
    """Move the largest initializer's bytes to `location` (written beside the ONNX file, or to the decoy)."""
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = tensor.raw_data
    target = Path(os.path.normpath(case.root / "onnx" / location)) if what in ("out", "unlisted", "range", "offset") \
        else case.outside / "weights.bin"
    target.write_bytes(raw)
    if what in ("range", "offset"):
        case.rehash("onnx/denoiser.fp32.onnx.data")
    set_external_data(tensor, location=location, offset=0, length=len(raw) + (what == "range"))
    if what == "offset":
        next(e for e in tensor.external_data if e.key == "offset").value = "-1"
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL


DAMAGE = {"key": damage_key, "number": damage_number, "schedule kind": damage_schedule_kind,
          "config": damage_config, "graph": damage_graph, "path": damage_path, "engine": damage_engine,
          "tokenizer": damage_tokenizer, "records": damage_records, "files": damage_files,
          "symlink": damage_symlink, "special file": damage_special, "onnx": damage_onnx}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
@SETTINGS
@given(data=st.data())
def test_damaged_bundles_are_refused_by_every_command(source, work, kind, data):
    case = prepare(source, work)
    try:
        DAMAGE[kind](case, data.draw)
        case.write()
        command = data.draw(st.sampled_from(["inspect", "sample", "build"]))
        assert_refused(case, command)
    finally:
        shutil.rmtree(case.root.parent)


# ----------------------------------------------------------------------------- the issue's examples

def test_the_undamaged_copy_is_accepted(source, work):
    """The control: the harness's copy inspects and samples (so every refusal above is the damage's)."""
    case = prepare(source, work)
    assert run(argv("inspect", case))[0] == 0
    code, err, opened = run(argv("sample", case))
    assert code == 0 and (case.root.parent / "samples.npy").is_file(), err
    outside = os.path.realpath(case.outside)
    assert not [p for p in opened if os.path.realpath(p).startswith(outside + os.sep)]


def test_a_graph_out_of_the_bundle_is_never_opened(source, work):
    """Issue 11's example: a graph entry at ../../other/const.onnx (listed, hash right) is refused
    by sample, and the file is never opened."""
    case = prepare(source, work)
    const = case.root.parent.parent / "other" / "const.onnx"
    const.parent.mkdir(exist_ok=True)
    shutil.copy(case.root / ONNX, const)
    rel = "../../other/const.onnx"
    case.manifest["graphs"]["denoiser"]["onnx"]["fp32"] = rel
    case.manifest["files"][rel] = sha256_file(const)
    case.write()
    OpenLog.paths = None
    code, err, opened = run(argv("sample", case))
    assert code == 1 and "not a plain relative path inside the bundle" in err and "Traceback" not in err
    assert os.path.realpath(const) not in {os.path.realpath(p) for p in opened}


@pytest.mark.parametrize("change, message", [
    (lambda m: m["batch_profile"].update(max=0), "batch_profile"),
    (lambda m: [m["schedule"]["mask"].update(eps=float("nan")), m["config"].update(mask_eps=float("nan"))],
     "schedule.mask"),
    (lambda m: m["schedule"]["latent"].update(eps=0.5), "schedule.latent"),
    (lambda m: m["shapes"].update(L=0), "shapes"),
])
def test_the_issues_manifest_values_are_refused(source, work, change, message):
    """batch_profile.max = 0 (was a ZeroDivisionError), a NaN schedule eps (was exit 0 with every
    token the mask id), eps out of range, L = 0."""
    case = prepare(source, work)
    change(case.manifest)
    case.write()
    for command in ("inspect", "sample", "build"):
        assert message in assert_refused(case, command)


@pytest.mark.parametrize("value", ["yes", 1, True])
def test_config_prompt_latent_is_true_or_false_and_seq_only(source, work, value):
    """The source is a fuji bundle: true is refused too (a fuji model has no latent denoiser)."""
    case = prepare(source, work)
    case.manifest["config"]["prompt_latent"] = value
    case.write()
    assert "config.prompt_latent" in assert_refused(case, "inspect")


def test_a_manifest_nested_too_deeply_is_refused(source, work):
    case = prepare(source, work)
    (case.root / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "is not valid JSON" in assert_refused(case, "inspect")


def test_a_reused_bundle_with_a_symlink_out_is_not_copied(source, work):
    """build --ckpt over a bundle of the same checkpoint would copy it; with a symlink leading out
    the bundle is not reused, and the symlink's target is never opened."""
    case = prepare(source, work)
    ckpt = case.root.parent / "model.pt"
    shutil.move(case.root / "model.pt", ckpt)
    os.symlink(case.outside / "secret.txt", case.root / "notes.txt")
    before = snapshot(case.root.parent)
    code, err, opened = run(["build", "--ckpt", str(ckpt), "--out", str(case.root), "--precision", "fp32",
                             "--engines", "off", "--no-calibrate"])
    assert code == 1 and "is not an lddm bundle" in err and "Traceback" not in err
    assert os.path.realpath(case.outside / "secret.txt") not in {os.path.realpath(p) for p in opened}
    assert snapshot(case.root.parent) == before


# ----------------------------------------------------------------------------- the writer

def test_the_writer_hashes_no_symlink_and_writes_no_invalid_manifest(source, work):
    case = prepare(source, work)
    manifest = read_manifest(case.root)
    os.symlink(case.outside / "secret.txt", case.root / "notes.txt")
    with pytest.raises(BundleError, match="'notes.txt', which is not a regular file or directory"):
        file_table(case.root)
    (case.root / "notes.txt").unlink()
    before = (case.root / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="batch_profile"):
        write_manifest(case.root, {**manifest, "batch_profile": {"min": 1, "opt": 8, "max": MAX_BATCH + 1}})
    assert (case.root / "manifest.json").read_bytes() == before
