"""Integrations with inference frameworks.

``squeeze.patches.hf`` adapts the core to Hugging Face transformers; importing this package
imports nothing heavy, each integration is imported on its own.
"""
