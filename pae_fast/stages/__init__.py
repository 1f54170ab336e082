"""Stages: one library function per pipeline step, each behind one thin CLI command (docs/architecture.md).

``pretrain_vfm`` (:mod:`pae_fast.stages.pretrain_vfm`, the demo's frozen encoder), ``refine_priors(cfg)``
(:mod:`pae_fast.stages.refine_priors`, stage 0), ``train_tokenizer(cfg)`` (:mod:`pae_fast.stages.train_tokenizer`),
``cache_latents``
(:mod:`pae_fast.stages.cache_latents`), ``train_generator(cfg)`` (:mod:`pae_fast.stages.train_generator`) and
``sample(cfg)`` (:mod:`pae_fast.stages.sample`); import the stage module you need (nothing is imported here).
"""
