"""qsfraud: cdc."""
