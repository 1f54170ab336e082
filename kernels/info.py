"""``python -m pae_fast.kernels.info``: the entry point of :mod:`pae_fast.kernels.tools.info`."""

from pae_fast.kernels.tools.info import main

if __name__ == "__main__":
    raise SystemExit(main())
