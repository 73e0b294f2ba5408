"""Model families users bring, built locally from configs (no hub, no download), and exported as users export them.

Each family builds a torch module with example inputs, input/output names, dynamic axes, the kind of its
output (so fidelity is judged by kind) and calibration / held-out evaluation data keyed by input name:

    built = model_families.build("resnet18", "fast")
    path = model_families.export(built, model_families.EXPORTS["dynamo-23"], folder)

``fast`` configs are small versions of each architecture (same layer types and graph patterns) for CI;
``full`` configs are the real sizes (BERT-base 110 M, a MiniLM-size 6 x 384 sentence encoder, ResNet-50 at
224 x 224...) for the benchmark. Most families keep their random initialisation: enough for "compiles and
runs", not for fidelity (random logits are nearly flat). Four have learned weights, trained here in
seconds to minutes on data already on the machine and cached (see ``trained_state``): three torchvision CNNs
on scikit-learn's digits upsampled to 32 x 32 (accuracy on held-out digits), and a BERT-like sentence encoder
(mean pooling + L2 normalisation in the graph) on Python's standard-library sources with a byte-level
tokenizer (cosine to fp32 on held-out files).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitpass.tools import zoo

SIZES = ("fast", "full")
#: how fidelity is judged: accuracy / top-1 agreement of class logits, cosine of embeddings and features,
#: per-token top-1 agreement of language-model logits
OUTPUT_KINDS = ("logits", "embedding", "features", "lm-logits")
#: example batch for export: 2, because torch.export specialises a dynamic axis whose example size is 1
EXAMPLE_BATCH = 2


# --- importing torchvision and transformers ---------------------------------------------------------------
def import_torchvision() -> Any:
    """``import torchvision`` on a torch it was not built for.

    The torchvision wheel installed here targets another torch, so its C++ operators (``torchvision::nms``...)
    fail to load and ``import torchvision`` raises "operator torchvision::nms does not exist" while registering
    their fake (meta) kernels. The model definitions are pure Python and need none of those operators: this
    turns each failing ``torch.library.register_fake`` registration into a no-op for the duration of the
    import only, then restores the original. transformers imports torchvision when it is installed, so
    ``import_transformers`` goes through here too. Use these two functions everywhere instead of a bare import.
    """
    import sys

    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    import torch.library

    original = torch.library.register_fake

    def register_fake(op: Any, func: Any = None, /, **kwargs: Any) -> Any:
        if func is None:
            return lambda f: register_fake(op, f, **kwargs)
        try:
            return original(op, func, **kwargs)
        except RuntimeError as err:
            if "does not exist" not in str(err):
                raise
            return func

    torch.library.register_fake = register_fake
    try:
        import torchvision
    finally:
        torch.library.register_fake = original
    return torchvision


def import_transformers() -> Any:
    """``import transformers`` (after ``import_torchvision``, which it imports when present), logging quieted."""
    import_torchvision()
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


# --- what a family builds --------------------------------------------------------------------------------
@dataclass
class Built:
    """A family at one size: the module in eval mode, how to call and export it, and its data."""

    family: str
    size: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    #: TorchScript-exporter style: tensor name -> {axis: symbolic name}, inputs and outputs
    dynamic_axes: dict[str, dict[int, str]]
    output_kind: str
    #: {input name: array}; samples on the first axis
    calibration: dict[str, np.ndarray]
    #: held-out samples, plus ``labels`` for families with real classes
    evaluation: dict[str, np.ndarray]
    trained: bool = False
    note: str = ""
    facts: dict[str, Any] = field(default_factory=dict)

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        """The same dynamic axes as ``torch.export`` wants them (one Dim per axis name, shared by inputs)."""
        dims: dict[str, Any] = {}
        shapes = []
        for name in self.input_names:
            axes = self.dynamic_axes.get(name, {})
            shapes.append({axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes.items()})
        return tuple(shapes)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def inputs_of(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Only the model inputs of a data dict (drops ``labels``)."""
        return {name: arrays[name] for name in self.input_names}

    def reference_outputs(self, arrays: dict[str, np.ndarray], batch: int = 16) -> np.ndarray:
        """The fp32 torch outputs of the module over ``arrays`` (the first output), batch by batch."""
        count = len(arrays[self.input_names[0]])
        parts = []
        with torch.no_grad():
            for start in range(0, count, batch):
                args = [torch.from_numpy(arrays[name][start:start + batch]) for name in self.input_names]
                parts.append(self.module(*args).numpy())
        return np.concatenate(parts)


@dataclass(frozen=True)
class Family:
    """A named model family: where it comes from, what it outputs, and how to build it at a size."""

    name: str
    source: str  # torchvision, transformers or bitpass (defined here)
    output_kind: str
    summary: str
    builder: Callable[[str, int], Built]
    trained: bool = False

    def build(self, size: str = "fast", seed: int = 0) -> Built:
        if size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
        torch.manual_seed(seed)
        built = self.builder(size, seed)
        built.module.eval()
        return built


FAMILIES: dict[str, Family] = {}


def _family(name: str, source: str, kind: str, summary: str, trained: bool = False):
    def register(builder: Callable[[str, int], Built]) -> Callable[[str, int], Built]:
        FAMILIES[name] = Family(name, source, kind, summary, builder, trained)
        return builder

    return register


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def build(name: str, size: str = "fast", seed: int = 0) -> Built:
    """Build family ``name`` at ``size`` (``fast`` or ``full``), seeded."""
    return family(name).build(size, seed)


# --- data: digits images and standard-library text ---------------------------------------------------------
def digits_images(x: np.ndarray, resolution: int, channels: int = 3) -> np.ndarray:
    """Digits (N, 1, 8, 8) in [0, 1] -> (N, channels, r, r) float32 in [-1, 1], bilinear upsampling."""
    up = F.interpolate(torch.from_numpy(x), size=(resolution, resolution), mode="bilinear", align_corners=False)
    return np.ascontiguousarray((up.repeat(1, channels, 1, 1) * 2 - 1).numpy().astype(np.float32))


def _image_data(resolution: int, calibration: int, evaluation: int, seed: int) -> tuple[dict, dict]:
    """Calibration and held-out images from the fixed digits split (no labels: the classes do not match)."""
    split = zoo.digits_split(seed)
    return ({"input": digits_images(split.calib_x[:calibration], resolution)},
            {"input": digits_images(split.eval_x[:evaluation], resolution)})


#: byte-level tokens: 0 pad, 1 start, 2 end, 3 mask, 4 + byte value
PAD, CLS, SEP, MASK, BYTE0 = 0, 1, 2, 3, 4
BYTE_VOCAB = BYTE0 + 256


@dataclass(frozen=True)
class TextCorpus:
    """Files of text as bytes, split by file into training and held-out, with a digest of what was read."""

    train: tuple[bytes, ...]
    heldout: tuple[bytes, ...]
    digest: str


@functools.lru_cache(maxsize=2)
def text_corpus(train_bytes: int = 6_000_000, heldout_bytes: int = 1_000_000) -> TextCorpus:
    """Python's standard-library sources (code, docstrings and comments), present wherever Python is.

    Files are taken in sorted path order (tests and vendored copies skipped); about one file in eight,
    chosen by a hash of its path, is held out for evaluation, never trained or calibrated on.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "ensurepip"}
    paths = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))
    train: list[bytes] = []
    heldout: list[bytes] = []
    sizes = [0, 0]
    digest = hashlib.sha256()
    for path in paths:
        relative = path.relative_to(root).as_posix()
        held = hashlib.sha256(relative.encode()).digest()[0] % 8 == 0
        limit = heldout_bytes if held else train_bytes
        if sizes[held] >= limit:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if not 1024 <= len(data) <= 262_144:
            continue
        (heldout if held else train).append(data)
        sizes[held] += len(data)
        digest.update(f"{relative}|{int(held)}|{len(data)}|".encode())
        digest.update(data)
        if sizes[0] >= train_bytes and sizes[1] >= heldout_bytes:
            break
    if not train or not heldout:
        raise RuntimeError(f"no text found under {root}: the byte-level text families need Python's sources")
    return TextCorpus(tuple(train), tuple(heldout), digest.hexdigest())


def _span(files: tuple[bytes, ...], length: int, rng: np.random.Generator, weights: np.ndarray) -> tuple[int, bytes]:
    index = int(rng.choice(len(files), p=weights))
    data = files[index]
    start = int(rng.integers(0, max(1, len(data) - length)))
    return index, data[start:start + length]


def _weights(files: tuple[bytes, ...]) -> np.ndarray:
    lengths = np.array([len(f) for f in files], dtype=np.float64)
    return lengths / lengths.sum()


def encode(span: bytes, seq: int, vocab: int = BYTE_VOCAB) -> tuple[np.ndarray, np.ndarray]:
    """[start] bytes [end], right-padded to ``seq``: (input_ids, attention_mask), int64.

    Bytes map to ``4 + b``, folded into the vocabulary when it is smaller than 260 ids."""
    body = np.frombuffer(span[:seq - 2], dtype=np.uint8).astype(np.int64)
    body = BYTE0 + (body if vocab >= BYTE_VOCAB else body % (vocab - BYTE0))
    ids = np.full(seq, PAD, dtype=np.int64)
    ids[0], ids[1:1 + len(body)], ids[1 + len(body)] = CLS, body, SEP
    mask = np.zeros(seq, dtype=np.int64)
    mask[:2 + len(body)] = 1
    return ids, mask


def text_samples(files: tuple[bytes, ...], count: int, seq: int, vocab: int, seed: int,
                 padded_fraction: float = 0.25) -> dict[str, np.ndarray]:
    """``count`` spans of text as (input_ids, attention_mask); a quarter are shorter and padded (a real batch)."""
    rng = np.random.default_rng(seed)
    weights = _weights(files)
    ids, masks = [], []
    for _ in range(count):
        length = seq - 2
        if rng.random() < padded_fraction:
            length = int(rng.integers(max(1, seq // 4), seq - 2))
        _, span = _span(files, length, rng, weights)
        i, m = encode(span, seq, vocab)
        ids.append(i)
        masks.append(m)
    return {"input_ids": np.stack(ids), "attention_mask": np.stack(masks)}


def _text_data(seq: int, vocab: int, calibration: int, evaluation: int, seed: int) -> tuple[dict, dict, str]:
    corpus = text_corpus()
    return (text_samples(corpus.train, calibration, seq, vocab, seed + 1),
            text_samples(corpus.heldout, evaluation, seq, vocab, seed + 2), corpus.digest)


# --- cached weights ----------------------------------------------------------------------------------------
#: bump when a training recipe changes, so cached weights are retrained
RECIPE_VERSION = 2


def cache_dir() -> Path:
    """``~/.cache/bitpass/models`` (``BITPASS_CACHE_DIR`` moves the whole cache, as for the latency cache)."""
    from bitpass.backends.onnxruntime.latency import cache_path

    return cache_path().parent / "models"


def trained_state(module: nn.Module, key: dict[str, Any], train: Callable[[nn.Module], dict[str, Any]]) -> dict:
    """Load ``module``'s weights from the cache, or ``train`` it and cache them; returns the training facts.

    The key (family, size, config, seed, data digest, recipe version) names the file; weights are saved with
    ``torch.save(state_dict)`` and read back with ``torch.load(weights_only=True)`` only (tensors, never pickled
    objects); the facts (accuracy, steps...) sit beside them as JSON.
    """
    digest = hashlib.sha256(json.dumps({**key, "recipe": RECIPE_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir()
    stem = f"{key['family']}-{key['size']}-{digest}"
    weights, facts_file = folder / f"{stem}.pt", folder / f"{stem}.json"
    if weights.is_file() and facts_file.is_file():
        module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        return {**json.loads(facts_file.read_text()), "cached": str(weights)}
    facts = train(module)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(f".{os.getpid()}.tmp")
    torch.save(module.state_dict(), tmp)
    tmp.replace(weights)
    facts_file.write_text(json.dumps(facts, sort_keys=True, indent=1))
    return {**facts, "cached": str(weights)}


# --- torchvision families -----------------------------------------------------------------------------------
def _image_built(name: str, size: str, module: nn.Module, resolution: int, seed: int, *, kind: str = "logits",
                 output: str = "logits", calibration: int = 64, evaluation: int = 128) -> Built:
    calib, held = _image_data(resolution, calibration, evaluation, seed)
    example = (torch.from_numpy(calib["input"][:EXAMPLE_BATCH]),)
    return Built(name, size, module, example, ("input",), (output,),
                 {"input": {0: "batch"}, output: {0: "batch"}}, kind, calib, held,
                 note=f"random init, {resolution}x{resolution} input")


def _torchvision_family(name: str, summary: str, fast: Callable[[Any], nn.Module], full: Callable[[Any], nn.Module]):
    @_family(name, "torchvision", "logits", summary)
    def builder(size: str, seed: int) -> Built:
        models = import_torchvision().models
        module = fast(models) if size == "fast" else full(models)
        return _image_built(name, size, module, 32 if size == "fast" else 224, seed)

    return builder


_torchvision_family("resnet18", "torchvision ResNet-18 (fast: one BasicBlock per stage, 10 classes)",
                    lambda m: m.ResNet(m.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10),
                    lambda m: m.resnet18())
_torchvision_family("resnet50", "torchvision ResNet-50 (fast: one narrow Bottleneck per stage)",
                    lambda m: m.ResNet(m.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16),
                    lambda m: m.resnet50())
_torchvision_family("mobilenet_v2", "torchvision MobileNetV2 (fast: width 0.25)",
                    lambda m: m.mobilenet_v2(width_mult=0.25, num_classes=10),
                    lambda m: m.mobilenet_v2())
_torchvision_family("mobilenet_v3_small", "torchvision MobileNetV3-small: HardSwish, squeeze-excite (fast: width 0.5)",
                    lambda m: m.mobilenet_v3_small(width_mult=0.5, num_classes=10),
                    lambda m: m.mobilenet_v3_small())


def _small_efficientnet(models: Any) -> nn.Module:
    conf = models.efficientnet.MBConvConfig
    setting = [conf(1, 3, 1, 16, 8, 1, 1.0, 1.0), conf(6, 3, 2, 8, 16, 1, 1.0, 1.0),
               conf(6, 5, 2, 16, 24, 1, 1.0, 1.0), conf(6, 3, 2, 24, 40, 2, 1.0, 1.0)]
    return models.EfficientNet(setting, dropout=0.2, num_classes=10, last_channel=128)


def _small_regnet(models: Any) -> nn.Module:
    params = models.regnet.BlockParams.from_init_params(depth=5, w_0=16, w_a=8.0, w_m=2.0, group_width=8,
                                                        se_ratio=0.25)
    return models.RegNet(params, num_classes=10)


def _small_convnext(models: Any) -> nn.Module:
    conf = models.convnext.CNBlockConfig
    return models.ConvNeXt([conf(16, 32, 1), conf(32, 64, 1), conf(64, None, 1)], num_classes=10)


_torchvision_family("efficientnet_b0", "torchvision EfficientNet-B0: MBConv, SiLU, squeeze-excite (fast: 4 stages)",
                    _small_efficientnet, lambda m: m.efficientnet_b0())
_torchvision_family("regnet_y_400mf", "torchvision RegNetY-400MF: grouped convs, squeeze-excite (fast: 5 blocks)",
                    _small_regnet, lambda m: m.regnet_y_400mf())
_torchvision_family("convnext_tiny", "torchvision ConvNeXt-T: 7x7 depthwise, LayerNorm, GELU (fast: 3 stages)",
                    _small_convnext, lambda m: m.convnext_tiny())
def _vit(models: Any, **config: Any) -> nn.Module:
    """torchvision's VisionTransformer with its classification head given random weights: torchvision
    initialises the head to zeros (for fine-tuning), which makes every logit 0 and any fidelity meaningless."""
    module = models.VisionTransformer(**config)
    nn.init.normal_(module.heads.head.weight, std=0.02)
    return module


_torchvision_family(
    "vit", "torchvision VisionTransformer, small config (fast: 2 x 32, 32x32/8; full: ViT-S/16, 12 x 384)",
    lambda m: _vit(m, image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                   num_classes=10),
    lambda m: _vit(m, image_size=224, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536))


# --- CNNs with learned weights: torchvision architectures trained on digits -------------------------------------
def _digits_trained(name: str, summary: str, fast: Callable[[Any], nn.Module], full: Callable[[Any], nn.Module],
                    epochs: dict[str, int]):
    @_family(name, "torchvision", "logits", summary, trained=True)
    def builder(size: str, seed: int) -> Built:
        models = import_torchvision().models
        module = fast(models) if size == "fast" else full(models)
        split = zoo.digits_split(seed)
        images = zoo.Split(digits_images(split.train_x, 32), split.train_y, digits_images(split.calib_x, 32),
                           split.calib_y, digits_images(split.eval_x, 32), split.eval_y)

        def train(m: nn.Module) -> dict[str, Any]:
            zoo.train(m, images, epochs=epochs[size], seed=seed, lr=2e-3)
            recalibrate_batchnorm(m, images.train_x)
            return {"epochs": epochs[size], "heldout_accuracy": zoo.accuracy(m.eval(), images.eval_x, images.eval_y)}

        key = {"family": name, "size": size, "seed": seed, "model": repr(module), "data": "sklearn-digits-32",
               "epochs": epochs[size], "lr": 2e-3,
               "split": zoo.TRAIN}
        facts = trained_state(module, key, train)
        module.eval()
        calib = {"input": images.calib_x}
        held = {"input": images.eval_x, "labels": images.eval_y}
        example = (torch.from_numpy(images.calib_x[:EXAMPLE_BATCH]),)
        return Built(name, size, module, example, ("input",), ("logits",),
                     {"input": {0: "batch"}, "logits": {0: "batch"}}, "logits", calib, held, trained=True,
                     note=f"trained {epochs[size]} epochs on digits 32x32: held-out accuracy "
                          f"{100 * facts['heldout_accuracy']:.1f} %", facts=facts)

    return builder


_digits_trained("resnet18_digits", "torchvision ResNet-18 trained on digits 32x32, 10 classes (fast: one block per stage)",
                lambda m: m.ResNet(m.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10),
                lambda m: m.resnet18(num_classes=10), epochs={"fast": 4, "full": 10})
_digits_trained("resnet50_digits", "torchvision ResNet-50 trained on digits 32x32, 10 classes (fast: one bottleneck per stage)",
                lambda m: m.ResNet(m.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10),
                lambda m: m.resnet50(num_classes=10), epochs={"fast": 4, "full": 10})
_digits_trained("mobilenet_v3_small_digits", "torchvision MobileNetV3-small trained on digits 32x32 (fast: width 0.5)",
                lambda m: m.mobilenet_v3_small(width_mult=0.5, num_classes=10),
                lambda m: m.mobilenet_v3_small(num_classes=10), epochs={"fast": 6, "full": 15})


def recalibrate_batchnorm(module: nn.Module, x: np.ndarray, batch: int = 128) -> None:
    """Set every BatchNorm's running statistics to the exact averages over ``x`` (train-mode forward passes).

    torchvision's MobileNetV3 and EfficientNet use BatchNorm momentum 0.01: after a short training the running
    statistics still mostly hold their initial values and the eval-mode model predicts one class."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    module.train()
    with torch.no_grad():
        for start in range(0, len(x), batch):
            module(torch.from_numpy(x[start:start + batch]))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    module.eval()


# --- a detection-style graph: FPN with Resize, Concat, Slice and NMS-free heads ----------------------------------
class TinyDetector(nn.Module):
    """A one-stage detector's graph: conv backbone, top-down FPN (bilinear and nearest Resize, Concat), shared
    head per level, predictions concatenated over levels, boxes and scores sliced apart, decoded and joined.
    Output (N, anchors, 4 + classes); no NMS (it is left to the caller, as exported detectors usually do)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), fpn: int = 32, classes: int = 10, anchors: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, channels = [], widths[0]
        for width in widths:
            stages.append(nn.Sequential(nn.Conv2d(channels, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                        nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()))
            channels = width
        self.stages = nn.ModuleList(stages)
        self.lateral = nn.ModuleList([nn.Conv2d(w, fpn, 1) for w in widths])
        self.merge = nn.ModuleList([nn.Conv2d(2 * fpn, fpn, 3, 1, 1) for _ in widths[:-1]])
        self.head = nn.Sequential(nn.Conv2d(fpn, fpn, 3, 1, 1), nn.ReLU(), nn.Conv2d(fpn, anchors * (4 + classes), 1))
        self.anchors, self.outputs = anchors, 4 + classes

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the exported input's name
        x, features = self.stem(input), []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        top = self.lateral[-1](features[-1])
        levels = [top]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            mode = "nearest" if i % 2 else "bilinear"
            up = F.interpolate(top, size=lateral.shape[-2:], mode=mode, **({} if mode == "nearest" else
                                                                              {"align_corners": False}))
            top = self.merge[i](torch.cat([lateral, up], dim=1))
            levels.append(top)
        predictions = []
        for level in levels:
            p = self.head(level)
            n, _, h, w = p.shape
            predictions.append(p.reshape(n, self.anchors, self.outputs, h * w).permute(0, 3, 1, 2)
                               .reshape(n, h * w * self.anchors, self.outputs))
        out = torch.cat(predictions, dim=1)
        boxes, scores = out[..., :4], out[..., 4:]
        centre, extent = boxes[..., :2].sigmoid(), boxes[..., 2:].exp().clamp(max=16.0)
        return torch.cat([centre, extent, scores.sigmoid()], dim=-1)


@_family("detector", "bitpass", "features",
         "detection-style graph: FPN (Resize, Concat), sliced and decoded heads, no NMS (fast: 64x64)")
def _detector(size: str, seed: int) -> Built:
    if size == "fast":
        module, resolution = TinyDetector((8, 16, 32), fpn=16), 64
    else:
        module, resolution = TinyDetector((32, 64, 128, 256), fpn=96), 320
    built = _image_built("detector", size, module, resolution, seed, kind="features", output="detections",
                         evaluation=64 if size == "full" else 128)
    return built


# --- transformers families -------------------------------------------------------------------------------------
class HiddenStates(nn.Module):
    """A transformers model called with (input_ids, attention_mask) returning one named output as a tensor."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[self.output]


class PixelStates(nn.Module):
    """A transformers vision model called with pixel_values, returning its last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state


class AudioStates(nn.Module):
    """A Whisper encoder called with log-mel input_features, returning its last hidden state."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features=input_features).last_hidden_state


class SentenceEncoder(nn.Module):
    """A BERT-like encoder with mean pooling over the attention mask and L2 normalisation in the graph
    (sentence-transformers' usual head): the output is a unit-length embedding per input."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=-1)


#: (sequence length, vocabulary) of the text families' data by size; real vocabularies at full size
TEXT_SEQ = {"fast": 16, "full": 32}
_SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}


def _text_built(name: str, size: str, module: nn.Module, kind: str, vocab: int, seed: int, *, output: str,
                evaluation: int = 128, seq: int | None = None, note: str = "random init") -> Built:
    seq = seq or TEXT_SEQ[size]
    calib, held, digest = _text_data(seq, vocab, 64, evaluation, seed)
    example = (torch.from_numpy(calib["input_ids"][:EXAMPLE_BATCH]),
               torch.from_numpy(calib["attention_mask"][:EXAMPLE_BATCH]))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            output: {0: "batch"} if kind == "embedding" else {0: "batch", 1: "sequence"}}
    return Built(name, size, module, example, ("input_ids", "attention_mask"), (output,), axes, kind, calib, held,
                 note=f"{note}, byte text of {seq} tokens", facts={"text_digest": digest})


def _transformers_family(name: str, kind: str, summary: str, make: Callable[[Any, str], tuple[nn.Module, int]],
                         output: str = "last_hidden_state", evaluation: dict[str, int] | None = None):
    @_family(name, "transformers", kind, summary)
    def builder(size: str, seed: int) -> Built:
        model, vocab = make(import_transformers(), size)
        exported = "logits" if kind == "lm-logits" else "last_hidden_state"
        count = (evaluation or {}).get(size, 128)
        return _text_built(name, size, HiddenStates(model, output), kind, vocab, seed, output=exported,
                           evaluation=count)

    return builder


def _bert(t: Any, size: str) -> tuple[nn.Module, int]:
    config = t.BertConfig(**_SMALL, vocab_size=1000, max_position_embeddings=64) if size == "fast" else t.BertConfig()
    return t.BertModel(config, add_pooling_layer=False), config.vocab_size


def _distilbert(t: Any, size: str) -> tuple[nn.Module, int]:
    config = (t.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000,
                                 max_position_embeddings=64) if size == "fast" else t.DistilBertConfig())
    return t.DistilBertModel(config), config.vocab_size


def _roberta(t: Any, size: str) -> tuple[nn.Module, int]:
    common = {"max_position_embeddings": 514, "type_vocab_size": 1}
    config = (t.RobertaConfig(**_SMALL, vocab_size=1000, **{**common, "max_position_embeddings": 66})
              if size == "fast" else t.RobertaConfig(**common))
    return t.RobertaModel(config, add_pooling_layer=False), config.vocab_size


def _gpt2_config(t: Any, size: str) -> Any:
    if size == "fast":
        return t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=64, use_cache=False)
    return t.GPT2Config(use_cache=False)


def _llama(t: Any, size: str) -> tuple[nn.Module, int]:
    if size == "fast":
        config = t.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=128, vocab_size=1000, max_position_embeddings=64, use_cache=False)
    else:  # a small Llama: 8 x 512, grouped-query attention, 32k vocabulary (about 60 M parameters)
        config = t.LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                               intermediate_size=1376, vocab_size=32000, max_position_embeddings=512,
                               use_cache=False)
    return t.LlamaForCausalLM(config), config.vocab_size


def _t5_encoder(t: Any, size: str) -> tuple[nn.Module, int]:
    config = (t.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=1000)
              if size == "fast" else t.T5Config())  # T5Config() is t5-small
    return t.T5EncoderModel(config), config.vocab_size


_transformers_family("bert", "features", "transformers BertModel (full: BERT-base, 110 M)", _bert)
_transformers_family("distilbert", "features", "transformers DistilBertModel (full: DistilBERT-base)", _distilbert)
_transformers_family("roberta", "features", "transformers RobertaModel (full: RoBERTa-base)", _roberta)
_transformers_family("gpt2", "features", "transformers GPT2Model (full: GPT-2 small, 124 M)",
                     lambda t, size: (t.GPT2Model(_gpt2_config(t, size)), _gpt2_config(t, size).vocab_size))
_transformers_family("gpt2_lm", "lm-logits", "transformers GPT2LMHeadModel (full: GPT-2 small, 50k vocabulary)",
                     lambda t, size: (t.GPT2LMHeadModel(_gpt2_config(t, size)), _gpt2_config(t, size).vocab_size),
                     output="logits", evaluation={"full": 16, "fast": 32})
_transformers_family("llama", "lm-logits", "transformers LlamaForCausalLM, small config (full: 8 x 512, GQA, 32k)",
                     _llama, output="logits", evaluation={"full": 16, "fast": 32})
_transformers_family("t5_encoder", "features", "transformers T5EncoderModel (full: t5-small's encoder)", _t5_encoder)


@_family("vit_hf", "transformers", "features", "transformers ViTModel (full: ViT-base/16 at 224x224)")
def _vit_hf(size: str, seed: int) -> Built:
    t = import_transformers()
    if size == "fast":
        config = t.ViTConfig(image_size=32, patch_size=8, **_SMALL)
    else:
        config = t.ViTConfig()
    resolution = config.image_size
    calib, held = _image_data(resolution, 64, 128 if size == "fast" else 64, seed)
    calib, held = {"pixel_values": calib["input"]}, {"pixel_values": held["input"]}
    module = PixelStates(t.ViTModel(config, add_pooling_layer=False))
    example = (torch.from_numpy(calib["pixel_values"][:EXAMPLE_BATCH]),)
    return Built("vit_hf", size, module, example, ("pixel_values",), ("last_hidden_state",),
                 {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}}, "features", calib, held,
                 note=f"random init, {resolution}x{resolution} input")


@_family("whisper_encoder", "transformers", "features",
         "transformers Whisper encoder: Conv1d stem, GELU, 80 mel bins (full: whisper-tiny, 3000 frames)")
def _whisper_encoder(size: str, seed: int) -> Built:
    t = import_transformers()
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if size == "fast":
        config = t.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                                 max_source_positions=32, num_mel_bins=80)
    else:
        config = t.WhisperConfig()  # whisper-tiny
    frames = 2 * config.max_source_positions  # the encoder accepts exactly this many frames
    rng = np.random.default_rng(seed)

    def features(count: int) -> np.ndarray:  # log-mel-like: smooth over time, values in about [-1, 1]
        raw = rng.standard_normal((count, config.num_mel_bins, frames)).astype(np.float32)
        kernel = np.ones(5, dtype=np.float32) / 5
        smooth = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="same"), -1, raw)
        return np.ascontiguousarray(np.tanh(smooth).astype(np.float32))

    calib = {"input_features": features(32 if size == "full" else 64)}
    held = {"input_features": features(32 if size == "full" else 64)}
    module = AudioStates(WhisperEncoder(config))
    example = (torch.from_numpy(calib["input_features"][:EXAMPLE_BATCH]),)
    return Built("whisper_encoder", size, module, example, ("input_features",), ("last_hidden_state",),
                 {"input_features": {0: "batch"}, "last_hidden_state": {0: "batch"}}, "features", calib, held,
                 note=f"random init, {frames} frames of synthetic log-mel input")


# --- a sentence-embedding transformer with learned weights -----------------------------------------------------
#: training recipe by size: encoder shape, sequence length, steps and pairs per step
SENTENCE = {
    "fast": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
             "seq": 32, "steps": 300, "pairs": 16, "lr": 1e-3},
    "full": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
             "seq": 64, "steps": 150, "pairs": 8, "lr": 5e-4},
}


def _pairs(files: tuple[bytes, ...], pairs: int, seq: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """2 x ``pairs`` spans: span i and span pairs + i come from the same file (a positive pair)."""
    weights = _weights(files)
    first, second = [], []
    for _ in range(pairs):
        index, span = _span(files, seq - 2, rng, weights)
        data = files[index]
        start = int(rng.integers(0, max(1, len(data) - seq)))
        first.append(encode(span, seq))
        second.append(encode(data[start:start + seq - 2], seq))
    ids = np.stack([i for i, _ in first + second])
    masks = np.stack([m for _, m in first + second])
    return ids, masks


def _train_sentence_encoder(model: SentenceEncoder, corpus: TextCorpus, recipe: dict[str, Any],
                            seed: int) -> dict[str, Any]:
    """Masked-byte prediction plus an in-batch contrastive loss (two spans of one file are a positive pair):
    the encoder learns text statistics and the pooled embeddings spread apart (not one shared direction)."""
    rng = np.random.default_rng(seed)
    hidden = model.encoder.config.hidden_size
    mlm_head = nn.Linear(hidden, BYTE_VOCAB)
    params = list(model.parameters()) + list(mlm_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.01)
    steps, warmup = recipe["steps"], max(1, recipe["steps"] // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))
    model.train()
    losses = []
    for _ in range(steps):
        ids, masks = (torch.from_numpy(a) for a in _pairs(corpus.train, recipe["pairs"], recipe["seq"], rng))
        chosen = torch.from_numpy(rng.random(ids.shape) < 0.15) & (ids >= BYTE0)
        corrupted = ids.masked_fill(chosen, MASK)
        states = model.encoder(input_ids=corrupted, attention_mask=masks).last_hidden_state
        mlm = F.cross_entropy(mlm_head(states[chosen]), ids[chosen]) if chosen.any() else states.sum() * 0
        mask = masks.unsqueeze(-1).to(states.dtype)
        embeddings = F.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        a, b = embeddings.chunk(2)
        logits = a @ b.T / 0.05
        targets = torch.arange(len(a))
        contrastive = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        loss = mlm + contrastive
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append((round(mlm.item(), 4), round(contrastive.item(), 4)))
    model.eval()
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
            "heldout_pair_retrieval": _pair_retrieval(model, corpus, recipe, seed)}


def _pair_retrieval(model: SentenceEncoder, corpus: TextCorpus, recipe: dict[str, Any], seed: int) -> float:
    """Held-out check that training worked: how often a span's nearest embedding among 32 is its pair's."""
    rng = np.random.default_rng(seed + 99)
    ids, masks = (torch.from_numpy(a) for a in _pairs(corpus.heldout, 32, recipe["seq"], rng))
    with torch.no_grad():
        a, b = model(ids, masks).chunk(2)
    return float(((a @ b.T).argmax(1) == torch.arange(len(a))).float().mean())


@_family("sentence_embedding", "transformers", "embedding",
         "BERT-like sentence encoder, mean pooling + L2 norm in the graph, trained on stdlib text "
         "(full: MiniLM size, 6 x 384)", trained=True)
def _sentence_embedding(size: str, seed: int) -> Built:
    t = import_transformers()
    recipe = SENTENCE[size]
    shape = {k: recipe[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    config = t.BertConfig(**shape, vocab_size=BYTE_VOCAB, max_position_embeddings=128, pad_token_id=PAD)
    module = SentenceEncoder(t.BertModel(config, add_pooling_layer=False))
    corpus = text_corpus()
    key = {"family": "sentence_embedding", "size": size, "seed": seed, "recipe": recipe, "config": shape,
           "data": corpus.digest}
    facts = trained_state(module, key, lambda m: _train_sentence_encoder(m, corpus, recipe, seed))
    module.eval()
    # not "embedding": the dynamo exporter names an internal value so, and the duplicate makes an invalid model
    built = _text_built("sentence_embedding", size, module, "embedding", BYTE_VOCAB, seed,
                        output="sentence_embedding",
                        seq=recipe["seq"], note=f"trained {recipe['steps']} steps (masked bytes + contrastive)")
    built.trained, built.facts = True, {**built.facts, **facts}
    built.note += f"; held-out pair retrieval {100 * facts['heldout_pair_retrieval']:.0f} %"
    return built


# --- exports as users do them ----------------------------------------------------------------------------------
#: the newest opsets this torch can write: TorchScript exporter, and the dynamo exporter (capped by onnx)
TORCHSCRIPT_NEWEST = 20
DYNAMO_NEWEST = 23
try:  # follow the installed torch and onnx when they say
    from torch.onnx import _constants as _onnx_constants

    TORCHSCRIPT_NEWEST = int(_onnx_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    import onnx.defs

    DYNAMO_NEWEST = min(int(_onnx_constants.ONNX_MAX_OPSET), onnx.defs.onnx_opset_version())
except (ImportError, AttributeError):  # pragma: no cover - older or newer torch layouts keep the defaults
    pass


@dataclass(frozen=True)
class Export:
    """One way users turn a module into an ONNX file."""

    name: str
    dynamo: bool
    opset: int
    #: "torch": torch.onnx.export's own default for the path (dynamo: external data); True: re-saved with
    #: onnx's save_as_external_data; False: one self-contained file
    external_data: bool | str
    summary: str


EXPORTS: dict[str, Export] = {e.name: e for e in (
    Export("torchscript-17", False, 17, False, "torch.onnx.export(dynamo=False, opset_version=17), dynamic axes"),
    Export(f"dynamo-{DYNAMO_NEWEST}", True, DYNAMO_NEWEST, "torch",
           "torch.onnx.export(model, args, path) with torch's defaults (dynamo, external data), newest opset"),
    Export(f"torchscript-{TORCHSCRIPT_NEWEST}", False, TORCHSCRIPT_NEWEST, False,
           "dynamo=False at the newest opset the TorchScript exporter writes"),
    Export("dynamo-17", True, 17, False, "dynamo=True, opset 17, one file"),
    Export("torchscript-17-external", False, 17, True,
           "dynamo=False, opset 17, re-saved with onnx.save_model(save_as_external_data=True)"),
)}
#: not a file: ``bitpass.tools.api.compile(module, example_inputs=...)`` exports it itself
MODULE = "module"
EXPORT_NAMES = (*EXPORTS, MODULE)
EXTERNAL_DATA_FILE = "model.onnx.data"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporters print progress and warnings by the hundred: keep them out of the caller's output."""
    sink = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def export(built: Built, how: Export, folder: str | Path) -> Path:
    """Export ``built`` into ``folder/model.onnx`` (external data beside it when ``how`` says); the path.

    Raises the exporter's own exception when the export fails: that is a fact about the family and torch,
    which the conformance runner reports as such.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    names = {"input_names": list(built.input_names), "output_names": list(built.output_names)}
    with _quiet():  # no torch.no_grad(): under it nn.MultiheadAttention takes a fast path no exporter knows
        if how.dynamo:
            torch.onnx.export(built.module, built.example_inputs, str(path), dynamo=True, opset_version=how.opset,
                              dynamic_shapes=built.dynamic_shapes(), **names,
                              **({} if how.external_data == "torch" else {"external_data": bool(how.external_data)}))
        else:
            torch.onnx.export(built.module, built.example_inputs, str(path), dynamo=False, opset_version=how.opset,
                              dynamic_axes=built.dynamic_axes, **names)
    if how.external_data is True:
        import onnx

        proto = onnx.load(str(path))
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024)
    return path
