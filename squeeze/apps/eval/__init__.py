"""Accuracy evaluations of squeezed attention against dense attention (``squeeze.apps.eval.longbench``).

Each evaluation runs the dense baseline and the squeezed configurations on the same inputs in one
process, and scores them with the benchmark's own metrics.
"""
