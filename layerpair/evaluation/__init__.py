"""Accuracy retention for layer-parallel models: evaluation metrics, automatic pair selection, and
training-free healing.

The modules build upward, each importing only the ones listed above it (tests/test_layers.py checks it):

    data      — evaluation text and multiple-choice items: files, the offline default, ``hf:`` datasets, windows
    forward   — the Decoder run block by block over whole windows (hidden-state caching for the search)
    metrics   — perplexity, top-1 agreement / KL against the original, multiple-choice accuracy
    search    — ``auto_pairs``: pick disjoint adjacent pairs under a perplexity budget or a target depth
    heal      — closed-form least-squares refit of each pair's o_proj/down_proj, folded into the weights
    selection — the ``--pairs auto`` / ``--heal`` flags turned into a Decoder plus report entries
    study     — ``python -m layerpair.evaluation.study``: the accuracy-vs-depth study
    cli       — ``layerpair-export eval``
    lm_eval_adapter — lm-evaluation-harness model (optional ``lm_eval``)
"""
