"""bitpass: compile trained models into small, fast, low-precision artifacts.

Every subcommand's --help has examples. Errors are one line on stderr; the exit
status is 2 for a usage problem (bad option, mismatched data, unknown pass)
and 1 for a failure (corrupt model, unsupported operator, failing pass).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

from bitpass.frontend.errors import BitpassError

#: Wide enough for the pass table when piped (rich assumes 80 columns off a terminal).
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

EPILOG_COMPILE = """examples:
  bitpass compile model.onnx --calib calib.npz --eval eval.npz -o out/     # default pipeline: int8 for ONNX Runtime
  bitpass compile model.onnx --pipeline optimize -o out/                    # fp32 folding and fusion only
  bitpass compile model.onnx --calib calib.npz -o out/ \\
      --pipeline "fold-constants,fuse,calibrate(method=percentile),quantize"
  bitpass compile model.onnx --calib calib.npz -o out/ --pipeline my_pipeline.yaml
  bitpass compile model.onnx --calib calib.npz --eval eval.npz -o out/ --budget avg-bits=4   # mixed precision
  bitpass compile model.onnx --calib calib.npz --eval eval.npz -o out/ --budget size=40KB --sweep
  bitpass compile model.onnx --calib calib.npz --eval eval.npz -o out/ --pipeline joint \
      --budget size=0.2x --budget latency=0.8x --latency-batch 64     # bits and removed channels together

data files are .npz: one array per model input, keyed by the input's name, samples on the first
axis; an optional 'labels' array turns on accuracy (otherwise fidelity to fp32 is measured)."""


EPILOG_PASSES = """examples:
  bitpass passes                      # every pass: summary, options, the package that provides it
  bitpass passes quantize             # one pass: what it does, what it needs, each option in plain words
  bitpass passes --plugin my_passes.py   # also list the passes a plugin file registers"""

EPILOG_PIPELINES = """examples:
  bitpass pipelines                   # optimize, default, mixed, joint, and any a plugin adds
  bitpass compile model.onnx --calib calib.npz -o out/ --pipeline mixed --budget avg-bits=4"""

EPILOG_INSPECT = """examples:
  bitpass inspect model.onnx          # the quantizable layers of a model, with their ids (for set-bits)
  bitpass inspect out/                # an artifact's per-layer plan: bits, format, bytes, sensitivity
  bitpass inspect out/ --json | jq '.[] | select(.bits.weight < 8)'"""

EPILOG_VERIFY = """examples:
  bitpass verify out/                 # files, manifest and per-layer plan are as compiled
  bitpass verify out/ --eval eval.npz # also re-measure quality against the recorded figures
  bitpass verify out/ --eval eval.npz --emulate   # an aarch64 artifact, run under qemu

exit status: 0 when every check passes, 1 when one fails."""

EPILOG_RUN = """examples:
  bitpass run out/ --input x.npz -o y.npz
  python -c "import numpy as np; print(np.load('y.npz')['logits'].argmax(1))"
  bitpass run lm-out/ --generate 64 --prompt "def main("    # a language model: greedy tokens, with the KV cache
  bitpass run lm-out/ --generate 20 --prompt-ids 464,3290,318

--input holds one array per model input (keyed by input name; 'bitpass inspect out/' shows them).
--prompt is text for byte-level models (its UTF-8 bytes are the token ids); other models take --prompt-ids."""

EPILOG_EXAMPLE = """examples:
  bitpass example                     # into ./bitpass-example (about 10 s on two cores)
  bitpass example /tmp/demo --quiet
  bitpass verify bitpass-example/artifact --eval bitpass-example/eval.npz"""


def _add_compile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile a model into an artifact directory",
                       description="Import MODEL, run a pipeline of passes, emit an artifact for a backend, and "
                                   "measure it against the fp32 reference.",
                       epilog=EPILOG_COMPILE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an ONNX file (external data must sit in its folder)")
    p.add_argument("-o", "--output", required=True,
                   help="artifact folder to create (missing parent folders are made); it must not exist, unless "
                        "--force replaces an earlier bitpass artifact")
    p.add_argument("--pipeline", default="default",
                   help="a named pipeline (see 'bitpass pipelines'), a .yaml/.toml file, or a one-line spec "
                        "like 'fold-constants,fuse,calibrate(method=entropy),quantize' (default: %(default)s)")
    p.add_argument("--calib", metavar="NPZ", help="calibration samples (.npz); needed to quantize activations")
    p.add_argument("--eval", metavar="NPZ", help="held-out samples (.npz) for accuracy/fidelity; never the calib set")
    p.add_argument("--backend", default="onnxruntime", help="code generator (default: %(default)s)")
    p.add_argument("--target", help="backend target (default: the backend's default)")
    p.add_argument("--plugin", action="append", default=[], metavar="PATH",
                   help="load passes/backends from this .py file or package folder (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="replace OUTPUT if it is an earlier bitpass artifact (never any other folder)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--seed", type=int, default=0, help="seed for randomized passes (default: %(default)s)")
    p.add_argument("--executor", metavar="SPEC",
                   help="where the per-layer loops (sensitivity, rounding) run: serial (default), local:N (N worker "
                        "processes), ray (RAY_ADDRESS's cluster, else a local one) or ray://HOST:PORT; the artifact "
                        "is the same wherever they run")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts) instead of a table")
    q = p.add_argument_group("quality gate (measured on --eval, or on calibration samples held back from calibrating)")
    q.add_argument("--tolerance", metavar="METRIC=VALUE",
                   help="what the artifact must keep against fp32: accuracy-drop=1 (points; default with labels), "
                        "agreement=0.99 (top-1; default for logits), cosine=0.99 (lowest per sample; default for "
                        "embeddings). A miss puts layers back in fp32 until it is met; else nothing is written")
    q.add_argument("--allow-quality-loss", action="store_true",
                   help="write the artifact even if it misses the tolerance (the manifest records by how much)")
    g = p.add_argument_group("mixed precision (switches the default pipeline to 'mixed')")
    g.add_argument("--budget", action="append", default=[], metavar="DIM=VALUE",
                   help="avg-bits=4, size=40KB or size=0.2x, bops=1.2G, latency=2ms (allocate-joint also "
                        "latency=0.8x) or accuracy-drop=0.5 (points, bisected on --eval); repeat to combine")
    g.add_argument("--method", choices=["ilp", "pareto", "baq", "greedy"],
                   help="bit-allocation solver (default ilp: exact; pareto also gives the frontier)")
    g.add_argument("--sensitivity", choices=["auto", "hutchinson", "eigenvalue", "fisher", "taylor", "output-kl",
                                             "output-mse"],
                   help="how layer sensitivity is measured (default auto: hutchinson for torch models, "
                        "output-kl for ONNX files)")
    g.add_argument("--formats", choices=["auto", "packed", "compute"],
                   help="auto (default): per layer, the fastest materialization measured not slower than fp32")
    g.add_argument("--sweep", action="store_true", help="record the whole size/loss frontier; report.html plots it")
    g.add_argument("--latency-batch", type=int, metavar="N",
                   help="batch size whose measured layer latencies a latency= budget counts (default 1)")


def _progress(args: argparse.Namespace):
    """Progress bars on a terminal, plain lines otherwise, nothing with --quiet."""
    from bitpass.tools.progress import console_reporter

    return console_reporter(not getattr(args, "quiet", False))


def cmd_compile(args: argparse.Namespace) -> int:
    from bitpass.tools.api import compile as compile_model

    latency_batch = {"allocate-bits": {"latency_batch": args.latency_batch}} if args.latency_batch else None
    artifact = compile_model(args.model, args.output, pipeline=args.pipeline, calibration=args.calib,
                             evaluation=args.eval, budget=args.budget, method=args.method,
                             sensitivity=args.sensitivity, formats=args.formats, sweep=args.sweep,
                             backend=args.backend, target=args.target, plugin_paths=args.plugin, force=args.force,
                             latency=not args.no_latency, seed=args.seed, progress=_progress(args),
                             tolerance=args.tolerance, allow_quality_loss=args.allow_quality_loss,
                             overrides=latency_batch, executor=args.executor)
    if args.json:
        print(json.dumps(summary_json(artifact.manifest, artifact.path), indent=2, sort_keys=True))
    else:
        print_summary(artifact.manifest, artifact.path)
    return 0


def summary_json(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """What the summary table shows, for scripts: paths, sizes, quality, latency, the pipeline."""
    return {"artifact": str(path), "backend": manifest["backend"], "target": manifest["target"],
            "pipeline": manifest["pipeline"], "metrics": manifest["metrics"],
            "summary": manifest.get("summary"), "notes": manifest.get("records", {}).get("notes", [])}


def _computes_in_int8(manifest: dict[str, Any]) -> bool:
    """Whether some layer runs an integer kernel (QDQ int8 or MatMulNBits), not only fp32 math."""
    formats = [str((r.get("stored") or {}).get("format", "")) for r in manifest.get("layers", [])]
    return any(f.startswith(("int8", "uint8", "MatMulNBits")) for f in formats)


def print_summary(manifest: dict[str, Any], path: Path) -> None:
    from bitpass.backends.measure import speed_verdict

    metrics = manifest["metrics"]
    table = Table(title=f"{manifest['input_model']['name']} → {path}  ({manifest['backend']}/{manifest['target']})")
    table.add_column("")
    table.add_column("fp32", justify="right")
    table.add_column("artifact", justify="right")
    table.add_column("ratio / change", justify="right")
    size = metrics["size"]
    table.add_row("weight bytes", f"{size['fp32_weight_bytes']:,}", f"{size['weight_bytes']:,}",
                  f"{size['weight_ratio']:.3f}×")
    if "compressed_bytes" in size:
        table.add_row("zipped file", f"{size['fp32_compressed_bytes']:,}", f"{size['compressed_bytes']:,}",
                      f"{size['compressed_ratio']:.3f}×")
    quality = metrics.get("quality")
    if quality and "accuracy" in quality:
        acc = quality["accuracy"]
        table.add_row("accuracy", f"{100 * acc['fp32']:.2f} %", f"{100 * acc['artifact']:.2f} %",
                      f"{0.0 - acc['drop_points']:+.2f} pt")
    if quality:
        fid = quality["fidelity"]
        table.add_row("fidelity", "", f"cos {fid['cosine']:.5f}", f"top-1 agree {100 * fid['top1_agreement']:.1f} %")
    for key, row in metrics.get("latency", {}).items():
        table.add_row(f"latency {key.replace('_', ' ')}", f"{row['fp32_ms']:.3f} ms", f"{row['artifact_ms']:.3f} ms",
                      speed_verdict(row))
    console.print(table)
    console.print(f"pipeline: {manifest['pipeline']}")
    gate = manifest.get("records", {}).get("quality_gate") or {}
    if gate.get("passed") is not None:
        repaired = gate.get("fp32_layers") or []
        verdict = "met" if gate["passed"] else "[red]MISSED[/red] (kept: --allow-quality-loss)"
        extra = f"; {len(repaired)} layer(s) put back in fp32 to meet it" if repaired else ""
        console.print(f"quality gate {verdict}: {gate['final_text']} on {gate['samples']} held-out samples{extra}")
        if gate.get("warning"):
            console.print(f"warning: {gate['warning']}", markup=False)
    elif gate.get("skipped"):
        console.print(f"quality gate not run: {gate['skipped']}")
    slower = any(speed_verdict(row).endswith("slower") for row in metrics.get("latency", {}).values())
    if slower and _computes_in_int8(manifest):
        console.print("note: int8 compute is slower than fp32 for this model on this machine; "
                      "--budget avg-bits=8 stores the same int8 weights and runs at fp32 speed "
                      "(bit allocation picks compute formats only where they are measured faster)")


def cmd_passes(args: argparse.Namespace) -> int:
    from bitpass.plugins import default_registry

    registry = default_registry(args.plugin)
    if args.name:
        return _describe_pass(registry, args.name)
    table = Table(title="registered passes  (bitpass passes NAME shows one with its options)")
    for column in ("pass", "summary", "options", "package"):
        table.add_column(column, overflow="fold")
    for entry in registry.pass_entries():
        cls = entry.obj
        table.add_row(entry.name, cls.summary(), ", ".join(cls.Config.model_fields) or "-", entry.package)
    console.print(table)
    _report_problems(registry)
    return 0


def _describe_pass(registry: Any, name: str) -> int:
    """One pass: what it does, what it needs and gives, and each option in plain words."""
    from bitpass.tools.describe import option_help

    cls = registry.pass_class(name)
    doc = " ".join((cls.__doc__ or "").split())
    console.print(f"[bold]{name}[/bold]: {doc or cls.summary()}", markup=True)
    console.print(f"needs: {', '.join(sorted(cls.requires)) or 'nothing'}   ·   gives: "
                  f"{', '.join(sorted(cls.produces)) or 'nothing'}", markup=False)
    options = option_help(cls)
    if not options:
        console.print("options: none")
        return 0
    table = Table(title=f"options  (write them as {name}(option=value,...) in a pipeline)")
    for column in ("option", "takes", "default", "what it does"):
        table.add_column(column, overflow="fold")
    for option in options:
        table.add_row(option.name, option.kind, option.default, option.help or "-")
    console.print(table)
    return 0


def _report_problems(registry: Any) -> None:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for broken in registry.broken:
        err.print(f"warning: {broken.group} entry {broken.name!r} from {broken.package} failed to load: "
                  f"{broken.error}", markup=False)
    for (group, name), packages in registry.conflicts.items():
        err.print(f"warning: {group} name {name!r} is registered by more than one package: "
                  f"{' and '.join(packages)}", markup=False)


def cmd_pipelines(args: argparse.Namespace) -> int:
    from bitpass.plugins import default_registry

    registry = default_registry(args.plugin)
    table = Table(title="named pipelines")
    for column in ("pipeline", "spec", "package"):
        table.add_column(column, overflow="fold")
    for entry in registry.pipeline_entries():
        table.add_row(entry.name, entry.obj, entry.package)
    console.print(table)
    _report_problems(registry)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():
        from bitpass.backends.artifact import read_manifest

        manifest = read_manifest(path)
        layers = manifest["layers"]
        name = (manifest.get("input_model") or {}).get("name", "?") if isinstance(manifest.get("input_model"), dict) \
            else "?"
        title = f"{path}: {name} ({manifest['backend']}/{manifest['target']})"
    else:
        from bitpass.backends.layers import layer_records
        from bitpass.frontend import from_onnx

        model = from_onnx(path)
        layers = layer_records(model, model)
        title = f"{path}: {len(layers)} quantizable layers"
    if args.json:
        print(json.dumps(layers, indent=2, sort_keys=True))
        return 0
    table = Table(title=title)
    for column in ("layer", "op", "weight shape", "params", "w bits", "a bits", "sparsity", "sensitivity",
                   "stored as", "bytes"):
        table.add_column(column, justify="left" if column in ("layer", "op", "sensitivity", "stored as") else "right")
    for index, r in enumerate(layers):
        try:
            bits = r.get("bits") or {}
            sens = ", ".join(f"{k}={v:.3g}" for k, v in sorted((r.get("sensitivity") or {}).items()))
            table.add_row(str(r["id"]), str(r["op_type"]), "×".join(map(str, r["weight_shape"])), f"{r['params']:,}",
                          str(bits.get("weight", "-")), str(bits.get("activation", "-")),
                          f"{r.get('sparsity', 0):.2f}", sens or "-",
                          str((r.get("stored") or {}).get("format", r.get("status", "-"))),
                          f"{r.get('weight_bytes', r['fp32_bytes']):,}")
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise BitpassError(f"{path}: layer record {index} is malformed ({type(err).__name__}: "
                               f"{str(err)[:60]})") from err
    console.print(table)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from bitpass.tools.api import verify

    checks = verify(args.artifact, args.eval, tolerance=args.tolerance, emulate=args.emulate,
                    reference=args.reference)
    for check in checks:
        mark = "[green]ok[/green]  " if check.ok else "[red]FAIL[/red]"
        console.print(f"{mark} {check.name}: {check.detail}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        print(f"bitpass: error: verification failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from bitpass.frontend.errors import UsageError
    from bitpass.tools.api import run

    if args.generate is not None:
        return run_generate(args)
    if args.prompt is not None or args.prompt_ids is not None:
        raise UsageError("--prompt/--prompt-ids go with --generate N")
    if not args.input or not args.output:
        raise UsageError("give --input NPZ and -o NPZ (or --generate N --prompt TEXT for a language model)")
    outputs = run(args.artifact, args.input)
    output = write_npz(Path(args.output), outputs)
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in outputs.items())
    console.print(f"wrote {output}: {shapes}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """``bitpass run ARTIFACT --generate N --prompt TEXT``: greedy tokens with the KV cache, and their speed."""
    from bitpass.backends.onnxruntime import generate
    from bitpass.frontend.errors import UsageError

    if args.input or args.output:
        raise UsageError("--generate prints its tokens: leave out --input and -o")
    session = generate.open_decoder(args.artifact)
    prompt = generate.prompt_tokens(session.spec, text=args.prompt, ids=args.prompt_ids)
    result = generate.timed_generate(session, prompt, args.generate)
    tokens = result.tokens[0].tolist()
    if generate.byte_level(session.spec):
        text = bytes(tokens).decode("utf-8", errors="replace")
        console.print(f"{bytes(prompt[0].astype('uint8').tolist()).decode('utf-8', errors='replace')}", end="",
                      markup=False, highlight=False)
        console.print(text, style="bold", markup=False, highlight=False)
    else:
        console.print(",".join(map(str, tokens)), markup=False)
    console.print(f"{len(tokens)} tokens: prefill {prompt.shape[1]} tokens at {result.prefill_tokens_per_s:,.0f} "
                  f"tokens/s, decode {result.decode_tokens_per_s:,.1f} tokens/s"
                  f"{'' if session.has_cache else ' (no KV cache: each step reruns the sequence)'}",
                  style="dim", markup=False)
    return 0


def write_npz(path: Path, arrays: dict[str, Any]) -> Path:
    """Write ``arrays`` as an .npz (any key, ``allow_pickle`` included) via a temporary file that never
    outlives a failure; refuses to overwrite a file that is not an .npz."""
    import os
    import tempfile
    import zipfile

    import numpy as np

    from bitpass.frontend.errors import UsageError

    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise UsageError(f"{path} is a folder: give -o a file name ending in .npz")
    if path.exists() and not zipfile.is_zipfile(path):
        raise UsageError(f"{path} exists and is not an .npz file; refusing to overwrite it")
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: its folder {path.parent} does not exist")
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(handle, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as archive:
            for key, value in arrays.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def cmd_example(args: argparse.Namespace) -> int:
    from bitpass.tools.example import run_example

    manifest, path = run_example(Path(args.dir), force=args.force, progress=_progress(args))
    print_summary(manifest, path)
    console.print(f"try: bitpass inspect {path}   ·   bitpass verify {path} --eval {Path(args.dir) / 'eval.npz'}")
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the promise every bitpass error keeps) naming the --help."""

    def error(self, message: str) -> NoReturn:
        print(f"bitpass: error: {one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="bitpass", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="start with: bitpass example   (trains, compiles and measures a digits CNN)")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_compile(sub)
    p = sub.add_parser("passes", help="list registered passes, or show one with its options",
                       description="List every registered pass (built in and from plugins), or show one pass: what "
                                   "it does, what it needs, and each option in plain words.",
                       epilog=EPILOG_PASSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="show this pass's options")
    p.add_argument("--plugin", action="append", default=[], metavar="PATH", help="also load this plugin file")
    p = sub.add_parser("pipelines", help="list named pipelines", description="List the named pipelines and their passes.",
                       epilog=EPILOG_PIPELINES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plugin", action="append", default=[], metavar="PATH", help="also load this plugin file")
    p = sub.add_parser("inspect", help="per-layer table of an artifact or an ONNX file",
                       description="Show each quantizable layer: op, shape, params, bits, sparsity, sensitivity.",
                       epilog=EPILOG_INSPECT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="artifact directory or .onnx file")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p = sub.add_parser("verify", help="re-check an artifact against its manifest and fp32 reference",
                       description="Check that every file and the manifest are as compiled and that the per-layer "
                                   "plan read back from the model matches the manifest; with --eval, re-measure "
                                   "quality and fail (exit 1) if it misses the recorded figures by more than "
                                   "--tolerance.",
                       epilog=EPILOG_VERIFY, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--eval", metavar="NPZ", help="held-out samples to re-measure quality")
    p.add_argument("--tolerance", type=float, default=0.005, help="allowed shortfall (default: %(default)s)")
    p.add_argument("--reference", metavar="ONNX",
                   help="the fp32 model the artifact was compiled from (default: found by its recorded sha256: the "
                        "input file, or bitpass's cache for models compiled from memory)")
    p.add_argument("--emulate", action="store_true",
                   help="run an artifact of a foreign target (aarch64) under qemu and compare it with the same "
                        "plan built for this machine (one-time setup: tools/setup_arm64.sh)")
    p = sub.add_parser("run", help="run an artifact on inputs from an .npz file",
                       description="Run ARTIFACT on every sample of --input; write outputs, keyed by output name.",
                       epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--input", metavar="NPZ", help="one array per model input, samples on axis 0")
    p.add_argument("-o", "--output", metavar="NPZ", help="where to write the outputs (.npz)")
    p.add_argument("--generate", type=int, metavar="N",
                   help="a language model: greedily generate N tokens after the prompt and print them and the speed")
    p.add_argument("--prompt", metavar="TEXT", help="the prompt as text (byte-level models: its UTF-8 bytes)")
    p.add_argument("--prompt-ids", metavar="IDS", help="the prompt as token ids, e.g. 1,2,3")
    p = sub.add_parser("example", help="train the bundled digits CNN, compile it, print the summary",
                       description="Train a small CNN on scikit-learn's digits, write model.onnx, calib.npz and "
                                   "eval.npz into DIR, compile with the default pipeline into DIR/artifact.",
                       epilog=EPILOG_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default="bitpass-example", help="working folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an earlier DIR/artifact")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    for subparser in sub.choices.values():  # --debug is accepted after the command too
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _version() -> str:
    from importlib import metadata

    return f"bitpass {metadata.version('bitpass')}"


COMMANDS = {"compile": cmd_compile, "passes": cmd_passes, "pipelines": cmd_pipelines, "inspect": cmd_inspect,
            "verify": cmd_verify, "run": cmd_run, "example": cmd_example}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C (it is one, to code that catches it) so every stage and temporary
    file is removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


#: longest error line printed (a message built from hostile input can be huge)
MAX_ERROR_CHARS = 240


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` on one line of at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _log_traceback(argv: Sequence[str] | None) -> Path | None:
    """Write the current exception's traceback to a log file in the cache folder; its path, or None."""
    import os
    import time
    import traceback

    from bitpass.frontend.cache import cache_dir

    try:
        logs = cache_dir() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for old in sorted(logs.glob("bitpass-*.log"))[:-19]:  # keep the last 20
            old.unlink(missing_ok=True)
        path = logs / f"bitpass-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(f"bitpass {' '.join(map(str, argv if argv is not None else sys.argv[1:]))}\n\n"
                        + traceback.format_exc())
        return path
    except Exception:  # a log that cannot be written must not hide the error itself
        return None


def _describe(err: BaseException) -> str:
    """A one-line cause for an exception bitpass did not anticipate."""
    if isinstance(err, OSError) and err.strerror:
        where = f" {err.filename}" if err.filename else ""
        return f"cannot access{where}: {err.strerror}"
    if isinstance(err, MemoryError):
        return "out of memory (the model or data is too large for this machine)"
    if isinstance(err, RecursionError):
        return "input nested too deeply"
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _quiet_onnxruntime() -> None:
    """ONNX Runtime writes its own warnings to stderr in C++; errors reach the user through bitpass's one line."""
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)  # fatal only: a failed run is reported as bitpass's one line
    except Exception:  # noqa: BLE001 - never fail a command over log settings
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """The command line. Every failure ends here as one line on stderr and a non-zero exit status;
    unexpected ones also leave their traceback in a log file (``--debug`` prints it instead)."""
    import signal
    import threading

    args = build_parser().parse_args(argv)
    _quiet_onnxruntime()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, _on_signal)
    try:
        return COMMANDS[args.command](args)
    except BitpassError as err:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"bitpass: error: {one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except Terminated as stop:
        print(f"bitpass: stopped by signal {stop.signum}; nothing was written", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("bitpass: interrupted; nothing was written", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        # a plugin or library called sys.exit(): never let it pass for success
        code = exit_.code if isinstance(exit_.code, int) and exit_.code != 0 else 1
        print(f"bitpass: error: something called sys.exit({one_line(repr(exit_.code), 40)}) during "
              f"'{args.command}'; nothing was written", file=sys.stderr)
        return code
    except BaseException as err:  # a bug, or a plugin raising something odd: one line here, the traceback in a log
        if args.debug:
            import traceback

            traceback.print_exc()
            print(f"bitpass: error: {one_line(_describe(err))}", file=sys.stderr)
            return 1
        log = _log_traceback(argv)
        where = f" (traceback in {log}; --debug prints it)" if log else ""
        print(f"bitpass: error: {one_line(_describe(err), MAX_ERROR_CHARS - len(where))}{where}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
