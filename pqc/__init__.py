"""qsfraud: pqc."""
