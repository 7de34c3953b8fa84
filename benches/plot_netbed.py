"""Plots benches/netbed.rs's results: aggregate tokens/s against the one-way delay per egress,
one panel per pipeline depth, one line per stream count, solid without loss and dashed with
(runs with speculative decoding, from `--compare-speculative`, are left out).

    python3 benches/plot_netbed.py target/netbed.json benches/netbed.png

Needs matplotlib (`python3 -m pip install matplotlib`).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    with open(src) as f:
        cells = json.load(f)
    stages = sorted({c["stages"] for c in cells})
    losses = sorted({c["loss"] for c in cells})
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4.2), squeeze=False)
    for ax, s in zip(axes[0], stages):
        levels = sorted({r["concurrency"] for c in cells if c["stages"] == s for r in c["runs"]})
        for i, level in enumerate(levels):
            for loss in losses:
                pts = sorted(
                    (c["delay_ms"], r["aggregate_tok_s"])
                    for c in cells
                    if c["stages"] == s and c["loss"] == loss
                    for r in c["runs"]
                    if r["concurrency"] == level and r.get("speculative", "off") in ("off", "-")
                )
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(
                    xs,
                    ys,
                    marker="o",
                    color=f"C{i}",
                    linestyle="-" if loss == 0 else "--",
                    label=f"{level} stream{'s' if level > 1 else ''}, loss {loss * 100:g}%",
                )
        ax.set_title(f"{s} stage{'s' if s > 1 else ''} ({s + 1} links per token)")
        ax.set_xlabel("one-way delay per egress (ms)")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("shoal on the network test bed: SmolLM2-135M Q4_1, 1 thread per process, 2 cores")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
