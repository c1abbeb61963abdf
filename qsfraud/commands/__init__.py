"""Sub-commands of the qsfraud CLI, one module each, discovered by :mod:`qsfraud.cli`."""
