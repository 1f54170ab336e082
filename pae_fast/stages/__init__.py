"""Stages: one library function per pipeline step, each behind one thin CLI command (docs/architecture.md).

``cache_latents`` (:mod:`pae_fast.stages.cache_latents`), ``train_generator(cfg)``
(:mod:`pae_fast.stages.train_generator`) and ``sample(cfg)`` (:mod:`pae_fast.stages.sample`); import the stage
module you need (nothing is imported here).
"""
