"""qsfraud: ui."""
