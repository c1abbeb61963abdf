"""qsfraud: streams."""
