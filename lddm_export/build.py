"""The build pipeline: checkpoint -> bundle (docs/design.md, "The bundle").

Stages, each reported on one line through `log` (calibration, the long one, also shows its
progress on stderr, runtimes.progress):
  1. checkpoint  read and check it (format, config, NaN/Inf weights), hash it;
  2. export      every graph to onnx/<graph>.fp32.onnx, then the mixed onnx/<graph>.fp16.onnx
                 (skipped when the existing bundle was built from the same checkpoint with the
                 same options and tools: the ONNX files are carried over);
  3. engines     TensorRT engines through lddm_export.engines (--engines on, or auto where
                 TensorRT and a GPU are present);
  4. manifest    sha256 of every file, tools, profile, schedule, tokenizer;
  5. commit      the bundle was written into a temporary directory beside DIR; it takes DIR's
                 place only now, in one atomic swap (lddm_export/commit.py), so a failure, Ctrl-C,
                 SIGTERM or kill -9 at any stage leaves DIR as it was: at every instant DIR holds
                 the complete old bundle or the complete new one.

One build per DIR at a time: a lock beside DIR refuses a second one, and each build first
removes what killed builds left beside DIR. All arguments are checked before anything is
written. This module imports neither torch nor training/ at import time:
`build_engines_for_bundle` (lddm-export build --bundle DIR) runs on a Jetson with only
tensorrt, onnx and numpy.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lddm_export import manifest as manifests
from lddm_export.commit import check_not_in_use, exclusive, replace_directory
from runtimes.bundle import PRECISIONS
from runtimes.errors import BundleError, LddmError
from runtimes.fileio import sha256_file
from runtimes.options import MAX_BATCH, check_int, parse_int_list
from runtimes.spec import GRAPHS_BY_VARIANT

ENGINE_MODES = ("auto", "on", "off")
MIN_OPSET = 17            # LayerNormalization entered the default ONNX domain in opset 17
# 20: the MLP's tanh-GELU exports as one native Gelu node (ORT fuses it to FastGelu; TensorRT
# 10.0+ parses opsets 9-20 and maps it to kGELU_TANH) instead of five elementwise nodes at 18.
DEFAULT_OPSET = 20
DEFAULT_BATCH = "1,8,64"
DEFAULT_PRECISIONS = ("fp32", "fp16")
DEFAULT_PROFILE = {"min": 1, "opt": 8, "max": 64}
MAX_WORKSPACE_MB = 2**24  # 16 TiB

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- options

@dataclass(frozen=True)
class BuildOptions:
    """What to build. Construct through parse_options() to get every argument checked.

    Attributes:
        precisions: ONNX graphs to write, a subset of ("fp32", "fp16", "int8") in that order
            (default: fp32 and fp16; int8 needs calibration).
        engines: "auto" (where TensorRT and a GPU exist), "on" or "off".
        profile: TensorRT batch profile {"min", "opt", "max"}, 1 <= min <= opt <= max.
        opset: ONNX default-domain opset, >= 17.
        workspace_mb: TensorRT builder workspace cap in MiB, or None.
        force: replace an existing DIR that is not an up-to-date bundle of this checkpoint,
            and rebuild everything (no stage is skipped).
        calibrate: choose extra FP32 islands of the FP16 graphs from activation statistics
            over the bundle's own sampling trajectories (calibration/fp16_islands.py).
        max_model_gib: refuse a checkpoint whose model is larger (GiB of float32 parameters and
            buffers), before it is built; None: training.checkpoint.MAX_MODEL_GIB.
    """

    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    engines: str = "auto"
    profile: dict = field(default_factory=lambda: dict(DEFAULT_PROFILE))
    opset: int = DEFAULT_OPSET
    workspace_mb: int | None = None
    force: bool = False
    calibrate: bool = True
    max_model_gib: float | None = None


def parse_precisions(text: str) -> tuple[str, ...]:
    """"fp16" or "fp32,fp16" -> ("fp32", "fp16"); raises LddmError for an unknown name."""
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown or not names:
        raise LddmError(f"--precision {text!r} names {unknown or 'nothing'}; "
                        f"use a comma-separated subset of {','.join(PRECISIONS)}")
    return tuple(p for p in PRECISIONS if p in names)


def parse_batch_profile(text: str) -> dict:
    """"1,8,64" -> {"min": 1, "opt": 8, "max": 64}; raises LddmError unless 1 <= MIN <= OPT <= MAX <= 65536."""
    expected = f"three positive integers MIN,OPT,MAX up to {MAX_BATCH}, e.g. 1,8,64"
    values = parse_int_list("--batch", text, 1, MAX_BATCH, expected)
    if len(values) != 3:
        raise LddmError(f"--batch {text!r} must be {expected}; it has {len(values)} entries")
    lo, opt, hi = values
    if not lo <= opt <= hi:
        raise LddmError(f"--batch {text!r} must satisfy 1 <= MIN <= OPT <= MAX "
                        f"(got MIN {lo}, OPT {opt}, MAX {hi}), e.g. 1,8,64")
    return {"min": lo, "opt": opt, "max": hi}


def check_opset(opset: int) -> int:
    """Raise LddmError for an opset below 17 or above what the installed onnx knows."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise LddmError(f"--opset {opset} is too low: the graphs use LayerNormalization, which needs "
                        f"opset >= {MIN_OPSET}; use --opset {DEFAULT_OPSET}")
    if opset > newest:
        raise LddmError(f"--opset {opset} is newer than the installed onnx {onnx.__version__} knows "
                        f"({newest}); use --opset {DEFAULT_OPSET}")
    return opset


def parse_options(precision: str = "fp32,fp16", engines: str = "auto", batch: str = DEFAULT_BATCH,
                  opset: int = DEFAULT_OPSET, workspace_mb: int | None = None,
                  force: bool = False, calibrate: bool = True, max_model_gib: float | None = None) -> BuildOptions:
    """BuildOptions from the CLI's strings, every one checked (raises LddmError)."""
    if engines not in ENGINE_MODES:
        raise LddmError(f"--engines {engines!r} must be one of {', '.join(ENGINE_MODES)}")
    if workspace_mb is not None:
        workspace_mb = check_int("--workspace-mb", workspace_mb, 1, MAX_WORKSPACE_MB)
    if max_model_gib is not None and not 0 < max_model_gib < math.inf:
        raise LddmError(f"--max-model-gib {max_model_gib} must be a positive number of GiB, e.g. 16")
    precisions = parse_precisions(precision)
    if "int8" in precisions and not calibrate:
        raise LddmError("--precision int8 is calibrated on the model's sampling trajectories, which "
                        "--no-calibrate turns off; drop --no-calibrate or int8")
    return BuildOptions(precisions, engines, parse_batch_profile(batch),
                        check_opset(opset), workspace_mb, force, calibrate, max_model_gib)


def default_out_dir(ckpt: Path) -> Path:
    """bundles/<checkpoint stem>, relative to the working directory."""
    return Path("bundles") / Path(ckpt).stem


# ----------------------------------------------------------------------------- the pipeline

def build_bundle(ckpt: str | Path, out: str | Path | None = None, options: BuildOptions = BuildOptions(),
                 log: Log = print) -> Path:
    """Build a bundle from a checkpoint (the stages of the module docstring).

    Args:
        ckpt: the lddm checkpoint (model.pt).
        out: the bundle directory to create or replace; default bundles/<ckpt stem>.
        options: what to build (parse_options()).
        log: the build's record, one line per stage or graph.
    Returns:
        the bundle directory.
    Raises:
        CheckpointError: from training.checkpoint.load_checkpoint (a corrupt or non-finite checkpoint,
            a malformed config or tokenizer entry, a model above options.max_model_gib).
        BundleError: `out` exists and is not an up-to-date bundle of this checkpoint (no --force);
            `out` is or holds the checkpoint or the current directory; another build holds the
            lock of `out`; the new bundle cannot be written or put in place (a full disk).
        LddmError: export, FP16 pass or engine failures (BackendUnavailable, EngineBuildError).
    """
    from training.checkpoint import MAX_MODEL_GIB, load_checkpoint

    ckpt, out = Path(ckpt), Path(out) if out is not None else default_out_dir(Path(ckpt))
    started = time.perf_counter()
    model, raw = load_checkpoint(ckpt, max_model_gib=options.max_model_gib or MAX_MODEL_GIB)
    if model.cfg.variant not in GRAPHS_BY_VARIANT:
        raise LddmError(f"checkpoint {ckpt} holds a model of variant {model.cfg.variant!r}, which has no sampling graphs; "
                        f"bundles are built from {', '.join(GRAPHS_BY_VARIANT)} checkpoints")
    ckpt_sha = sha256_file(ckpt)
    log(f"[checkpoint] {ckpt}: {model.cfg.variant}, L={model.cfg.seq_len}, V={model.cfg.total_vocab}, "
        f"sha256 {ckpt_sha[:12]}")
    engines = _engines_wanted(options.engines, log)
    check_not_in_use(out, ckpt)

    def stages(tmp: Path, reusable: dict | None) -> None:
        if reusable is not None:
            shutil.copytree(out, tmp, symlinks=True, dirs_exist_ok=True)  # a link is copied, never followed
            (tmp / manifests.MANIFEST).unlink()
            log(f"[export] skipped: {out} was built from this checkpoint (sha256 {ckpt_sha[:12]}) "
                f"with the same precisions, opset and tools; its ONNX files are kept")
            manifest = {**reusable, "batch_profile": dict(options.profile),
                        "checkpoint": {"path": str(ckpt.resolve()), "sha256": ckpt_sha},
                        "tools": {**reusable["tools"], **manifests.tool_versions()}}
        else:
            graphs = export_bundle_graphs(model, raw, ckpt, ckpt_sha, tmp, options, log)
            manifest = manifests.new_manifest(raw["config"], raw["tokenizer"], raw["train"].get("data"), ckpt, ckpt_sha, graphs,
                                              options.profile, options.opset)
            manifest["fp16_calibration"] = options.calibrate and "fp16" in options.precisions
        if engines:
            manifest = _add_engines(tmp, manifest, options, log)
        written = manifests.write_manifest(tmp, manifest)
        log(f"[manifest] {len(written['files'])} files hashed")

    with exclusive(out, log):
        reusable = _reusable_bundle(out, ckpt_sha, options, log)
        replace_directory(out, lambda tmp: stages(tmp, reusable))
    log(f"[done] {out} in {time.perf_counter() - started:.1f} s")
    return out


def build_engines_for_bundle(bundle: str | Path, options: BuildOptions, log: Log = print) -> Path:
    """Add TensorRT engines to an existing bundle (lddm-export build --bundle DIR --engines on).

    Needs only tensorrt, onnx and numpy: this is the path that runs on the target device.

    Args:
        bundle: an existing bundle directory; its ONNX files must match their sha256.
        options: precisions (which graphs get engines), profile, workspace_mb.
        log: progress sink.
    Returns:
        the bundle directory (replaced atomically with the engines added).
    Raises:
        BundleError: no valid bundle, changed files, or a precision the bundle has no graph for;
            the current directory inside the bundle; another build holds its lock.
        BackendUnavailable / EngineBuildError: from lddm_export.engines.
    """
    bundle = Path(bundle)
    started = time.perf_counter()
    check_not_in_use(bundle, flag="--bundle")
    with exclusive(bundle, log, flag="--bundle"):
        manifest = manifests.read_manifest(bundle)
        changed = manifests.changed_files(bundle, manifest)
        if changed:
            raise BundleError(f"bundle {bundle} has files that changed since it was built ({changed[:3]}); "
                              f"rebuild it with `lddm-export build --ckpt model.pt --force`")
        have = bundle_precisions(manifest)
        missing = [p for p in options.precisions if p not in have]
        if missing:
            raise BundleError(f"bundle {bundle} has no {','.join(missing)} ONNX graphs to build engines from; pass "
                              f"--precision {','.join(have) or 'fp16'} or rebuild with --precision {','.join(missing)}")

        def stages(tmp: Path) -> None:
            shutil.copytree(bundle, tmp, symlinks=True, dirs_exist_ok=True)  # a link is copied, never followed
            updated = _add_engines(tmp, {**manifest, "batch_profile": dict(options.profile)}, options, log)
            written = manifests.write_manifest(tmp, updated)
            log(f"[manifest] {len(written['files'])} files hashed")

        replace_directory(bundle, stages, flag="--bundle")
    log(f"[done] {bundle} in {time.perf_counter() - started:.1f} s")
    return bundle


def bundle_precisions(manifest: dict) -> tuple[str, ...]:
    """The precisions every graph of a bundle has an ONNX file for, e.g. ("fp32", "fp16")."""
    graphs = manifest["graphs"].values()
    return tuple(p for p in PRECISIONS if graphs and all(p in g["onnx"] for g in graphs))


def export_bundle_graphs(model, raw: dict, ckpt: Path, ckpt_sha: str, bundle_dir: Path, options: BuildOptions,
                         log: Log) -> dict:
    """Export every graph of the model's variant: FP32, then (calibration) the mixed FP16 graphs.

    Args:
        model: training.model.LDDM in eval mode; raw: its checkpoint dict.
        ckpt, ckpt_sha: the checkpoint file and its sha256 (for the provisional manifest).
        bundle_dir: where onnx/<graph>.<precision>.onnx are written.
        options: precisions, opset, calibrate.
        log: the build's record, one line per file.
    Returns:
        the manifest's "graphs" table: name -> {"inputs", "outputs", "onnx": {precision: path},
        and with FP16 "fp16_islands": [{"node", "op_type", "reason"}] (the calibrated ones)}.
    """
    from lddm_export.export import EXPORTER, export_graph, set_metadata
    from runtimes.spec import graph_specs
    from training.model import graph_modules

    cfg = model.cfg
    specs = graph_specs(cfg.variant, cfg.seq_len, cfg.n_latent, cfg.latent_dim, cfg.total_vocab, cfg.width,
                        cfg.prompt_latent)
    graphs, fp32_models, common = {}, {}, {}
    for name, module in graph_modules(model).items():
        started = time.perf_counter()
        fp32_models[name] = export_graph(module, specs[name], cfg.total_vocab, options.opset)
        common[name] = {"lddm.graph": name, "lddm.variant": cfg.variant, "lddm.config": cfg.to_dict(),
                        "lddm.exporter": EXPORTER}
        set_metadata(fp32_models[name], {**common[name], "lddm.precision": "fp32"})
        # The FP32 graph is written even for an FP16-only bundle: calibration runs it (removed below).
        graphs[name] = {**specs[name].to_dict(),
                        "onnx": {"fp32": _save(fp32_models[name], bundle_dir, name, "fp32", started, log)}}
    wanted = {"fp16", "int8"} & set(options.precisions)
    feeds = _trajectory_feeds(raw, ckpt, ckpt_sha, graphs, bundle_dir, options, log) if wanted else None
    islands = _fp16_islands(fp32_models, feeds, log) if "fp16" in wanted and options.calibrate else {}
    if "fp16" in wanted:
        for name, fp32 in fp32_models.items():
            graphs[name]["onnx"]["fp16"] = _save_fp16(fp32, common[name], islands.get(name, []), bundle_dir,
                                                      name, log)
            graphs[name]["fp16_islands"] = [d.__dict__ for d in islands.get(name, [])]
    if "int8" in wanted:
        for name, fp32 in fp32_models.items():
            graphs[name]["onnx"]["int8"], kept = _save_int8(fp32, common[name], feeds[name], islands.get(name, []),
                                                            bundle_dir, name, log)
            graphs[name]["int8_fp32_nodes"] = [d.__dict__ for d in kept]
    if "fp32" not in options.precisions:
        for graph in graphs.values():
            (bundle_dir / graph["onnx"].pop("fp32")).unlink()
    return graphs


def _trajectory_feeds(raw: dict, ckpt: Path, ckpt_sha: str, graphs: dict, bundle_dir: Path,
                      options: BuildOptions, log: Log) -> dict | None:
    """Every graph's feeds along the FP32 graphs' own sampling trajectories (a provisional,
    unhashed bundle), or None when nothing needs them (FP16 with --no-calibrate)."""
    if not options.calibrate:
        log("[calibrate] skipped (--no-calibrate): FP32 islands by rule only")
        return None
    from calibration.trajectories import record_bundle_feeds
    from runtimes.bundle import Bundle

    started = time.perf_counter()
    provisional = manifests.new_manifest(raw["config"], raw["tokenizer"], raw["train"].get("data"), ckpt, ckpt_sha, graphs,
                                         options.profile, options.opset)
    feeds = record_bundle_feeds(Bundle(bundle_dir, provisional))
    log(f"[calibrate] sampling trajectories recorded in {time.perf_counter() - started:.1f} s")
    return feeds


def _fp16_islands(models: dict, feeds: dict, log: Log) -> dict:
    """The calibrated FP32 islands of every FP16 graph (calibration/fp16_islands.py)."""
    from calibration.fp16_islands import calibrate_fp16_islands
    from lddm_export.fp16 import fp16_nodes_by_rule

    decisions = calibrate_fp16_islands(models, feeds, fp16_nodes_by_rule)
    for graph, chosen in decisions.items():
        log(f"[calibrate] {graph}: {len(feeds[graph])} recorded feeds, {len(chosen)} extra FP32 islands"
            + "".join(f"; {d.node} ({d.op_type}): {d.reason}" for d in chosen[:3]))
    return decisions


def _save_int8(fp32, common: dict, feeds: list, fp16_islands: list, bundle_dir: Path, name: str,
               log: Log) -> tuple[str, list]:
    """The Q/DQ INT8 graph (calibration/int8.py): linear layers in INT8 but those with outlier
    inputs and those FP16 keeps in FP32. Returns its path and the layers kept in FP32."""
    from calibration.int8 import linear_layers, outlier_layers, quantised_layers, quantize_int8
    from lddm_export.export import set_metadata

    started = time.perf_counter()
    layers = linear_layers(fp32)
    outliers = outlier_layers(fp32, feeds)
    kept = outliers + [d for d in fp16_islands if d.node in layers and d.node not in {o.node for o in outliers}]
    int8 = quantize_int8(fp32, feeds, [d.node for d in kept])
    set_metadata(int8, {**common, "lddm.precision": "int8", "lddm.keep_fp32_nodes": [d.node for d in kept]})
    return _save(int8, bundle_dir, name, "int8", started, log,
                 f", {quantised_layers(int8)} of {len(layers)} linear layers INT8"
                 + "".join(f"; {d.node} kept FP32: {d.reason}" for d in kept[:3])), kept


def _save_fp16(fp32, common: dict, islands: list, bundle_dir: Path, name: str, log: Log) -> str:
    """The mixed FP16 graph from the FP32 one, with the rule islands plus the calibrated ones."""
    from lddm_export.export import set_metadata
    from lddm_export.fp16 import to_mixed_fp16_with_report

    started = time.perf_counter()
    keep = [d.node for d in islands]
    fp16, report = to_mixed_fp16_with_report(fp32, keep)
    set_metadata(fp16, {**common, "lddm.precision": "fp16", "lddm.keep_fp32_nodes": keep})
    if report.out_of_range:
        log(f"[export] {name}: constants outside the FP16 range kept in FP32: {report.out_of_range}")
    return _save(fp16, bundle_dir, name, "fp16", started, log,
                 f", {len(report.fp32_nodes)} FP32 / {len(report.fp16_nodes)} FP16 nodes")


def _save(model, bundle_dir: Path, graph: str, precision: str, started: float, log: Log, detail: str = "") -> str:
    """Write onnx/<graph>.<precision>.onnx, log its size and time; returns its relative path."""
    from lddm_export.export import save_onnx

    rel = f"onnx/{graph}.{precision}.onnx"
    written = save_onnx(model, bundle_dir / rel)
    size = sum(p.stat().st_size for p in written)
    log(f"[export] {rel}: {size / 1e6:.2f} MB in {time.perf_counter() - started:.1f} s{detail}")
    return rel


# ----------------------------------------------------------------------------- helpers

def _reusable_bundle(out: Path, ckpt_sha: str, options: BuildOptions, log: Log) -> dict | None:
    """The existing manifest at `out` if its export can be reused; None if `out` may be replaced.

    Raises BundleError when `out` holds something else and --force was not given.
    """
    if not out.exists() or not any(out.iterdir()):
        return None
    try:
        old = manifests.read_manifest(out)
    except BundleError:
        old = None
    if options.force:
        log(f"[export] --force: {out} will be rebuilt and replaced")
        return None
    why = _mismatch(old, out, ckpt_sha, options)
    if why:
        raise BundleError(f"--out {out} already exists and {why}; pass --force to replace it "
                          f"or choose another --out")
    return old


def _mismatch(old: dict | None, out: Path, ckpt_sha: str, options: BuildOptions) -> str | None:
    """Why the bundle at `out` cannot be reused for this build, or None if it can."""
    if old is None:
        return "is not an lddm bundle"
    if old["checkpoint"].get("sha256") != ckpt_sha:
        return "was built from another checkpoint"
    if old.get("opset") != options.opset:
        return f"was built with opset {old.get('opset')}, not {options.opset}"
    have = {p for g in old["graphs"].values() for p in g["onnx"]}
    if have != set(options.precisions):
        return f"holds the precisions {sorted(have)}, not {list(options.precisions)}"
    if old.get("fp16_calibration", False) != (options.calibrate and "fp16" in options.precisions):
        return f"was built {'with' if old.get('fp16_calibration') else 'without'} FP16 calibration"
    if manifests.export_tools(old["tools"]) != manifests.export_tools(manifests.tool_versions()):
        return "was exported by other tool versions"
    changed = manifests.changed_files(out, old)
    if changed:
        return f"has files that changed since it was built ({changed[:3]})"
    return None


def _engines_wanted(mode: str, log: Log) -> bool:
    """Whether to build engines: --engines on requires tensorrt and a GPU (BackendUnavailable
    before any export work otherwise); auto builds them only where both are present."""
    if mode == "off":
        return False
    from lddm_export.engines import ENGINES_OFF, tensorrt_available
    from runtimes.cuda_util import gpu_identity, import_tensorrt
    from runtimes.errors import BackendUnavailable

    if mode == "on":
        import_tensorrt(ENGINES_OFF)
        gpu_identity()
        return True
    if not tensorrt_available():
        log("[engines] skipped: tensorrt is not installed (--engines auto)")
        return False
    try:
        gpu_identity()
    except BackendUnavailable as e:
        log(f"[engines] skipped: no usable GPU ({e}) (--engines auto)")
        return False
    return True


def _add_engines(bundle_dir: Path, manifest: dict, options: BuildOptions, log: Log) -> dict:
    """Build the engines into bundle_dir; returns the manifest with "engines" and tools updated.

    Engines built earlier for another GPU or TensorRT version (a server's, when this runs on a
    Jetson) are kept with their files, so one bundle can carry engines for several machines;
    only an earlier engine of the same graph, precision, GPU and TensorRT version is replaced.
    """
    from lddm_export.engines import build_engines

    entries = build_engines(bundle_dir, manifest, list(options.precisions), options.profile,
                            options.workspace_mb, log)
    built = {_engine_key(e) for e in entries}
    kept = [e for e in manifest.get("engines", []) if _engine_key(e) not in built]
    in_use = {e["file"] for e in entries + kept}
    for entry in manifest.get("engines", []):
        if entry["file"] not in in_use:  # a replaced engine under another file name
            (bundle_dir / entry["file"]).unlink(missing_ok=True)
    tools = {**manifest["tools"], **manifests.tool_versions()}
    if entries:  # a JetPack tensorrt may have no pip metadata; the builder knows its version
        tools["tensorrt"] = entries[0]["trt_version"]
    log(f"[engines] {len(entries)} engines built"
        + (f", {len(kept)} for other GPUs or TensorRT versions kept" if kept else ""))
    return {**manifest, "engines": kept + entries, "tools": tools}


def _engine_key(entry: dict) -> tuple[str, ...]:
    """What makes two manifest engine entries interchangeable: a new build of one replaces the other."""
    return (entry["graph"], entry["precision"], entry["gpu_name"], entry["compute_capability"],
            entry["trt_version"])
