"""The hot-experts experiment's output: result.json, the PNGs and the table printed at the end."""

import json
from pathlib import Path

COLORS = {"static": "tab:gray", "serve-default": "tab:orange", "raymoe": "tab:blue", "raymoe+replace": "tab:green"}


def write(result: dict, out: Path) -> list[Path]:
    """result.json and the plots into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "result.json"
    path.write_text(json.dumps(result, indent=1))
    return [path, *plots(result, out)]


def _label(result: dict) -> str:
    return " (SIMULATED)" if result["simulated"] else ""


def plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    sim = _label(result)
    for wname, policies in result["workloads"].items():
        # Replicas per shard over time, load per shard overlaid, one panel per policy.
        fig, axes = plt.subplots(len(policies), 1, figsize=(10, 2.6 * len(policies)), sharex=True, squeeze=False)
        for ax, (policy, r) in zip(axes[:, 0], policies.items(), strict=True):
            s = r["series"]
            load_ax = ax.twinx()
            for shard, counts in s["replicas"].items():
                line, = ax.step(s["t"], counts, where="post", lw=1.5, label=f"shard {shard}")
                load_ax.plot(s["t"], s["load"][shard], color=line.get_color(), lw=0.6, alpha=0.5)
            for d in r["decisions"]:
                if d["kind"] in ("rebalance", "kill"):
                    ax.axvline(d["time"], color="red" if d["kind"] == "kill" else "green", ls="--", lw=1)
            ax.set_ylabel("replicas")
            load_ax.set_ylabel("load (slots/s)" if not result["simulated"] else "load (tokens/s)", fontsize=8)
            ax.set_title(f"{policy}: {r['avg_replicas']:.1f} replicas on average", fontsize=9)
        axes[0, 0].legend(fontsize=7, ncol=4, loc="upper left")
        axes[-1, 0].set_xlabel("seconds")
        fig.suptitle(f"{wname}: replicas per shard (steps) and load per shard (thin){sim}")
        fig.tight_layout()
        files.append(_save(fig, out / f"replicas_{wname}.png"))
        for key, ylabel, name in (("p99_ms", "p99 token latency (ms)", "p99"), ("imbalance", "imbalance", "imbalance")):
            fig, ax = plt.subplots(figsize=(10, 3.5))
            for policy, r in policies.items():
                s = r["series"]
                pts = [(t, v) for t, v in zip(s["t"], s[key], strict=True) if v is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), label=policy, color=COLORS.get(policy))
            ax.set_xlabel("seconds")
            ax.set_ylabel(ylabel)
            if key == "p99_ms":
                ax.set_yscale("log")
            ax.set_title(f"{wname}: {ylabel} per second{sim}")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            files.append(_save(fig, out / f"{name}_{wname}.png"))
    files.append(summary_chart(result, out / "summary.png"))
    return files


def summary_chart(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    workloads = list(result["workloads"])
    policies = list(next(iter(result["workloads"].values())))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, title in zip(axes, ("p99_ms", "tokens_per_s", "avg_replicas"),
                              ("p99 token latency (ms)", "tokens/s", "replicas on average"), strict=True):
        width = 0.8 / len(policies)
        for i, policy in enumerate(policies):
            vals = [result["workloads"][w][policy].get(key) or 0 for w in workloads]
            ax.bar(np.arange(len(workloads)) + i * width, vals, width, label=policy, color=COLORS.get(policy))
        ax.set_xticks(np.arange(len(workloads)) + 0.4 - width / 2, workloads, fontsize=8)
        ax.set_title(title + _label(result), fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(result: dict) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = f"{'workload':<9} {'policy':<15} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'TTFT p99':>9} {'failed':>6} " \
           f"{'replicas':>8} {'imbal.':>6} {'settled':>7}"
    lines = [("SIMULATED: " if result["simulated"] else "") + head]
    for w, policies in result["workloads"].items():
        for p, r in policies.items():
            lines.append(f"{w:<9} {p:<15} {num(r['tokens_per_s'], '8.0f')} {num(r['p50_ms'], '8.1f')} "
                         f"{num(r['p99_ms'], '8.1f')} {num(r.get('ttft_p99_ms'), '9.1f')} {r['failed']:>6} "
                         f"{num(r['avg_replicas'], '8.1f')} {num(r['imbalance_p50'], '6.2f')} "
                         f"{num(r.get('imbalance_after_replace'), '7.2f')}")
            if r.get("kill"):
                k = r["kill"]
                lines.append(f"{'':<9} {'':<15} kill at {k['at']:.0f}s: {k['failed']} failed, "
                             f"{100 * k['throughput_lost']:.1f}% throughput lost in the minute around it")
    return "\n".join(lines)
