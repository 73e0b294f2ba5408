"""A sample third-party bitpass plugin: per-layer weight statistics as annotations.

``annotate-weight-stats`` writes, on every quantizable layer, the absolute
maximum and the root-mean-square of its weight as ``bitpass.plugin.weight_absmax``
and ``bitpass.plugin.weight_rms``. A layer whose absmax is far above its rms has
outliers and quantizes badly per tensor: the ratio is a cheap, data-free hint.
"""

from __future__ import annotations

import numpy as np
import pydantic

from bitpass.frontend import Model, annotation
from bitpass.passes.infra import PassConfig, PassContext, PassResult, PRESERVE_ALL, Pass

ABSMAX = "plugin.weight_absmax"
RMS = "plugin.weight_rms"

#: A named pipeline mixing built-in passes with this plugin's: ``--pipeline weight-stats``.
WEIGHT_STATS = "fold-constants,eliminate-dead-nodes,annotate-weight-stats"


class WeightStatsConfig(PassConfig):
    #: only annotate layers with at least this many weights
    min_params: int = pydantic.Field(default=0, ge=0)
    #: digits kept in the annotation values (stable, diff-friendly manifests)
    digits: int = pydantic.Field(default=6, ge=1, le=12)


class AnnotateWeightStats(Pass):
    """Annotate each layer with its weight's absolute maximum and RMS (data-free outlier hint)."""

    name = "annotate-weight-stats"
    Config = WeightStatsConfig
    produces = frozenset({"annotation:" + ABSMAX, "annotation:" + RMS})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        config = self.config
        assert isinstance(config, WeightStatsConfig)
        annotated = 0
        for layer in model.layers():
            if layer.params < config.min_params:
                continue
            weight = np.asarray(layer.weight_array, dtype=np.float64)
            annotation.set(layer.node, ABSMAX, round(float(np.abs(weight).max()), config.digits))
            annotation.set(layer.node, RMS, round(float(np.sqrt(np.mean(weight**2))), config.digits))
            annotated += 1
        ctx.records[self.name] = {"layers_annotated": annotated}
        # Annotations do not change the graph: every cached analysis still holds.
        return PassResult(model, modified=annotated > 0, preserved=PRESERVE_ALL)
