"""How long and how much memory ``bitpass compile`` takes on real-size decoders (issue 14, part 5).

    python -m bitpass.tools.bench_compile_size --models gpt2-small,gpt2-medium --pipelines optimize,avg-bits=4

Each model is built from a transformers config (GPT-2 small 124 M / medium 355 M parameters, and ``gpt2-wide``: width
2048, 12 layers, 709 M, over protobuf's 2 GiB in fp32; seeded random init: no hub download), exported with its KV cache the way ``compile`` exports a transformers causal LM
(``export_decoder``), and saved as a user's exporter saves it: ``model.onnx`` with the weights as external data
beside it (``--layout single`` writes one file). Calibration and held-out token ids are windows of the standard
library's text as bytes (only time and memory are measured here: the weights are random).

Every export and compile runs in its own child process, with a cold ``BITPASS_CACHE_DIR``; the child's wall time,
CPU seconds (user + system, children included) and peak resident memory come from the kernel (``os.wait4``), and
its progress lines are stamped with wall, CPU and the largest resident size seen since the line before (polled),
so the phases outside the pass pipeline (import, emit, quality gate, summary) are profiled as well. The manifest's
per-pass records (``records.resources``) are printed beside them. On a shared machine wall time counts other
people's work, CPU seconds do not: read them side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitpass.tools.processes import kill_group, private_rss_mb, tree_rss_mb

#: the models this bench builds: name -> GPT-2 size of ``bitpass.tools.decoders.GPT2_SIZES`` ("tiny": a smoke test)
MODELS = {"gpt2-small": "small", "gpt2-medium": "medium", "gpt2-wide": "wide", "gpt2-tiny": "tiny"}
#: seconds between resident-memory polls of a child
POLL_S = 0.1
#: the lines of a child that start a phase (``bitpass`` progress lines on stderr; the rest is only logged)
PROGRESS_PREFIX = "[bitpass]"


@dataclass
class Phase:
    """One progress line of a child and what the child spent until the next one."""

    message: str
    at_s: float  # wall seconds since the child started, when the line came
    cpu_at_s: float  # the child's CPU seconds then
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0  # largest resident size (the child and its descendants) polled until the next line
    main_rss_mb: float = 0.0  # the same, of the child alone (the rest: timing subprocesses it started)
    main_anon_mb: float = 0.0  # the child's anonymous resident memory (its own copies; mapped weights not counted)


@dataclass
class Finished:
    """A child process's accounting (the kernel's, from ``wait4``) and its stamped progress."""

    returncode: int | None
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    stopped: str = ""  # "timeout" or "memory" when the bench killed it
    phases: list[Phase] = field(default_factory=list)
    tail: str = ""  # the last lines it printed


def _proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, waited-for children included) of a running process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks  # utime stime cutime cstime


def run_accounted(argv: list[str], *, env: dict[str, str], timeout_s: float, memory_limit_mb: float,
                  log: Path, echo: bool = True) -> Finished:
    """Run ``argv``; stamp each line it prints; kill its process group past ``timeout_s`` or above
    ``memory_limit_mb`` resident (itself and its descendants, polled). Peak and CPU come from ``wait4``."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True, text=True, bufsize=1)
    phases = [Phase("(start)", 0.0, 0.0)]
    lines: list[str] = []
    lock = threading.Lock()

    def reader() -> None:
        assert process.stdout is not None
        with log.open("w") as out:
            for line in process.stdout:
                out.write(line)
                out.flush()
                text = line.rstrip()
                lines.append(text)
                if echo:
                    print(f"    | {text}", flush=True)
                if not text.startswith(PROGRESS_PREFIX):
                    continue
                with lock:
                    phases.append(Phase(text[len(PROGRESS_PREFIX):].strip()[:160], time.perf_counter() - start, _proc_cpu_s(process.pid) or 0.0))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    stopped = ""
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            break
        rss, own = tree_rss_mb(process.pid)
        with lock:
            phases[-1].peak_rss_mb = max(phases[-1].peak_rss_mb, rss)
            phases[-1].main_rss_mb = max(phases[-1].main_rss_mb, own)
            phases[-1].main_anon_mb = max(phases[-1].main_anon_mb, private_rss_mb(process.pid))
        elapsed = time.perf_counter() - start
        if not stopped and elapsed > timeout_s:
            stopped = "timeout"
        elif not stopped and rss > memory_limit_mb:
            stopped = "memory"
        if stopped:
            kill_group(process.pid)
            _, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(POLL_S)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    thread.join(timeout=5)
    cpu = usage.ru_utime + usage.ru_stime
    end = Phase("(end)", wall, cpu)
    for here, after in zip(phases, [*phases[1:], end]):
        here.seconds = round(after.at_s - here.at_s, 2)
        here.cpu_seconds = round(after.cpu_at_s - here.cpu_at_s, 2)
        here.peak_rss_mb = round(here.peak_rss_mb, 1)
        here.main_rss_mb = round(here.main_rss_mb, 1)
        here.main_anon_mb = round(here.main_anon_mb, 1)
    return Finished(process.returncode, round(wall, 2), round(cpu, 2), round(usage.ru_maxrss / 1024, 1), stopped,
                    phases, "\n".join(lines[-5:]))


# --- the exported model (child process) -------------------------------------------------------------------------
def export(size: str, folder: Path, layout: str, calib: tuple[int, int], evaluation: tuple[int, int]) -> None:
    """Build GPT-2 ``size``, export it with its KV cache, save it (``layout``) and the token-id data into ``folder``."""
    import numpy as np
    import torch

    from bitpass.frontend.decoder import export_decoder
    from bitpass.tools import decoders

    torch.set_num_threads(1)
    folder.mkdir(parents=True, exist_ok=True)
    lm = decoders.tiny_gpt2() if size == "tiny" else decoders.gpt2_sized(size)
    print(f"built gpt2-{size}: {sum(p.numel() for p in lm.parameters()) / 1e6:.1f} M parameters", flush=True)
    model, _ = export_decoder(lm, name=f"gpt2-{size}")
    del lm
    print("exported", flush=True)
    path = folder / "model.onnx"
    if layout == "external":
        model.save_external(path)
    else:
        model.save(path)
    corpus = decoders.text_corpus()
    np.savez(folder / "calib.npz", input_ids=corpus.calibration(calib[1], calib[0]))
    np.savez(folder / "eval.npz", input_ids=corpus.evaluation(evaluation[1], evaluation[0]))
    print("saved", flush=True)


# --- one row per (model, pipeline) --------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    pipeline: str
    layout: str
    input_bytes: int
    export: dict[str, Any]
    compile: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)


def _pipeline_args(pipeline: str) -> list[str]:
    """``optimize`` -> ``--pipeline optimize``; ``avg-bits=4`` -> ``--budget avg-bits=4``; a spec with options
    (``fuse-transformer(attention=true)``) is a pipeline."""
    budget = "=" in pipeline and "(" not in pipeline
    return ["--budget", pipeline] if budget else ["--pipeline", pipeline]


def _manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    records = manifest.get("records", {})
    metrics = manifest.get("metrics", {})
    size = metrics.get("size", {})
    gate = records.get("quality_gate", {})
    return {"resources": records.get("resources", {}), "size": size,
            "files": {name: entry.get("bytes") for name, entry in (manifest.get("files") or {}).items()
                      if isinstance(entry, dict)},
            "quality_gate": {k: gate.get(k) for k in ("passed", "final_text", "seconds")},
            "memory": metrics.get("memory", {}), "latency": metrics.get("latency", {}),
            "transformer_fusion": records.get("transformer_fusion", {})}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def bench(name: str, pipelines: list[str], args: argparse.Namespace) -> list[Row]:
    size = MODELS[name]
    layout = args.layout if args.layout != "auto" else "external"
    folder = args.workdir / f"{name}-{layout}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    stamp = folder / "export.json"
    if stamp.is_file() and (folder / "model.onnx").is_file():
        exported = json.loads(stamp.read_text())
        print(f"{name}: reusing the export in {folder}", flush=True)
    else:
        print(f"{name}: exporting ({layout}) into {folder}", flush=True)
        request = json.dumps({"size": size, "folder": str(folder), "layout": layout,
                              "calib": [args.calib_windows, args.calib_length],
                              "evaluation": [args.eval_windows, args.eval_length]})
        folder.mkdir(parents=True, exist_ok=True)
        done = run_accounted([sys.executable, "-m", "bitpass.tools.bench_compile_size", "--export-request", request],
                             env=env, timeout_s=args.timeout, memory_limit_mb=args.memory_limit_mb,
                             log=folder / "export.log")
        if done.returncode != 0:
            raise SystemExit(f"{name}: export failed ({done.stopped or f'exit {done.returncode}'}):\n{done.tail}")
        exported = {k: v for k, v in asdict(done).items() if k != "tail"}
        stamp.write_text(json.dumps(exported))
    if args.export_only:
        return []
    rows = []
    for pipeline in pipelines:
        out = args.workdir / f"{name}-{layout}-{re.sub(r'[^A-Za-z0-9.-]+', '', pipeline)[:40]}"
        with tempfile.TemporaryDirectory(prefix="bitpass-bench-cache-") as cache:
            argv = [sys.executable, "-m", "bitpass.tools", "compile", str(folder / "model.onnx"), "-o", str(out),
                    "--force", *_pipeline_args(pipeline), "--calib", str(folder / "calib.npz"),
                    "--eval", str(folder / "eval.npz"), *args.compile_args]
            print(f"{name} {pipeline}: {' '.join(argv[2:])}", flush=True)
            done = run_accounted(argv, env={**env, "BITPASS_CACHE_DIR": cache}, timeout_s=args.timeout,
                                 memory_limit_mb=args.memory_limit_mb, log=args.workdir / f"{out.name}.log",
                                 echo=not args.quiet)
        manifest_path = out / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if done.returncode == 0 and manifest_path.is_file() else {}
        rows.append(Row(name, pipeline, layout, _folder_bytes(folder), exported,
                        {k: v for k, v in asdict(done).items()}, _manifest_summary(manifest)))
        print_row(rows[-1])
        if not args.keep and out.is_dir() and done.returncode == 0:
            import shutil

            shutil.rmtree(out)
    return rows


def print_row(row: Row) -> None:
    """The phases of one compile (wall, CPU, peak RSS) and the manifest's per-pass records."""
    done = row.compile
    gb = 1024.0
    print(f"\n{row.model} {row.pipeline}: exit {done['returncode']}{' (' + done['stopped'] + ')' if done['stopped'] else ''}"
          f", wall {done['wall_s']:.0f} s, CPU {done['cpu_s']:.0f} s, peak RSS {done['peak_rss_mb'] / gb:.2f} GB")
    print(f"  {'phase (progress line)':70s} {'wall s':>7s} {'CPU s':>7s} {'peak GB':>8s} {'main GB':>8s} {'anon GB':>8s}")
    for phase in done["phases"]:
        peaks = [f"{phase[k] / gb:8.2f}" if phase[k] else f"{'-':>8s}"  # shorter than a poll
                 for k in ("peak_rss_mb", "main_rss_mb", "main_anon_mb") if k in phase]
        print(f"  {phase['message'][:70]:70s} {phase['seconds']:7.1f} {phase['cpu_seconds']:7.1f} {' '.join(peaks)}")
    resources = row.manifest.get("resources") or {}
    if resources:
        print(f"  manifest: peak {resources.get('peak_rss_mb', 0) / gb:.2f} GB at the end of the passes, "
              f"{resources.get('compile_peak_rss_mb', 0) / gb:.2f} GB for the whole compile (without its children); "
              f"per pass:")
        for entry in resources.get("passes", []):
            print(f"    {entry['pass'][:60]:60s} {entry['seconds']:7.1f} s {entry.get('cpu_seconds', 0):7.1f} CPU s "
                  f"{entry.get('peak_rss_mb', 0) / gb:6.2f} GB")
        after = resources.get("peak_rss_mb_after") or {}
        if after:  # the kernel's high-water mark at the end of each phase of the compile (without its children)
            print("  manifest: peak so far at the end of " + ", ".join(f"{k.replace('_', ' ')} {v / gb:.2f} GB"
                                                                    for k, v in after.items())
                  + (f"; {resources['paged_out_mb'] / gb:.2f} GB of weights paged out"
                     if resources.get("paged_out_mb") else ""))
    files = row.manifest.get("files") or {}
    if files:
        print("  artifact files: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in files.items() if v))


def print_table(rows: list[Row]) -> None:
    from bitpass.frontend.cpu import host

    print()
    print(host().describe())
    print(f"{'model':12s} {'pipeline':11s} {'layout':8s} {'input MB':>8s} {'export s':>8s} {'exp GB':>6s} "
          f"{'wall s':>7s} {'CPU s':>7s} {'peak GB':>7s} {'own GB':>6s} {'anon GB':>7s} {'artifact MB':>11s} "
          f"{'gate':>5s} status")
    print("(peak: the compile and the processes it started, largest of them, from wait4; own: the compile process's "
          "high-water mark, its manifest's compile_peak_rss_mb; anon: its largest anonymous resident memory polled, "
          "what it holds as its own copies, mapped weights not counted)")
    for row in rows:
        done, export_ = row.compile, row.export
        files = row.manifest.get("files") or {}
        artifact = sum(v for k, v in files.items() if v and k != "report.html") / 1e6
        gate = (row.manifest.get("quality_gate") or {}).get("passed")
        status = "ok" if done["returncode"] == 0 else (done["stopped"] or f"exit {done['returncode']}")
        own = (row.manifest.get("resources") or {}).get("compile_peak_rss_mb", 0.0)
        anon = max([p.get("main_anon_mb", 0.0) for p in done["phases"]], default=0.0)
        print(f"{row.model:12s} {row.pipeline:11s} {row.layout:8s} {row.input_bytes / 1e6:8.0f} "
              f"{export_['wall_s']:8.0f} {export_['peak_rss_mb'] / 1024:6.2f} {done['wall_s']:7.0f} {done['cpu_s']:7.0f} "
              f"{done['peak_rss_mb'] / 1024:7.2f} {own / 1024:6.2f} {anon / 1024:7.2f} {artifact:11.1f} "
              f"{str(gate):>5s} {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-small", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--pipelines", default="optimize",
                        help="comma-separated: a pipeline name (optimize, ...) or a budget (avg-bits=4)")
    parser.add_argument("--layout", choices=["auto", "external", "single"], default="auto",
                        help="how the input model is saved (auto: external data, what torch.onnx.export writes)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-compile-size"))
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--calib-length", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-length", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a child is killed")
    parser.add_argument("--memory-limit-mb", type=float, default=12000,
                        help="resident MiB (child and its descendants) above which a child is killed")
    parser.add_argument("--keep", action="store_true", help="keep the artifacts")
    parser.add_argument("--export-only", action="store_true", help="export the models (reused later), compile nothing")
    parser.add_argument("--quiet", action="store_true", help="do not echo the compile's progress lines")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--compile-arg", dest="compile_args", action="append", default=[],
                        help="an extra argument for `bitpass compile` (repeat)")
    parser.add_argument("--export-request", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export_request:
        request = json.loads(args.export_request)
        export(request["size"], Path(request["folder"]), request["layout"], tuple(request["calib"]),
               tuple(request["evaluation"]))
        return 0
    from bitpass.frontend.cpu import host

    print(host().describe(), flush=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}: use {', '.join(MODELS)}")
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for name in models:
        rows.extend(bench(name, pipelines, args))
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"cpu": host().as_dict(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
