"""qsfraud's fraud core: schema, streaming features, mergeable online models, decisions.

Pure computation, no I/O; imports nothing else of qsfraud. Public API:

``fraud.schema``
    ``Transaction``, ``Label``, ``Decision`` (versioned JSON, ``from_dict``/``to_dict``/
    ``from_json``/``to_json``), ``SchemaError`` (``.field`` names the bad field).
``fraud.features``
    ``KeyValueState`` (protocol: ``get(key, default)`` and ``state[key] = value``; a ``dict``
    or a faust ``Table``), ``FeatureExtractor(prefix="")`` with
    ``extract(tx, state) -> dict[str, float]`` and ``extract_many(txs, state)``,
    ``FEATURE_NAMES``.
``fraud.models``
    ``RiskModel(learning_rate=..., ...)`` (a ``river.base.Classifier``; ``from_params``
    takes a ``ModelParams``): ``predict_proba_one(x)`` and ``score_one(x) -> float`` in
    [0, 1] learn nothing, ``learn_one(x, y, w=1)``, ``learn_unsupervised_one(x)`` (the anomaly
    statistics), ``score_and_explain_many(keys, X, k, observe)`` (the compiled batch path),
    ``contributions(x, k)``, ``export_state()``/``from_state(d)``,
    ``export_shared()``/``load_shared(d)``/``export_delta()``; ``merge_states([...])``,
    ``merge_scalers``, ``merge_linear``; ``ModelParams``.
``fraud.decisions``
    ``PolicyConfig.from_dict``/``to_dict``, ``Policy(config).replace(config)``/``.decide(...)``,
    ``decide(tx, score, config, contributions, features, model_version, timings) -> Decision``.
``fraud.metrics``
    Exact ``roc_auc``, ``average_precision``, ``precision_at_k``, ``recall_at_fpr``, ``report``.
``fraud.generator``
    ``generate(GeneratorConfig)``: synthetic multi-retailer transactions with fraud scenarios
    and delayed labels; ``write_rows(rows, path)``.
``fraud.evaluation``
    ``evaluate(rows, ...)``: prequential local/central evaluation of any CSV/JSONL table.
"""
