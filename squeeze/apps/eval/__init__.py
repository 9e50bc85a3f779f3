"""Accuracy evaluations of squeezed attention against dense attention.

Each evaluation runs the dense baseline and the squeezed configurations on the same inputs in one
process, and scores them with the benchmark's own metrics. The task families
(:mod:`squeeze.apps.eval.longbench`, :mod:`squeeze.apps.eval.ruler`) share one runner
(:mod:`.runner`: prompts → dense and squeezed answers, one compile per context, resumable JSONL
files written by :mod:`.results`), the chat wrappers (:mod:`.chat`), the command-line options
(:mod:`.options`) and the report helpers (:mod:`.summary`).
"""
