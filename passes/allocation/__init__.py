"""Bit allocation: each layer's precision from sensitivity and cost, under a budget."""
