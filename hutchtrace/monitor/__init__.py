"""Watching curvature during training: the monitor, CUSUM detectors, record sinks, the
Lightning and HF callbacks, plots.

Imports: ``distributed``, ``estimate`` and below.
"""
