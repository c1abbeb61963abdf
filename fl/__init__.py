"""qsfraud: fl."""
