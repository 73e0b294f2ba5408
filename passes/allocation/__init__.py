"""Bit allocation: each layer's precision from sensitivity and cost, under a budget.

Library cores: ``problem`` (layers × widths with size/avg-bits/BOPs/latency costs and the loss
estimate Ω; ``fake_quantize`` with block size; ``layer_sensitivity``), ``budget`` (``parse_budget``,
feasibility messages, ``bisect_accuracy_drop``), ``solvers`` (``solve`` with ``ilp``, ``pareto``,
``baq``, ``greedy``), ``formats`` (which materialization each width gets, from measured latency),
``evaluate`` (a plan's measured accuracy), ``joint_problem`` (bits and kept channels under one budget).
Thin passes over them: ``passes`` (``allocate-bits``), ``joint`` (``allocate-joint``).
"""
