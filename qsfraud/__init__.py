"""qsfraud: qsfraud."""
