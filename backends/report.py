"""``report.html``: the manifest made readable (summary, measurements, per-layer table, passes)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

_STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
h1{font-size:20px}h2{font-size:16px;margin-top:2em}.muted{color:#777}"""


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def _frontier_plot(frontier: dict[str, Any], chosen: dict[str, Any]) -> str:
    """A PNG (as an <img>) of the allocation's frontier (budget dimension vs estimated loss), chosen point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(frontier["recorded"], key=lambda p: p["cost"])
    dimension = frontier["dimension"]
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    axes.plot([p["cost"] for p in points], [p["loss"] for p in points], marker="o", ms=3, label="Pareto frontier")
    if dimension in chosen.get("totals", {}):
        axes.plot([chosen["totals"][dimension]], [chosen["totals"]["loss"]], marker="*", ms=14, color="crimson",
                  ls="none", label="chosen plan")
    axes.set_xlabel(dimension)
    axes.set_ylabel("estimated loss increase (sum over layers)")
    axes.set_yscale("symlog", linthresh=max(1e-9, min((p["loss"] for p in points if p["loss"] > 0), default=1e-9)))
    axes.grid(alpha=0.3)
    measured = frontier.get("measured")
    if measured:
        twin = axes.twinx()
        real = sorted((p for p in measured if not p.get("chosen")), key=lambda p: p["totals"][dimension])
        twin.plot([p["totals"][dimension] for p in real], [100 * p["quality"] for p in real], color="seagreen",
                  marker="s", ms=4, label="measured quality (%)")
        for p in measured:
            if p.get("chosen"):
                twin.plot([p["totals"][dimension]], [100 * p["quality"]], marker="*", ms=12, color="darkgreen",
                          ls="none")
        twin.set_ylabel("held-out accuracy or top-1 agreement (%)")
        twin.legend(loc="center right")
    axes.legend(loc="upper right")
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return f'<img alt="frontier" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _frontiers_plot(frontiers: dict[str, list[dict[str, float]]], chosen: dict[str, float]) -> str:
    """Size vs estimated loss for each allocation mode (allocate-joint's sweep), the chosen plan marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for mode, points in sorted(frontiers.items()):
        if points:
            axes.step([p["size"] for p in points], [p["loss"] for p in points], where="post", marker="o", ms=2,
                      label=mode)
    if "size" in chosen and "loss" in chosen:
        axes.plot([chosen["size"]], [chosen["loss"]], marker="*", ms=14, color="crimson", ls="none",
                  label="chosen plan")
    axes.set_xlabel("weight bytes")
    axes.set_ylabel("estimated loss increase")
    axes.set_yscale("symlog", linthresh=1e-6)
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return f'<img alt="frontiers" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def render(manifest: dict[str, Any]) -> str:
    metrics = manifest.get("metrics", {})
    parts = [f"<!doctype html><meta charset=utf-8><title>bitpass artifact</title><style>{_STYLE}</style>",
             f"<h1>bitpass artifact: {html.escape(manifest['input_model']['name'])}</h1>",
             f"<p>backend <b>{html.escape(manifest['backend'])}</b>, target <b>{html.escape(manifest['target'])}"
             f"</b>, pipeline <code>{html.escape(manifest['pipeline'])}</code></p>"]
    size = metrics.get("size")
    if size:
        parts.append("<h2>Size</h2>" + _table(["", "fp32", "artifact", "ratio"], [
            ["weight bytes", size["fp32_weight_bytes"], size["weight_bytes"], size["weight_ratio"]],
            ["model file bytes", size["fp32_file_bytes"], size["file_bytes"], size["file_ratio"]],
            *([["deflated file bytes (zip)", size["fp32_compressed_bytes"], size["compressed_bytes"],
                size["compressed_ratio"]]] if "compressed_bytes" in size else [])]))
    quality = metrics.get("quality")
    if quality:
        rows = []
        if "accuracy" in quality:
            acc = quality["accuracy"]
            rows.append(["accuracy", acc["fp32"], acc["artifact"], f"drop {acc['drop_points']:.2f} pt"])
        fid = quality["fidelity"]
        rows += [["top-1 agreement", 1.0, fid["top1_agreement"], ""], ["cosine", 1.0, fid["cosine"], ""],
                 ["max abs error", 0.0, fid["max_abs_error"], ""]]
        parts.append(f"<h2>Quality on {quality['samples']} held-out samples</h2>"
                     + _table(["", "fp32", "artifact", ""], rows))
    lat = metrics.get("latency")
    if lat:
        parts.append("<h2>Latency (median, same process, alternating)</h2>" + _table(
            ["", "fp32 ms", "artifact ms", "speedup"],
            [[k.replace("_", " "), v["fp32_ms"], v["artifact_ms"], v["speedup"]] for k, v in lat.items()]))
    allocation = manifest.get("records", {}).get("allocation", {})
    if allocation.get("frontier"):
        parts.append("<h2>Frontier</h2>" + _frontier_plot(allocation["frontier"], allocation))
    if allocation.get("frontiers"):
        parts.append("<h2>Frontiers: joint vs bits-only vs sparsity-only</h2>"
                     + _frontiers_plot(allocation["frontiers"], allocation.get("totals", {})))
    if allocation.get("formats"):
        parts.append("<h2>Per-layer format choice</h2>" + _table(
            ["layer", "bits", "format", "why", "ms at batch 1", "ms at batch 64"],
            [[k, allocation["plan"].get(k), v["format"], v["why"], v["ms"].get("1"), v["ms"].get("64")]
             for k, v in allocation["formats"].items()]))
    layers = manifest.get("layers", [])
    if layers:
        rows = []
        for r in layers:
            bits = r.get("bits", {})
            sens = ", ".join(f"{k}={v:.3g}" for k, v in sorted(r.get("sensitivity", {}).items()))
            rows.append([r["id"], r["op_type"], "x".join(map(str, r["weight_shape"])), r["params"],
                         bits.get("weight"), bits.get("activation"), r.get("sparsity"), sens or None,
                         (r.get("stored") or {}).get("format", r.get("status")), r.get("weight_bytes")])
        parts.append("<h2>Layers</h2>" + _table(
            ["layer", "op", "weight shape", "params", "w bits", "a bits", "sparsity", "sensitivity", "stored as",
             "bytes"], rows))
    passes = manifest.get("passes", [])
    if passes:
        parts.append("<h2>Passes</h2>" + _table(["pass", "seconds"], [[p["pass"], p["seconds"]] for p in passes]))
    versions = manifest.get("versions", {})
    parts.append("<h2>Provenance</h2>" + _table(["", ""], [
        ["input sha256", manifest["input_model"]["sha256"]],
        *[[f"{role} data", f"{d['source']} ({d['samples']} samples, sha256 {d['sha256'][:16]}…)"]
          for role, d in manifest.get("data", {}).items() if d],
        *[[k, v] for k, v in sorted(versions.items())]]))
    return "\n".join(parts) + "\n"
