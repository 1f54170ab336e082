"""Pipeline stages: one library function per stage, shared by its CLI command and the demo."""
