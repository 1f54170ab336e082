"""Pipeline stages: one library function per stage; the CLI modules call them."""
