"""Accuracy retention for layer-parallel models: evaluation metrics, automatic pair selection, and
training-free healing.

    metrics  — perplexity, top-1 agreement / KL against the original, multiple-choice accuracy
    forward  — the Decoder run block by block over whole windows (hidden-state caching for the search)
    search   — ``auto_pairs``: pick disjoint adjacent pairs under a perplexity budget or a target depth
    heal     — closed-form least-squares refit of each pair's o_proj/down_proj, folded into the weights
    cli      — ``layerpair-export eval``
"""
