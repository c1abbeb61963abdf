"""qsfraud: fraud."""
