"""``report.html``: the manifest made readable, one self-contained file.

Sections, each under a plain heading: what was done to the model, how good it is, how small and how
fast, the per-layer plan (a bar chart of weight bits and sparsity along the network with sensitivity
beside it, then the table), the size/quality trade-off when the allocation recorded a frontier, the
passes with their seconds, and where it came from. Plots are PNGs drawn with matplotlib's Agg canvas
and inlined as base64, with fixed sizes and no metadata, so the same manifest gives the same bytes.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;padding:1em 1.2em;max-width:1040px;color:#222}
h1{font-size:22px;margin:.3em 0}h2{font-size:18px;margin:1.8em 0 .4em;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:1.2em 0 .3em}p{margin:.4em 0}ul{margin:.3em 0;padding-left:1.3em}
.scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}th{background:#f3f3f3}
td:first-child,th:first-child,.text{text-align:left}td.wrap{white-space:normal;min-width:14em}
img{display:block;max-width:100%;height:auto;margin:.5em 0}
code{overflow-wrap:anywhere;background:#f6f6f6;padding:0 .2em}.muted{color:#666}
.headline{font-size:17px;margin:.6em 0}.good{color:#1a7f37}.bad{color:#b42318}
.bar{display:inline-block;height:.7em;background:#6b8fc7;vertical-align:middle}
"""

#: colours of the per-layer chart, by weight bits (fp32 grey: left as it was)
_BIT_COLOURS = {1: "#2d004b", 2: "#6a1b9a", 3: "#3949ab", 4: "#1e88e5", 5: "#00897b", 6: "#43a047",
                8: "#7cb342", 16: "#fdd835", 32: "#bdbdbd"}
_FALLBACK_COLOUR = "#8d6e63"
#: rotated tick labels on the layer axis: at most this many (the rest are thinned out)
MAX_LAYER_LABELS = 48
#: a label longer than this is shortened in the middle (ids like encoder.layer.11.attention.self.query)
_LABEL_CHARS = 22
#: the per-layer table is folded away (a <details>) above this many layers
_OPEN_TABLE_LAYERS = 60
_DPI = 100
#: stored weight formats as the table names them (layers.stored_weight writes the dtype name)
_STORED_NAMES = {"float": "fp32", "float16": "fp16"}
_WIDTH_IN = 10.0


# --- numbers in words --------------------------------------------------------
def _count(value: float | int | None) -> str:
    """An integer with thousands separators: 359,976."""
    return "-" if value is None else f"{round(value):,}"


def _human_bytes(value: float) -> str:
    """Bytes in powers of 1000, as the budgets are written: 40 KB, 1.2 MB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def _percent(fraction: float | None, digits: int = 1) -> str:
    return "-" if fraction is None else f"{100 * fraction:.{digits}f} %"


def _duration(ms: float | None) -> str:
    """A latency with its unit: µs below a millisecond, ms below a second, else s."""
    if ms is None or ms != ms:
        return "-"
    if ms < 1:
        return f"{ms * 1e3:.3g} µs"
    if ms < 1e3:
        return f"{ms:.3g} ms"
    return f"{ms / 1e3:.3g} s"


def _seconds(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:,.1f} s"


def _shrink(ratio: float | None) -> str:
    """artifact/fp32 as a share and a factor: '9.4 % of fp32 (10.6× smaller)'."""
    if ratio is None or ratio <= 0:
        return "-"
    return f"{_percent(ratio)} of fp32 ({_factor(ratio)})"


def _factor(ratio: float) -> str:
    """artifact/fp32 as words: '10.6× smaller', '1.43× larger', 'about the same' within 2 %."""
    if abs(ratio - 1) < 0.02:
        return "about the same"
    factor = 1 / ratio if ratio < 1 else ratio
    return f"{factor:.3g}× {'smaller' if ratio < 1 else 'larger'}"


def _layers(count: int) -> str:
    return f"{count:,} layer" + ("" if count == 1 else "s")


def _bits(value: Any) -> str:
    if value is None:
        return "-"
    return "fp32" if value == 32 else f"{value:g}" if isinstance(value, float) else str(value)


def _short(label: str, limit: int = _LABEL_CHARS) -> str:
    """``label`` cut in the middle to ``limit`` characters (both ends say most about a layer)."""
    if len(label) <= limit:
        return label
    keep = limit - 1
    return label[: keep // 2] + "…" + label[-(keep - keep // 2):]


# --- HTML pieces ---------------------------------------------------------------
def _esc(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: Sequence[str] | None, rows: Iterable[Sequence[Any]], text_columns: Sequence[int] = (),
           wrap_columns: Sequence[int] = ()) -> str:
    """A table of already formatted cells (escaped here), in a box that scrolls sideways in a narrow window;
    ``text_columns`` are left-aligned, ``wrap_columns`` (sentences) are left-aligned and may wrap."""

    def cls(i: int) -> str:
        if i in wrap_columns:
            return ' class="text wrap"'
        return " class=text" if i in text_columns else ""

    head = "".join(f"<th{cls(i)}>{_esc(h)}</th>" for i, h in enumerate(headers or []))
    head = f"<tr>{head}</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{_esc('-' if c is None else c)}</td>" for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<div class=scroll><table>{head}{body}</table></div>"


def _png(figure: Figure, alt: str) -> str:
    """``figure`` as an inline PNG <img> (no metadata: same figure, same bytes)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    width, height = (round(v) for v in figure.get_size_inches() * _DPI)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{_esc(alt)}" width={width} height={height} src="data:image/png;base64,{data}">'


def _matplotlib_home() -> None:
    """matplotlib keeps its font cache in ``~/.config`` and ``~/.cache`` unless told otherwise: keep it in
    bitpass's own cache folder, so a compile writes nothing outside the places bitpass says it uses. Must run
    before matplotlib is first imported (a user's MPLCONFIGDIR wins)."""
    import os
    import sys

    if "matplotlib" not in sys.modules:
        from bitpass.frontend.cache import cache_dir

        os.environ.setdefault("MPLCONFIGDIR", str(cache_dir() / "matplotlib"))


def _figure(width_in: float, height_in: float) -> Figure:
    _matplotlib_home()
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")


def _plot_style() -> Any:
    """matplotlib's default style whatever the user's matplotlibrc says (so the bytes do not depend on it)."""
    _matplotlib_home()
    import matplotlib.style

    return matplotlib.style.context("default")


# --- the per-layer chart ---------------------------------------------------------
def _bit_colour(bits: float) -> str:
    return _BIT_COLOURS.get(int(bits), _FALLBACK_COLOUR) if float(bits).is_integer() else _FALLBACK_COLOUR


def layer_label(record: dict[str, Any]) -> str:
    return _short(f"{record.get('id')} {record.get('op_type', '')}".strip())


def label_step(count: int, limit: int = MAX_LAYER_LABELS) -> int:
    """Label every ``step``-th layer so that at most ``limit`` labels share the axis."""
    return max(1, math.ceil(count / limit))


def removed_channels(manifest: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Output channels (before, after) of the layers that lost some: prune-channels' record and a joint plan."""
    records = manifest.get("records") or {}
    found: dict[str, str] = dict((records.get("prune-channels") or {}).get("channels") or {})
    for layer_id, entry in ((records.get("allocation") or {}).get("plan") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("channels"), str):
            found.setdefault(layer_id, entry["channels"])
    out = {}
    for layer_id, text in found.items():
        try:
            before, after = (int(part) for part in text.split("->"))
        except ValueError:
            continue
        if after < before:
            out[str(layer_id)] = (before, after)
    return out


def layer_chart(layers: Sequence[dict[str, Any]], channels: dict[str, tuple[int, int]] | None = None
                ) -> Figure | None:
    """Weight bits per layer along the network (bars, log2 axis); beneath it the share of weights zeroed and
    of output channels removed, and sensitivity (log), each when recorded; one legend outside the axes; at
    most ``MAX_LAYER_LABELS`` layer labels."""
    if not layers:
        return None
    n = len(layers)
    kept = [r for r in layers if r.get("status") != "removed"]
    sparsity = [float(r.get("sparsity") or 0.0) for r in layers]
    cut = [1 - channels[r["id"]][1] / channels[r["id"]][0] if channels and r.get("id") in channels else 0.0
           for r in layers]
    pruned = any(s > 0 for s in sparsity) or any(c > 0 for c in cut)
    methods = sorted({m for r in layers for m in (r.get("sensitivity") or {})})
    panels = ["bits", *(["sparsity"] if pruned else []), *(["sensitivity"] if methods else [])]
    step = label_step(n)
    longest = max(len(layer_label(r)) for r in layers[::step])
    height = 0.6 + 1.7 * len(panels) + 0.075 * longest
    figure = _figure(_WIDTH_IN, height)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    positions = list(range(n))
    width = 0.8 if n < 200 else 1.0

    bits_axes = axes[0]
    bits = [((r.get("bits") or {}).get("weight")) for r in layers]
    drawn = [(i, b) for i, b in enumerate(bits) if b is not None and layers[i].get("status") != "removed"]
    bits_axes.bar([i for i, _ in drawn], [b for _, b in drawn], width=width, bottom=0, linewidth=0,
                  color=[_bit_colour(b) for _, b in drawn])
    bits_axes.set_yscale("log", base=2)
    top = max([b for _, b in drawn] + [8])
    bits_axes.set_ylim(1, top * 1.5)
    ticks = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= top]
    bits_axes.set_yticks(ticks, labels=[f"{t}" for t in ticks])
    bits_axes.minorticks_off()
    bits_axes.set_ylabel("weight bits")
    if n <= 40:
        for i, b in drawn:
            bits_axes.annotate(_bits(b), (i, b), ha="center", va="bottom", fontsize=7, xytext=(0, 1),
                               textcoords="offset points")
    removed = [i for i, r in enumerate(layers) if r.get("status") == "removed"]
    if removed:
        bits_axes.plot(removed, [1.2] * len(removed), ls="none", marker="x", color="#b42318", ms=6)

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    present = sorted({b for _, b in drawn})
    handles: list[Any] = [Patch(color=_bit_colour(b), label="fp32" if b == 32 else f"{b:g} bits") for b in present]
    if removed:
        handles.append(Line2D([], [], ls="none", marker="x", color="#b42318", label="removed"))

    row = 1
    if "sparsity" in panels:
        ax = axes[row]
        series = [(values, colour, label) for values, colour, label in
                  ((sparsity, "#8d6e63", "weights zeroed"), (cut, "#e65100", "output channels removed"))
                  if any(v > 0 for v in values)]
        share = width / len(series)
        for k, (values, colour, label) in enumerate(series):
            offset = (k - (len(series) - 1) / 2) * share
            ax.bar([p + offset for p in positions], [100 * v for v in values], width=share, color=colour,
                   linewidth=0)
            handles.append(Patch(color=colour, label=label))
        ax.set_ylim(0, 100)
        ax.set_ylabel("pruned (%)")
        row += 1
    if methods:
        ax = axes[row]
        markers = "os^dv"
        for k, method in enumerate(methods):
            points = [(i, float(r["sensitivity"][method])) for i, r in enumerate(layers)
                      if method in (r.get("sensitivity") or {}) and float(r["sensitivity"][method]) > 0]
            if not points:
                continue
            if len(methods) == 1:
                ax.bar([i for i, _ in points], [v for _, v in points], width=width, color="#546e7a", linewidth=0)
            else:
                ax.plot([i for i, _ in points], [v for _, v in points], ls="none", marker=markers[k % 5], ms=4,
                        color=f"C{k}")
                handles.append(Line2D([], [], ls="none", marker=markers[k % 5], color=f"C{k}",
                                      label=f"sensitivity: {method}"))
        if ax.has_data():
            ax.set_yscale("log")
        ax.set_ylabel(f"sensitivity\n({methods[0]}, log)" if len(methods) == 1 else "sensitivity (log)")

    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_xlim(-0.6, n - 0.4)
    last = axes[-1]
    labelled = positions[::step]
    last.set_xticks(labelled, labels=[layer_label(layers[i]) for i in labelled], rotation=90, fontsize=7)
    last.set_xlabel("layers in network order" + (f" (one label every {step} layers)" if step > 1 else ""))
    if handles:
        figure.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    axes[0].set_title(f"{len(kept)} of {n} layers kept" if removed else f"{n} layers", fontsize=9, loc="left")
    return figure


# --- the size/quality frontier ------------------------------------------------------
def _nice_ticks(lo: float, hi: float) -> list[float]:
    """Round ticks between lo and hi for a log axis: 1-2-5 per decade, 1-1.5-2-3-5-7 when the range is short."""
    ticks = []
    mantissas = (1, 2, 5) if hi / lo > 30 else (1, 1.5, 2, 3, 4, 5, 7)
    for exponent in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for mantissa in mantissas:
            value = mantissa * 10.0 ** exponent
            if lo <= value <= hi:
                ticks.append(value)
    return ticks


def _budget_axis(axes: Axes, dimension: str, values: Sequence[float]) -> None:
    """The x axis of a frontier in its dimension: log2 for average bits, log10 for bytes or BOPs when the range
    spans a factor 3 or more; only the range present, so that 2–8 bits are not squeezed by a run to 32."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    positive = [v for v in values if v is not None and v > 0]
    if not positive:
        axes.set_xlabel(dimension)
        return
    lo, hi = min(positive), max(positive)
    axes.set_xlim(lo / 1.08, hi * 1.08)
    formatter: Any = {"size": _human_bytes, "latency": lambda v: _duration(v * 1e3),
                      "bops": lambda v: f"{v:.3g}"}.get(dimension, lambda v: f"{v:g}")
    label = {"avg-bits": "average weight bits", "size": "weight bytes", "bops": "bit operations (BOPs)",
             "latency": "estimated latency"}.get(dimension, dimension)
    if dimension == "avg-bits":
        axes.set_xscale("log", base=2)
        ticks = [t for t in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32) if lo / 1.08 <= t <= hi * 1.08]
        scale = "log scale"
    elif hi / lo >= 3:
        axes.set_xscale("log")
        ticks = _nice_ticks(lo / 1.08, hi * 1.08)
        scale = "log scale"
    else:
        ticks, scale = [], ""
    if len(ticks) >= 2:
        axes.set_xticks(ticks)
        axes.xaxis.set_minor_locator(NullLocator())
    axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: formatter(v)))
    axes.set_xlabel(f"{label} ({scale})" if scale else label)


def _decade(value: float, _position: Any = None) -> str:
    return "0" if value == 0 else f"$10^{{{round(math.log10(abs(value)))}}}$"


def _loss_axis(axes: Axes, losses: Sequence[float], label: str) -> None:
    """Estimated loss on a symlog axis (the all-fp32 end of a frontier has loss 0): decades from just above the
    smallest positive loss, and 0, so that the ticks near zero do not run into each other."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    positive = [v for v in losses if v > 0]
    low = max(1e-12, min(positive, default=1e-9))
    axes.set_yscale("symlog", linthresh=low)
    if positive:
        first, last = math.floor(math.log10(low)) + 1, math.ceil(math.log10(max(positive)))
        stride = max(1, math.ceil((last - first + 1) / 8))
        decades = [10.0 ** k for k in range(last, first - 1, -stride)]
        axes.set_yticks(([0.0] if min(losses) <= 0 else []) + sorted(decades))
        axes.yaxis.set_minor_locator(NullLocator())
        axes.yaxis.set_major_formatter(FuncFormatter(_decade))
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)


def frontier_chart(frontier: dict[str, Any], allocation: dict[str, Any]) -> Figure:
    """The allocation's frontier (its budget dimension against estimated loss) with the chosen plan, and the
    held-out quality of the plans a sweep measured on a second axis; one legend, below the axes."""
    points = sorted(frontier["recorded"], key=lambda p: p["cost"])
    dimension = frontier["dimension"]
    figure = _figure(8.0, 4.8)
    axes = figure.add_subplot()
    handles = axes.plot([p["cost"] for p in points], [p["loss"] for p in points], marker="o", ms=3, color="C0",
                        label="frontier: estimated loss")
    xs = [p["cost"] for p in points]
    totals = allocation.get("totals", {})
    if dimension in totals and "loss" in totals:
        handles += axes.plot([totals[dimension]], [totals["loss"]], marker="*", ms=15, color="crimson", ls="none",
                             label="chosen plan: estimated loss")
        xs.append(totals[dimension])
    _loss_axis(axes, [p["loss"] for p in points], "estimated loss increase\n(sum over layers)")
    measured = [p for p in frontier.get("measured") or [] if dimension in p.get("totals", {})]
    if measured:
        twin = axes.twinx()
        real = sorted((p for p in measured if not p.get("chosen")), key=lambda p: p["totals"][dimension])
        handles += twin.plot([p["totals"][dimension] for p in real], [100 * p["quality"] for p in real],
                             color="seagreen", marker="s", ms=4, label="measured quality, held-out (%)")
        chosen = [p for p in measured if p.get("chosen")]
        if chosen:
            handles += twin.plot([p["totals"][dimension] for p in chosen], [100 * p["quality"] for p in chosen],
                                 marker="*", ms=13, color="darkgreen", ls="none", label="chosen plan: measured")
        xs += [p["totals"][dimension] for p in measured]
        twin.set_ylabel("held-out accuracy or top-1 agreement (%)")
    _budget_axis(axes, dimension, xs)
    figure.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    return figure


def frontiers_chart(frontiers: dict[str, list[dict[str, float]]], chosen: dict[str, float]) -> Figure:
    """Weight bytes against estimated loss for each allocation mode (allocate-joint's sweep), chosen plan marked."""
    figure = _figure(8.0, 4.6)
    axes = figure.add_subplot()
    handles: list[Any] = []
    xs: list[float] = []
    losses: list[float] = []
    for mode, points in sorted(frontiers.items()):
        if points:
            handles += axes.step([p["size"] for p in points], [p["loss"] for p in points], where="post", marker="o",
                                 ms=2, label={"joint": "bits and channels (joint)", "bits": "bits only",
                                              "sparsity": "channels only"}.get(mode, mode))
            xs += [p["size"] for p in points]
            losses += [p["loss"] for p in points]
    if "size" in chosen and "loss" in chosen:
        handles += axes.plot([chosen["size"]], [chosen["loss"]], marker="*", ms=15, color="crimson", ls="none",
                             label="chosen plan")
        xs.append(chosen["size"])
    _loss_axis(axes, losses, "estimated loss increase")
    _budget_axis(axes, "size", xs)
    figure.legend(handles=handles, loc="outside lower center", ncol=min(4, max(1, len(handles))), fontsize=9,
                  frameon=False)
    return figure


# --- sections -------------------------------------------------------------------------
def _plan_in_words(layers: Sequence[dict[str, Any]], channels: dict[str, tuple[int, int]]) -> list[str]:
    """'2 layers at 2 bits, 1 kept in fp32', activations, zeroed weights, removed channels and layers."""
    if not layers:
        return ["no per-layer records in the manifest"]
    kept = [r for r in layers if r.get("status") != "removed"]
    widths = Counter((r.get("bits") or {}).get("weight", 32) for r in kept)
    parts = [f"{count} at {_bits(b)} bits" if b != 32 else f"{count} kept in fp32"
             for b, count in sorted(widths.items())]
    lines = [f"Weights of {_layers(len(layers))}: " + ", ".join(parts) + "."]
    activations = sum(1 for r in kept if (r.get("bits") or {}).get("activation", 32) < 32)
    if activations:
        lines.append(f"Activations quantized (int8 compute) in {activations:,} of {_layers(len(kept))}.")
    pruned = [r for r in kept if (r.get("sparsity") or 0) > 0]
    if pruned:
        params = sum(r.get("params", 0) for r in layers)
        zeroed = sum(r.get("params", 0) * r["sparsity"] for r in pruned)
        lines.append(f"{_layers(len(pruned))} pruned: {_percent(zeroed / max(params, 1))} of all weights zeroed.")
    if channels:
        before = sum(b for b, _ in channels.values())
        after = sum(a for _, a in channels.values())
        lines.append(f"{_layers(len(channels))} lost output channels: {before:,} → {after:,} channels in "
                     f"{'that layer' if len(channels) == 1 else 'those layers'}.")
    removed = len(layers) - len(kept)
    if removed:
        lines.append(f"{_layers(removed)} removed from the graph.")
    return lines


def _headline(metrics: dict[str, Any]) -> str:
    """One line: how much smaller, how good, how fast."""
    bits = []
    size = metrics.get("size") or {}
    if size.get("weight_ratio"):
        bits.append(f"weights {_human_bytes(size['fp32_weight_bytes'])} → {_human_bytes(size['weight_bytes'])}"
                    f" ({_factor(size['weight_ratio'])})")
    quality = metrics.get("quality") or {}
    if "accuracy" in quality:
        acc = quality["accuracy"]
        bits.append(f"accuracy {_percent(acc['fp32'])} → {_percent(acc['artifact'])}")
    elif quality.get("fidelity"):
        bits.append(f"top-1 agreement with fp32 {_percent(quality['fidelity']['top1_agreement'])}")
    latency = (metrics.get("latency") or {}).get("batch_1")
    if latency:
        bits.append(f"batch 1 {_duration(latency['fp32_ms'])} → {_duration(latency['artifact_ms'])}")
    return f"<p class=headline>{_esc('; '.join(bits))}</p>" if bits else ""


def _what_was_done(manifest: dict[str, Any]) -> str:
    layers = manifest.get("layers") or []
    items = [*_plan_in_words(layers, removed_channels(manifest))]
    notes = [*(manifest.get("records", {}).get("notes") or []), *(manifest.get("input_model", {}).get("notes") or [])]
    out = ["<h2>What was done to the model</h2>",
           f"<p>Compiled for <b>{_esc(manifest.get('backend', '?'))}</b>, target <b>{_esc(manifest.get('target', '?'))}"
           f"</b>, with the pipeline <code>{_esc(manifest.get('pipeline', '?'))}</code>.</p>",
           "<ul>" + "".join(f"<li>{_esc(line)}</li>" for line in items + [f"Note: {n}" for n in notes]) + "</ul>"]
    return "".join(out)


def _how_good(manifest: dict[str, Any]) -> str:
    metrics = manifest.get("metrics", {})
    quality = metrics.get("quality")
    if not quality:
        why = metrics.get("not_measured") or "no evaluation data was given (compile with --eval FILE to measure it)"
        return f"<h2>How good it is</h2><p class=muted>Not measured: {_esc(why)}.</p>"
    rows = []
    if "accuracy" in quality:
        acc = quality["accuracy"]
        drop = acc.get("drop_points", 100 * (acc["fp32"] - acc["artifact"]))
        change = "no change" if abs(drop) < 5e-3 else (f"{drop:.2f} points lower" if drop > 0
                                                       else f"{-drop:.2f} points higher")
        rows.append(["accuracy (labels)", _percent(acc["fp32"], 2), _percent(acc["artifact"], 2), change])
    fid = quality.get("fidelity") or {}
    if fid:
        rows += [["top-1 agreement with fp32", _percent(1.0), _percent(fid["top1_agreement"]), "same predicted class"],
                 ["cosine to fp32 outputs", "1", f"{fid['cosine']:.6f}", "mean over samples; 1 is identical"],
                 ["max abs error", "0", f"{fid['max_abs_error']:.4g}", "largest output difference"]]
    return (f"<h2>How good it is</h2><p>On {_count(quality.get('samples'))} held-out samples (not the calibration "
            f"data).</p>" + _table(["", "fp32", "artifact", ""], rows, wrap_columns=(3,)))


def _how_small_and_fast(manifest: dict[str, Any]) -> str:
    metrics = manifest.get("metrics", {})
    out = ["<h2>How small and how fast</h2>"]
    size = metrics.get("size")
    if size:
        rows = [["weights", _count(size["fp32_weight_bytes"]), _count(size["weight_bytes"]),
                 _shrink(size.get("weight_ratio"))],
                [f"model file ({size.get('file', 'model.onnx')})", _count(size["fp32_file_bytes"]),
                 _count(size["file_bytes"]), _shrink(size.get("file_ratio"))]]
        if "compressed_bytes" in size:
            rows.append(["model file, deflated (zip)", _count(size["fp32_compressed_bytes"]),
                         _count(size["compressed_bytes"]), _shrink(size.get("compressed_ratio"))])
        out.append(_table(["bytes", "fp32", "artifact", "artifact / fp32"], rows, wrap_columns=(3,)))
    latency = metrics.get("latency")
    if latency:
        from bitpass.backends.measure import speed_verdict

        rows = [[key.replace("_", " "), _duration(row.get("fp32_ms")), _duration(row.get("artifact_ms")),
                 speed_verdict(row) if "speedup" in row else "-"] for key, row in latency.items()]
        out.append("<h3>Latency on this machine</h3><p class=muted>Median times; fp32 and the artifact alternate "
                   "in one process; \"same speed\" when the spread of the per-round ratios includes 1.</p>"
                   + _table(["", "fp32", "artifact", "fp32 ÷ artifact"], rows))
    elif metrics.get("not_measured"):
        out.append(f"<p class=muted>Latency not measured: {_esc(metrics['not_measured'])}.</p>")
    else:
        out.append("<p class=muted>Latency not measured (latency measurement was off).</p>")
    return "".join(out)


def _sensitivity_cell(record: dict[str, Any]) -> str | None:
    values = record.get("sensitivity") or {}
    if not values:
        return None
    if len(values) == 1:
        return f"{next(iter(values.values())):.3g}"
    return ", ".join(f"{k} {v:.3g}" for k, v in sorted(values.items()))


def _per_layer(manifest: dict[str, Any]) -> str:
    layers = manifest.get("layers") or []
    out = ["<h2>Per-layer plan</h2>"]
    if not layers:
        out.append("<p class=muted>The manifest records no quantizable layers.</p>")
        return "".join(out)
    channels = removed_channels(manifest)
    with _plot_style():
        figure = layer_chart(layers, channels)
        if figure is not None:
            out.append(_png(figure, "weight bits per layer"))
    methods = sorted({m for r in layers for m in (r.get("sensitivity") or {})})
    rows = []
    for r in layers:
        bits = r.get("bits") or {}
        stored = r.get("stored") or {}
        rows.append([r.get("id"), r.get("op_type"), "×".join(map(str, r.get("weight_shape", []))),
                     _count(r.get("params")), f"{_bits(bits.get('weight'))} / {_bits(bits.get('activation'))}",
                     _percent(r.get("sparsity")) if r.get("sparsity") else "0",
                     *([" → ".join(map(str, channels[r["id"]])) if r.get("id") in channels else "-"]
                       if channels else []),
                     _sensitivity_cell(r), _STORED_NAMES.get(stored.get("format"), stored.get("format", r.get("status"))),
                     _count(r.get("weight_bytes"))])
    sensitivity = f"sensitivity ({methods[0]})" if len(methods) == 1 else "sensitivity"
    headers = ["layer", "op", "fp32 shape", "params", "bits: weight / act.", "zeroed",
               *(["out channels"] if channels else []), sensitivity, "stored as", "bytes"]
    table = _table(headers, rows, text_columns=(1, len(headers) - 2))
    if len(layers) > _OPEN_TABLE_LAYERS:
        table = f"<details><summary>Table of all {len(layers):,} layers</summary>{table}</details>"
    out.append(table)
    allocation = manifest.get("records", {}).get("allocation", {})
    formats = allocation.get("formats")
    if formats:
        plan = allocation.get("plan", {})
        rows = [[k, _bits(plan.get(k)), v.get("format"), v.get("why"), _duration((v.get("ms") or {}).get("1")),
                 _duration((v.get("ms") or {}).get("64"))] for k, v in formats.items()]
        out.append("<h3>Formats chosen from layer timings on this machine</h3>" + _table(
            ["layer", "bits", "format", "why", "layer time, batch 1", "batch 64"], rows, text_columns=(2,),
            wrap_columns=(3,)))
    return "".join(out)


def _trade_off(manifest: dict[str, Any]) -> str:
    allocation = manifest.get("records", {}).get("allocation", {})
    parts = []
    with _plot_style():
        if allocation.get("frontier", {}).get("recorded"):
            parts.append(_png(frontier_chart(allocation["frontier"], allocation), "size/quality frontier"))
        if any(allocation.get("frontiers", {}).values()):
            parts.append("<p>Joint allocation: bits and removed channels under one size budget, against bits "
                         "only and channels only.</p>"
                         + _png(frontiers_chart(allocation["frontiers"], allocation.get("totals", {})),
                                "frontiers: joint, bits only, channels only"))
    if not parts:
        return ""
    return ("<h2>Size against quality</h2><p>Each point is the best plan the allocator found at that budget; "
            "the star is the plan compiled here.</p>" + "".join(parts))


def _passes(manifest: dict[str, Any]) -> str:
    passes = manifest.get("passes") or []
    if not passes:
        return ""
    longest = max(p["seconds"] for p in passes) or 1.0
    total = sum(p["seconds"] for p in passes)
    body = "".join(
        f"<tr><td class=text><code>{_esc(p['pass'])}</code></td><td>{_esc(_seconds(p['seconds']))}</td>"
        f"<td class=text><span class=bar style=\"width:{120 * p['seconds'] / longest:.0f}px\"></span></td></tr>"
        for p in passes)
    return (f"<h2>Passes and their seconds</h2><p>{len(passes)} passes, {_seconds(total)} in all (measuring the "
            f"artifact afterwards not included).</p><div class=scroll><table><tr><th>pass</th><th>seconds</th>"
            f"<th></th></tr>{body}</table></div>")


def _provenance(manifest: dict[str, Any]) -> str:
    model = manifest.get("input_model", {})
    rows = [["input model", f"{model.get('name', '?')} ({model.get('kind', '?')})"],
            ["input sha256", model.get("sha256", "-")]]
    for role, data in (manifest.get("data") or {}).items():
        if data:
            rows.append([f"{role} data", f"{data['source']}: {_count(data['samples'])} samples, "
                                         f"sha256 {data['sha256'][:16]}…"])
    if "seed" in manifest:
        rows.append(["seed", manifest["seed"]])
    rows += [[k, v] for k, v in sorted((manifest.get("versions") or {}).items())]
    return "<h2>Where it came from</h2>" + _table(None, rows, wrap_columns=(1,))


def render(manifest: dict[str, Any]) -> str:
    """The report for ``manifest``: one HTML file, images inline, same manifest → same bytes."""
    name = manifest.get("input_model", {}).get("name", "model")
    parts = ["<!doctype html><html lang=en><meta charset=utf-8>",
             "<meta name=viewport content=\"width=device-width,initial-scale=1\">",
             f"<title>bitpass: {_esc(name)}</title><style>{_STYLE}</style>",
             f"<h1>bitpass artifact: {_esc(name)}</h1>", _headline(manifest.get("metrics", {})),
             _what_was_done(manifest), _how_good(manifest), _how_small_and_fast(manifest), _per_layer(manifest),
             _trade_off(manifest), _passes(manifest), _provenance(manifest)]
    return "\n".join(p for p in parts if p) + "\n"
