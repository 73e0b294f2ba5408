"""Sensitivity annotation: how much each layer hurts the model when quantized.

Modules: ``quant`` (``fake_quantize``), ``hessian`` (Hutchinson trace, power iteration),
``fisher`` (empirical Fisher, Taylor estimate), ``output`` (ORT-only output KL/MSE),
``objective`` (loss closures on the torch module), ``zeroq`` (data synthesis), ``passes``
(the ``sensitivity`` pass).
"""
