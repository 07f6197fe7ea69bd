"""The sweep's picture: the chosen metric against each swept value, one line per setting of the others."""

from __future__ import annotations

from pathlib import Path

from train.sweep_points import swept_keys


def _value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def series(records: list[dict], key: str, metric: str) -> dict[str, list[tuple]]:
    """Line label (the other swept values) -> [(value of key, metric)], finished points only."""
    from train.sweep import score

    keys = swept_keys([r["overrides"] for r in records])
    lines: dict[str, list[tuple]] = {}
    for r in records:
        y = score(r, metric)
        if r["status"] != "finished" or y is None:
            continue
        values = dict(o.partition("=")[::2] for o in r["overrides"])
        label = " ".join(f"{k}={values.get(k)}" for k in keys if k != key) or metric
        lines.setdefault(label, []).append((values.get(key), y))
    return lines


def plot_sweep(records: list[dict], metric: str, out: Path) -> bool:
    """Write one panel per swept key to ``out``; False (nothing written) while no point has finished."""
    keys = swept_keys([r["overrides"] for r in records])
    panels = [(key, series(records, key, metric)) for key in keys]
    panels = [(key, lines) for key, lines in panels if lines]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, lines) in zip(axes[0], panels):
        numeric = all(isinstance(_value(x), float) for points in lines.values() for x, _ in points)
        seen = list(dict.fromkeys(x for points in lines.values() for x, _ in points))  # sweep order for names
        order = sorted(seen, key=_value) if numeric else seen
        for label, points in sorted(lines.items()):
            points = sorted(points, key=lambda p: order.index(p[0]))
            xs = [_value(x) if numeric else order.index(x) for x, _ in points]
            ax.plot(xs, [y for _, y in points], marker="o", label=label)
        if numeric and all(_value(x) > 0 for x in order) and max(map(_value, order)) / min(map(_value, order)) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(order)), order)
        baselines = {r["baselines"].get(metric) for r in records} - {None}
        if len(baselines) == 1:  # what unrelated images score: the floor a style adapter must clear
            ax.axhline(baselines.pop(), color="grey", linestyle="--", label="baseline")
        ax.set_xlabel(key)
        ax.set_ylabel(metric + (" (lower is better)" if metric in ("loss", "content_leakage") else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{metric} per sweep point (finished points)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True
