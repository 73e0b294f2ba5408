"""report.html from real compilations: always a per-layer chart, sensitivity and pruning beside it when recorded,
the frontier with one legend off the data, numbers written for people, same manifest -> same bytes, and the page
as headless Chromium draws it (skipped without Chromium unless BITPASS_REQUIRE_CHROMIUM=1)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitpass.backends import report
from bitpass.tools.api import compile

IMAGE = re.compile(r'<img alt="([^"]+)" width=(\d+) height=(\d+) src="data:image/png;base64,([^"]+)">')


def _compile(digits_files: Path, out: Path, **options):
    """Report tests are about rendering: an artifact that misses the quality gate is kept (and drawn)."""
    return compile(digits_files / "model.onnx", out, calibration=digits_files / "calib.npz", allow_quality_loss=True,
                   **options)


@pytest.fixture(scope="module")
def int8(tmp_path_factory, digits_files):
    """The default pipeline, measured: quality on held-out data and latency."""
    return _compile(digits_files, tmp_path_factory.mktemp("report") / "int8", evaluation=digits_files / "eval.npz")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, digits_files):
    """Mixed precision from sensitivity with the frontier swept over average bits (quality measured per plan)."""
    return _compile(digits_files, tmp_path_factory.mktemp("report") / "swept", evaluation=digits_files / "eval.npz",
                    latency=False, overrides={"allocate-bits": {"budget": "avg-bits=4", "sweep": True}})


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, digits_files):
    """Channels removed from the graph and half of the remaining weights zeroed, then int8."""
    pipeline = ("fold-constants,eliminate-dead-nodes,fuse,prune-channels(ratio=0.25),prune(sparsity=0.5),"
                "calibrate(method=minmax),quantize")
    return _compile(digits_files, tmp_path_factory.mktemp("report") / "pruned", evaluation=digits_files / "eval.npz",
                    pipeline=pipeline, latency=False)


def _deep_mlp(layers: int) -> onnx.ModelProto:
    """``layers`` MatMul+Relu blocks named like a real network's (block17.fc)."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "input"
    for i in range(layers):
        weights.append(numpy_helper.from_array((rng.standard_normal((16, 16)) / 4).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"], name=f"block{i}.fc"),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"block{i}.act")]
        previous = f"r{i}"
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", 16])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 240-layer network pruned with per-layer ratios from global importance (no evaluation data)."""
    calibration = {"input": np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)}
    return compile(_deep_mlp(240), tmp_path_factory.mktemp("report") / "deep", calibration=calibration,
                   pipeline="prune(sparsity=0.5,allocation=global)", latency=False, allow_quality_loss=True)


def _images(page: str) -> dict[str, tuple[int, int, bytes]]:
    return {alt: (int(w), int(h), base64.b64decode(data)) for alt, w, h, data in IMAGE.findall(page)}


def _png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


# --- what the report draws ----------------------------------------------------------
def test_every_report_draws_weight_bits_per_layer(int8):
    page = (int8.path / "report.html").read_text()
    images = _images(page)
    assert "weight bits per layer" in images and "size/quality frontier" not in images  # no sweep, no frontier
    width, height, png = images["weight bits per layer"]
    assert _png_size(png) == (width, height) and width == 1000
    figure = report.layer_chart(int8.manifest["layers"])
    assert len(figure.axes) == 1  # bits only: nothing pruned, no sensitivity recorded
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert labels == [report.layer_label(r) for r in int8.manifest["layers"]]  # in the manifest's order


def test_sensitivity_is_drawn_beside_the_bits_on_a_log_axis(swept):
    figure = report.layer_chart(swept.manifest["layers"])
    bits_axes, sensitivity_axes = figure.axes
    assert bits_axes.get_yscale() == "log" and sensitivity_axes.get_yscale() == "log"
    assert "output-kl" in sensitivity_axes.get_ylabel()
    heights = sorted(round(p.get_height()) for p in bits_axes.patches)
    assert heights == sorted(r["bits"]["weight"] for r in swept.manifest["layers"])


def test_pruning_shows_zeroed_weights_and_removed_channels(pruned):
    channels = report.removed_channels(pruned.manifest)
    assert channels and all(after < before for before, after in channels.values())
    figure = report.layer_chart(pruned.manifest["layers"], channels)
    pruned_axes = figure.axes[1]
    assert pruned_axes.get_ylabel() == "pruned (%)"
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert {"weights zeroed", "output channels removed"} <= set(legend)
    page = (pruned.path / "report.html").read_text()
    layer, (before, after) = next(iter(channels.items()))
    assert f"{before} → {after}" in page and "lost output channels" in page and "of all weights zeroed" in page


def test_the_sweep_frontier_has_one_legend_clear_of_the_data_and_a_log2_bits_axis(swept):
    frontier = swept.manifest["records"]["allocation"]["frontier"]
    assert frontier["dimension"] == "avg-bits" and frontier["measured"]
    figure = report.frontier_chart(frontier, swept.manifest["records"]["allocation"])
    figure.draw_without_rendering()
    axes = figure.axes[0]
    assert len(figure.legends) == 1 and all(ax.get_legend() is None for ax in figure.axes)
    legend_box = figure.legends[0].get_window_extent()
    assert not any(legend_box.overlaps(ax.get_window_extent()) for ax in figure.axes)
    assert axes.get_xscale() == "log" and axes.xaxis.get_transform().base == 2
    costs = [p["cost"] for p in frontier["recorded"]]
    low, high = axes.get_xlim()
    assert min(costs) / 1.1 <= low and high <= max(costs) * 1.1  # the bits range present, not 0..32
    ticks = [t for t in axes.get_xticks() if low <= t <= high]
    assert {2, 4, 8} <= set(ticks)
    names = [t.get_text() for t in figure.legends[0].get_texts()]
    assert "measured quality, held-out (%)" in names and "chosen plan: measured" in names


def test_the_joint_frontiers_share_one_legend_below_a_log_bytes_axis(tmp_path, digits_files):
    joint = _compile(digits_files, tmp_path / "joint", pipeline="joint", latency=False,
                     overrides={"allocate-joint": {"budget": "size=0.08x", "sweep": True}})
    allocation = joint.manifest["records"]["allocation"]
    figure = report.frontiers_chart(allocation["frontiers"], allocation["totals"])
    figure.draw_without_rendering()
    assert len(figure.legends) == 1 and figure.axes[0].get_legend() is None
    assert not figure.legends[0].get_window_extent().overlaps(figure.axes[0].get_window_extent())
    assert figure.axes[0].get_xscale() == "log"
    assert "size/quality frontier" not in _images((joint.path / "report.html").read_text())
    assert "frontiers: joint, bits only, channels only" in _images((joint.path / "report.html").read_text())


# --- numbers -------------------------------------------------------------------------------
def test_numbers_are_written_for_people(int8):
    page = html.unescape((int8.path / "report.html").read_text())
    metrics = int8.metrics
    size = metrics["size"]
    assert f"{size['fp32_weight_bytes']:,}" in page and f"{size['weight_bytes']:,}" in page
    assert size["fp32_weight_bytes"] >= 1000 and "," in f"{size['fp32_weight_bytes']:,}"
    params = [r["params"] for r in int8.manifest["layers"] if r["params"] >= 1000]
    assert params and all(f"{p:,}" in page for p in params)
    fidelity = metrics["quality"]["fidelity"]
    assert f"{100 * fidelity['top1_agreement']:.1f} %" in page
    assert f"{fidelity['cosine']:.6f}" in page
    accuracy = metrics["quality"]["accuracy"]
    assert f"{100 * accuracy['artifact']:.2f} %" in page
    for row in metrics["latency"].values():
        assert report._duration(row["artifact_ms"]) in page
        assert re.search(r"\d (µs|ms|s)$", report._duration(row["artifact_ms"]))


def test_each_section_has_a_plain_heading(swept):
    headings = re.findall(r"<h2>([^<]+)</h2>", (swept.path / "report.html").read_text())
    assert headings == ["What was done to the model", "How good it is", "How small and how fast", "Per-layer plan",
                        "Size against quality", "Passes and their seconds", "Where it came from"]


def test_the_same_manifest_gives_the_same_bytes(swept):
    import matplotlib

    first = report.render(swept.manifest)
    with matplotlib.rc_context({"lines.linewidth": 7, "font.size": 20, "axes.prop_cycle": matplotlib.cycler(
            color=["k"])}):
        second = report.render(swept.manifest)  # a user's matplotlib settings do not leak into the report
    assert first == second
    assert first == (swept.path / "report.html").read_text()
    assert "<script" not in first and not re.search(r'(src|href)="(?!data:)', first)  # one file, nothing fetched


# --- manifests with parts missing ---------------------------------------------------
def test_without_evaluation_data_quality_and_latency_say_why_they_are_missing(deep):
    page = (deep.path / "report.html").read_text()
    assert "Not measured: no evaluation data was given" in page
    assert "Latency not measured" in page
    assert "weight bits per layer" in _images(page)


def test_a_cross_compiled_tvm_artifact_reports_size_and_what_was_not_measured(tmp_path, digits_files):
    pytest.importorskip("tvm", reason="the TVM backend needs apache-tvm (pip install -e '.[tvm]')")
    from bitpass.backends.tvm import TvmBackend
    from bitpass.frontend.errors import BitpassError

    if TvmBackend().runs_on_host("aarch64-neon"):
        pytest.skip("this machine runs aarch64 artifacts natively")
    try:
        artifact = compile(digits_files / "model.onnx", tmp_path / "arm", backend="tvm", target="aarch64-neon",
                           pipeline="optimize", latency=False)
    except BitpassError as err:
        if "aarch64-linux-gnu-gcc" in str(err) or "cross" in str(err):
            pytest.skip(f"no ARM64 cross compiler here: {err}")
        raise
    page = html.unescape((artifact.path / "report.html").read_text())
    assert "Not measured: target aarch64-neon does not run on this machine" in page
    assert "model file (model.so)" in page and f"{artifact.metrics['size']['file_bytes']:,}" in page
    assert "5 kept in fp32" in page and "weight bits per layer" in _images(page)


def test_a_model_without_quantizable_layers_still_renders(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    artifact = compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), tmp_path / "plain",
                       pipeline="optimize", latency=False)
    page = (artifact.path / "report.html").read_text()
    assert artifact.manifest["layers"] == [] and "records no quantizable layers" in page and "<img" not in page
    manifest = {k: v for k, v in artifact.manifest.items() if k not in ("layers", "metrics", "records", "passes")}
    assert "Per-layer plan" in report.render(manifest)  # an older or trimmed manifest: what exists is drawn


def test_hundreds_of_layers_keep_the_labels_legible(deep):
    layers = deep.manifest["layers"]
    assert len(layers) == 240
    figure = report.layer_chart(layers)
    figure.draw_without_rendering()
    labels = [t for t in figure.axes[-1].get_xticklabels() if t.get_text()]
    assert len(labels) <= report.MAX_LAYER_LABELS
    assert labels[0].get_text() == report.layer_label(layers[0])
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
    assert all(left.x1 <= right.x0 for left, right in zip(boxes, boxes[1:])), "layer labels overlap"
    frame = figure.bbox
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 for b in boxes), "labels cut off"
    assert all(len(t.get_text()) <= 22 for t in labels)
    page = (deep.path / "report.html").read_text()
    assert "<details><summary>Table of all 240 layers</summary>" in page


# --- the page in a real browser ----------------------------------------------------------
_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
#: appended to a copy of the report: after load, write each image's decoded size and box into the DOM
_PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,
    height: i.naturalHeight, rect: i.getBoundingClientRect().toJSON()}));
  const probe = document.createElement("pre");
  probe.id = "bitpass-probe";
  probe.textContent = JSON.stringify({images, scrollWidth: document.documentElement.scrollWidth,
                                      innerWidth: window.innerWidth});
  document.body.appendChild(probe);
});
</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    found = next((path for path in (shutil.which(name) for name in _BROWSERS) if path), None)
    if found is None:
        message = ("no Chromium binary found (tried: " + ", ".join(_BROWSERS) + "); install it with "
                   "`apt-get install -y chromium`")
        if os.environ.get("BITPASS_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"BITPASS_REQUIRE_CHROMIUM=1 but {message}")
        pytest.skip(message)
    return found


def _browse(chromium: str, page: Path, work: Path, width: int, height: int, *action: str) -> str:
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={width},{height}",
               f"--user-data-dir={work / 'profile'}", *action, page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _probe(chromium: str, report_file: Path, work: Path, width: int, height: int) -> dict:
    probed = work / "probe.html"
    probed.write_text(report_file.read_text() + _PROBE)
    dom = _browse(chromium, probed, work, width, height, "--dump-dom")
    found = re.search(r'<pre id="bitpass-probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run: " + dom[-500:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.parametrize("name", ["swept", "pruned"])
def test_headless_chromium_draws_the_report_with_its_plots(name, request, chromium, tmp_path):
    from PIL import Image

    artifact = request.getfixturevalue(name)
    report_file = artifact.path / "report.html"
    width, height = 1200, 3200
    facts = _probe(chromium, report_file, tmp_path, width, height)
    images = {i["alt"]: i for i in facts["images"]}
    assert "weight bits per layer" in images
    if name == "swept":
        assert "size/quality frontier" in images
    for alt, image in images.items():
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, f"{alt} was not decoded"
    assert facts["scrollWidth"] <= facts["innerWidth"]  # nothing sticks out sideways at full width

    shot = tmp_path / f"{name}.png"
    _browse(chromium, report_file, tmp_path, width, height, f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 20, "the screenshot is blank"
    for alt, image in images.items():
        box = image["rect"]
        if box["top"] + box["height"] > height:
            continue
        region = pixels[int(box["top"]):int(box["top"] + box["height"]), int(box["left"]):int(box["right"])]
        colourful = (region.max(axis=2) - region.min(axis=2) > 60).mean()
        assert region.std() > 20 and colourful > 0.01, f"the {alt} image is not drawn in the screenshot"
    chart = images["weight bits per layer"]["rect"]
    assert chart["top"] + chart["height"] <= height, "the per-layer chart should be on the first screen"


def test_headless_chromium_fits_the_report_to_a_narrow_window(swept, chromium, tmp_path):
    facts = _probe(chromium, swept.path / "report.html", tmp_path, 420, 2000)
    assert facts["innerWidth"] < 600  # (headless Chromium may widen a window below its minimum of about 500)
    assert facts["scrollWidth"] <= facts["innerWidth"], "the page scrolls sideways in a narrow window"
    for image in facts["images"]:
        assert image["rect"]["width"] <= facts["innerWidth"] and image["complete"] and image["width"] > 0
