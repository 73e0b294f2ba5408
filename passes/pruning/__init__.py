"""Pruning: weights zeroed (``prune``: magnitude, Wanda, GBLM; unstructured or N:M; per-layer ratios
uniform, global, ECoFLaP or from sensitivity), channels removed from the graph (``prune-channels``),
and optional short recovery by distillation (``recover``).

Modules: ``common`` (weight layouts, activation norms in ONNX Runtime), ``ratios`` (allocation and
masks), ``gradients`` (torch scores), ``channels`` (the channel-pruning core: trace, group, count,
plan, apply), ``passes`` (``prune``), ``structured`` (``prune-channels``, a thin pass over
``channels``), ``recovery`` (``recover``).
"""
