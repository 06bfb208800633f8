"""Measurements of a model: FLOPs, active neurons, timing, memory (and later fidelity)."""
