"""The figures of a throughput run, drawn from its rows: ``main.png`` (tokens/s per variant), ``scaling_pairs.png``
(decode ratio against the number of pairs) and ``scaling_size.png`` (ratio against model size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """Draw every figure the rows have data for into ``out``; returns the file names written, in order."""
    import matplotlib

    matplotlib.use("Agg")
    ok = [r for r in rows if r["status"] == "ok"]
    drawn = (_plot_main(ok, out), _plot_scaling_pairs(ok, out), _plot_scaling_size(ok, out))
    return [f for f in drawn if f is not None]


def _plot_main(ok: list[dict[str, Any]], out: Path) -> str | None:
    """Main: tokens/s per variant, per runtime and phase, IQR as error bars; None without data."""
    import matplotlib.pyplot as plt

    main = [r for r in ok if r["section"] == "main"]
    groups = sorted({(r["runtime"], r["phase"]) for r in main})
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (rt, ph) in zip(axes[0], groups, strict=True):
        rs = [r for r in main if r["runtime"] == rt and r["phase"] == ph]
        med = [r["tokens_per_s"]["median"] for r in rs]
        err = [
            [m - r["tokens_per_s"]["q25"] for m, r in zip(med, rs, strict=True)],
            [r["tokens_per_s"]["q75"] - m for m, r in zip(med, rs, strict=True)],
        ]
        ax.bar(range(len(rs)), med, yerr=err, color=["#888" if r["num_pairs"] == 0 else "#2a7" for r in rs])
        ax.set_xticks(range(len(rs)), [r["variant"] for r in rs], rotation=30, ha="right", fontsize=8)
        for i, r in enumerate(rs):
            if r.get("ratio") is not None:
                ax.text(i, med[i], f"x{r['ratio']:.3f}\n(lim {r['limit']:.3f})", ha="center", va="bottom", fontsize=7)
        ax.set_title(f"{rs[0]['model']}: {rt} {ph}", fontsize=9)
        ax.set_ylabel("tokens/s (median, IQR)")
    fig.tight_layout()
    fig.savefig(out / "main.png", dpi=110)
    plt.close(fig)
    return "main.png"


def _plot_scaling_pairs(ok: list[dict[str, Any]], out: Path) -> str | None:
    """Decode ratio against the number of pairs, with the limit L / (L - pairs); None without data."""
    import matplotlib.pyplot as plt

    sp = [r for r in ok if r["section"] == "scaling_pairs" and r.get("ratio") is not None]
    if not sp:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    L = sp[0]["num_layers"]
    ks = sorted({r["num_pairs"] for r in sp})
    ax.plot(ks, [L / (L - k) for k in ks], "k--", label="limit L/(L-pairs)")
    for form, mk in (("unmerged", "o-"), ("merged", "s-")):
        rs = sorted((r for r in sp if r.get("form") == form), key=lambda r: r["num_pairs"])
        ax.errorbar(
            [r["num_pairs"] for r in rs],
            [r["ratio"] for r in rs],
            yerr=[
                [max(0.0, r["ratio"] - r["paired_ratio"]["q25"]) for r in rs],
                [max(0.0, r["paired_ratio"]["q75"] - r["ratio"]) for r in rs],
            ],
            fmt=mk,
            capsize=3,
            label=f"LP {form}",
        )
    ax.axhline(1.0, color="#bbb", lw=0.8)
    ax.set_xlabel(f"pairs (of {L} layers)")
    ax.set_ylabel("decode tokens/s ratio vs original")
    ax.set_title(f"{sp[0]['model']}: torch eager decode", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling_pairs.png", dpi=110)
    plt.close(fig)
    return "scaling_pairs.png"


def _plot_scaling_size(ok: list[dict[str, Any]], out: Path) -> str | None:
    """Ratio against model size (parameters), decode and prefill, with the limit; None without data."""
    import matplotlib.pyplot as plt

    ss = [r for r in ok if r["section"] == "scaling_size" and r.get("ratio") is not None]
    if not ss:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6), squeeze=False)
    for ax, ph in zip(axes[0], ("decode", "prefill"), strict=True):
        for v, mk in (("lp_unmerged", "o-"), ("lp_merged", "s-")):
            rs = sorted((r for r in ss if r["phase"] == ph and r["variant"] == v), key=lambda r: r["parameters"])
            ax.plot([r["parameters"] / 1e6 for r in rs], [r["ratio"] for r in rs], mk, label=v)
        rs = sorted((r for r in ss if r["phase"] == ph and r["variant"] == "lp_merged"), key=lambda r: r["parameters"])
        ax.plot([r["parameters"] / 1e6 for r in rs], [r["limit"] for r in rs], "k--", label="limit")
        ax.set_xscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("tokens/s ratio")
        ax.set_title(f"torch eager {ph}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling_size.png", dpi=110)
    plt.close(fig)
    return "scaling_size.png"
