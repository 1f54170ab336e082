"""Model zoo. Importing this package registers every named variant (generators, tokenizers, encoders)."""

import importlib

# Each module registers its variants on import. Modules land with their issues; the list is explicit so a
# broken module fails loudly instead of silently missing from the registry.
_MODEL_MODULES: tuple[str, ...] = ("lightningdit", "ditdh", "vfm", "pae", "rae")

for _m in _MODEL_MODULES:
    importlib.import_module(f"pae_fast.models.{_m}")
