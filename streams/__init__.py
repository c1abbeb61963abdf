"""qsfraud streams: faust workers that score, decide and learn on every transaction.

Modules: :mod:`streams.settings` (worker settings, topic names), :mod:`streams.scoring` (the
per-batch pipeline parse -> features -> score -> decide, and label learning; no Kafka),
:mod:`streams.config_stream` (signed live configuration), :mod:`streams.checkpoints` (model
state on a compacted topic), :mod:`streams.metrics` (Prometheus text), :mod:`streams.topics`
(topic creation and plain-Kafka helpers), :mod:`streams.garbage` (the collector's policy),
:mod:`streams.app` (the faust app). See
``streams/README.md``. Imports :mod:`fraud` and :mod:`pqc`, never :mod:`qsfraud`.
"""
