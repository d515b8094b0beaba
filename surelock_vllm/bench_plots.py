"""Plots of a `surelock-bench` report (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG (120 dpi) and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def eps_labels(cell: dict) -> list[str]:
    return [k for k, r in cell["runs"].items() if r["eps"] not in (None, 0.0) and r.get("threshold") is None]


def plot_stepwise_flops(report: dict, out: Path) -> Path:
    """The paper's Figure 2: per-step FLOPs of SureLock relative to no-lock."""
    plt = _plt()
    cells = report["cells"]
    gens = sorted({c["gen_length"] for c in cells})
    fig, axes = plt.subplots(1, len(gens), figsize=(4 * len(gens), 3.4), sharey=True, squeeze=False)
    for ax, gen in zip(axes[0], gens):
        cell = next(c for c in cells if c["gen_length"] == gen)
        for label in eps_labels(cell):
            locked = cell["runs"][label]["locked_fraction_per_step"]
            # rows computed at step t = canvas - positions locked before t
            ratio = [1.0] + [1.0 - f for f in locked[:-1]]
            steps = [i / len(ratio) for i in range(len(ratio))]
            ax.plot(steps, ratio, label=label)
        ax.set_title(f"gen_length {gen}, batch {cell['batch']}")
        ax.set_xlabel("denoising progress (step / steps)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("FLOPs vs no-lock, per step")
    axes[0][0].set_ylim(0, 1.05)
    axes[0][-1].legend()
    fig.suptitle("Step-wise algorithmic FLOPs ratio (dense and attention scale alike)")
    return save_figure(fig, out / "stepwise_flops_ratio.png")


def plot_throughput_ratio(report: dict, out: Path) -> Path:
    """The paper's Figure 3: SureLock throughput over no-lock vs gen length and batch."""
    plt = _plt()
    cells = report["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    by_batch: dict[int, list[dict]] = {}
    by_gen: dict[int, list[dict]] = {}
    for c in cells:
        by_batch.setdefault(c["batch"], []).append(c)
        by_gen.setdefault(c["gen_length"], []).append(c)
    batch = max(by_batch, key=lambda b: len(by_batch[b]))
    gen = max(by_gen, key=lambda g: len(by_gen[g]))
    for ax, series, key, title in (
        (axes[0], sorted(by_batch[batch], key=lambda c: c["gen_length"]), "gen_length", f"batch {batch}"),
        (axes[1], sorted(by_gen[gen], key=lambda c: c["batch"]), "batch", f"gen_length {gen}"),
    ):
        for label in eps_labels(series[0]):
            xs = [c[key] for c in series]
            ax.plot(xs, [c["runs"][label]["speedup_vs_nolock"] for c in series], marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([c[key] for c in series], [str(c[key]) for c in series])
        ax.set_xlabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("throughput, SureLock / no-lock")
    axes[1].legend()
    fig.suptitle("Wall-clock throughput ratio (medians, same run)")
    return save_figure(fig, out / "throughput_ratio.png")


def plot_cost_growth(report: dict, out: Path) -> Path:
    """Cost per request vs generation length for reference, no-lock and SureLock."""
    plt = _plt()
    by_batch: dict[int, list[dict]] = {}
    for c in report["cells"]:
        by_batch.setdefault(c["batch"], []).append(c)
    batch = max(by_batch, key=lambda b: len(by_batch[b]))
    series = sorted(by_batch[batch], key=lambda c: c["gen_length"])
    gens = [c["gen_length"] for c in series]
    labels = eps_labels(series[0])
    mid = labels[len(labels) // 2]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    ax = axes[0]
    ax.plot(gens, [c["reference"]["s_per_request"] for c in series], marker="o", label="reference sampler (batch 1)")
    ax.plot(gens, [c["runs"]["no-lock"]["median_s"] / c["batch"] for c in series], marker="o", label=f"no-lock (batch {batch})")
    ax.plot(gens, [c["runs"][mid]["median_s"] / c["batch"] for c in series], marker="o", label=f"SureLock {mid} (batch {batch})")
    ax.set_title("wall-clock per request")
    ax.set_ylabel("seconds")
    ax = axes[1]
    nolock = [(c["runs"]["no-lock"]["dense_flops"] + c["runs"]["no-lock"]["attention_flops"]) / c["batch"] for c in series]
    lock = [(c["runs"][mid]["dense_flops"] + c["runs"][mid]["attention_flops"]) / c["batch"] for c in series]
    ax.plot(gens, nolock, marker="o", label="no-lock = reference: O(N^2 d) per step")
    ax.plot(gens, lock, marker="o", label=f"SureLock {mid}: O(M N d) per step")
    ax.set_title("algorithmic FLOPs per request")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(gens, [str(g) for g in gens])
        ax.set_xlabel("gen_length (steps = gen_length)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Cost growth with generation length")
    return save_figure(fig, out / "cost_growth.png")


def plot_all(report: dict, out: Path) -> list[Path]:
    out = Path(out)
    return [plot_stepwise_flops(report, out), plot_throughput_ratio(report, out), plot_cost_growth(report, out)]
