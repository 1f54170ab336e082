"""``python -m pae_fast <command>``: one subcommand per pipeline stage (see ``--help``)."""

from pae_fast.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
