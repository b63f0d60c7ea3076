"""Plots of scripts/benchmark.py's results (matplotlib, Agg backend): offline throughput per
runtime / mode, TTFT / ITL / E2E latency CDFs per phase, and throughput vs slots for a sweep.
Input: the JSON-able dict benchmark.py writes with --json (so --replot can redraw from a file).

Not a CLI: imported by scripts/benchmark.py as `import bench_plots`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_all(out: dict, plot_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    e = out["engine"]
    base = f"{out['model']['name']} on {out['machine']['backend']}, {out['workload']['num_requests']} requests"
    title = f"{base}, slots={e['max_slots']}, decode_steps={e['decode_steps']}"

    offline = out["results"]["offline"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(offline)
    vals = [offline[k]["metrics"]["output_throughput"] for k in names]
    colors = ["tab:orange" if k == "hf" else "tab:blue" for k in names]
    bars = ax.bar(names, vals, color=colors)
    hf = offline.get("hf")
    for b, k, v in zip(bars, names, vals):
        label = f"{v:,.0f}" + (f"\n{v / hf['metrics']['output_throughput']:.1f}x hf" if hf and k != "hf" else "")
        ax.annotate(label, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("output tokens / s")
    ax.set_xlabel("runtime / batching mode")
    hfb = f", hf batch={hf['metrics']['batch_size']}" if hf else ""
    ax.set_title(f"Offline output throughput\n{title}{hfb}", fontsize=10)
    ax.set_ylim(0, max(vals) * 1.25)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:blue"), plt.Rectangle((0, 0), 1, 1, color="tab:orange")],
              labels=["jaxinfer", "HF transformers generate"], loc="upper right")
    fig.tight_layout()
    fig.savefig(plot_dir / "throughput.png", dpi=120)
    plt.close(fig)
    written.append("throughput.png")

    for phase, runs in out["results"].items():
        if not runs:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, (key, label) in zip(axes, (("ttft", "TTFT"), ("itl", "ITL"), ("e2e", "E2E latency"))):
            for mode, r in runs.items():
                reqs = r["requests"]
                if mode == "hf":
                    if key != "e2e":
                        continue
                    xs = [q["completion_s"] - q["arrival_s"] for q in reqs]
                    mlabel = "hf (batch completion time)"
                elif key == "ttft":
                    xs = [q["token_times_s"][0] - q["arrival_s"] for q in reqs if q["token_times_s"]]
                    mlabel = mode
                elif key == "e2e":
                    xs = [q["token_times_s"][-1] - q["arrival_s"] for q in reqs if q["token_times_s"]]
                    mlabel = mode
                else:
                    xs = [b - a for q in reqs for a, b in zip(q["token_times_s"], q["token_times_s"][1:])]
                    mlabel = f"{mode} ({sum(x == 0 for x in xs) / max(1, len(xs)):.0%} of gaps are 0)"
                if not xs:
                    continue
                xs = np.sort(np.asarray(xs) * 1000.0)
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=mlabel)
            ax.set_xlabel(f"{label} (ms)")
            ax.set_ylabel("fraction of " + ("token gaps" if key == "itl" else "requests"))
            ax.set_title(f"{label} CDF" + (" (gaps in one host sync = 0)" if key == "itl" else ""), fontsize=10)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(loc="best")
        fig.suptitle(f"Latency CDFs, {phase}: {title}", fontsize=11)
        fig.tight_layout()
        name = f"latency_cdf_{phase.split(' ')[0]}.png"
        fig.savefig(plot_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    if out.get("sweep"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        modes = list(out["sweep"][0]["output_throughput"])
        for mode in modes:
            xs = [s["slots"] for s in out["sweep"]]
            ys = [s["output_throughput"][mode] for s in out["sweep"]]
            ax.plot(xs, ys, marker="o", label=mode if mode != "hf" else "hf (batch size = slots)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("number of slots (concurrent sequences)")
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"Offline output throughput vs slots\n{base}, decode_steps={e['decode_steps']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, None)
        ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(plot_dir / "throughput_vs_slots.png", dpi=120)
        plt.close(fig)
        written.append("throughput_vs_slots.png")
    return written
