"""Bit allocation: each layer's precision from sensitivity and cost, under a budget.

Modules: ``problem`` (layers × widths with size/avg-bits/BOPs/latency costs and the loss
estimate Ω; ``fake_quantize`` with block size), ``budget`` (``parse_budget``, feasibility
messages, ``bisect_accuracy_drop``), ``solvers`` (``solve`` with ``ilp``, ``pareto``,
``baq``, ``greedy``), ``passes`` (the ``allocate-bits`` pass).
"""
