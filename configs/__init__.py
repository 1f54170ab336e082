"""Bundled YAML presets (installed as ``pae_fast.configs``); load one with ``--config NAME``."""
