"""``python -m pae_fast.kernels.validate``: the entry point of :mod:`pae_fast.kernels.tools.validate`."""

from pae_fast.kernels.tools.validate import main

if __name__ == "__main__":
    raise SystemExit(main())
