"""The speedup over torch per case, drawn from a results dict (``bench --plot``).

Needs matplotlib and nothing else (not torch, not the extension), so that a script can load
this file alone to draw a committed results file.
"""
import math
import re

PASSES = (("fwd", "forward"), ("fwd+bwd", "forward + backward"))


def _rows(data, device):
    """[(label, group label, {pass: speedup over torch eager})] for one device, grouped by
    suite, dtype and layout in the order the groups first appear."""
    groups = {}
    for r in data.get("results", []):
        if r.get("device") == device:
            key = f"{r.get('group', '?')} · {r.get('dtype', '?')} · {r.get('layout', '?')}"
            groups.setdefault(key, []).append(
                (r["name"], {p: r.get("speedup", {}).get(f"torch {p}") for p, _ in PASSES}))
    for r in data.get("weight_norm", []):
        if r.get("device") == device:
            key = f"weight norm · {r.get('dtype', '?')}"
            groups.setdefault(key, []).append(
                (r["name"], {p: r.get("ratios", {}).get(f"x vs torch {p}") for p, _ in PASSES}))
    for r in data.get("models", []):  # a whole training step: drawn with forward + backward
        if r.get("device") == device:
            key = f"models · {r.get('config', '?')}"
            for impl, label in (("fastnorm", r["name"]), ("fastnorm fused", f"{r['name']} fused")):
                if impl in r.get("speedup", {}):
                    groups.setdefault(key, []).append((label, {"fwd": None, "fwd+bwd": r["speedup"][impl]}))
    return [(name, key, sp) for key, cases in groups.items() for name, sp in cases]


def _ticks(lo, hi):
    """Powers of two from lo to hi (every second or more when there are many), 1 among them."""
    first, last = math.ceil(math.log2(lo)), math.floor(math.log2(hi))
    step = max(1, math.ceil((last - first + 1) / 9))
    return [2.0 ** k for k in range(first, last + 1) if k % step == 0]


def plot_speedups(data, path):
    """Horizontal bars of fastnorm's speedup over torch eager, one per case, from 1.0x (the
    line) to the measured ratio on a log axis: a row of panels (forward, forward + backward)
    per device, cases labelled and coloured by suite, dtype and layout. Writes ``path``
    (its format from its extension)."""
    from matplotlib.figure import Figure

    results = data.get("results", []) + data.get("weight_norm", []) + data.get("models", [])
    devices = list(dict.fromkeys(r.get("device", "?") for r in results))
    header = data.get("header", "")
    machines = data.get("machines") or dict(re.findall(r"(?:^|; )(cpu|cuda): ([^;]+)", header))
    build = data.get("build") or {}
    torch_version = build.get("torch") or (re.findall(r"torch ([^,;\s]+)", header) or ["unknown"])[0]
    per_device = {d: _rows(data, d) for d in devices}
    n_rows = sum(len(rows) + len({g for _, g, _ in rows}) for rows in per_device.values())
    fig = Figure(figsize=(13, 1.2 + 0.24 * n_rows + 0.9 * len(devices)), layout="constrained")
    heights = [max(1, len(per_device[d]) + len({g for _, g, _ in per_device[d]})) for d in devices] or [1]
    axes = fig.subplots(max(1, len(devices)), 2, squeeze=False, sharex=True,
                        gridspec_kw={"height_ratios": heights})
    values = [v for rows in per_device.values() for _, _, sp in rows for v in sp.values() if v and v > 0]
    lo = min([0.8] + [v / 1.5 for v in values])
    hi = max([1.25] + [v * 1.5 for v in values])
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    for row, device in enumerate(devices):
        rows = per_device[device]
        y, group_color = 0, {}
        layout = []  # (y, label, group, speedups or None for a group's heading)
        for name, group, sp in rows:
            if group not in group_color:
                group_color[group] = colors[len(group_color) % len(colors)]
                layout.append((y, group, group, None))
                y += 1
            layout.append((y, name, group, sp))
            y += 1
        for col, (p, title) in enumerate(PASSES):
            ax = axes[row][col]
            for yy, label, group, sp in layout:
                v = None if sp is None else sp.get(p)
                if v and v > 0 and math.isfinite(v):
                    ax.barh(yy, v - 1.0, left=1.0, height=0.7, color=group_color[group])
                    ax.text(v * (1.03 if v >= 1 else 0.97), yy, f"{v:.2f}x", va="center",
                            ha="left" if v >= 1 else "right", fontsize=7)
            ax.axvline(1.0, color="black", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            ticks = _ticks(lo, hi)
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}x" for t in ticks])
            ax.minorticks_off()
            ax.set_ylim(y - 0.5, -0.5)
            ax.set_yticks([yy for yy, *_ in layout])
            if col == 0:
                ax.set_yticklabels([label for _, label, _, _ in layout], fontsize=8)
                for tick, (_, _, _, sp) in zip(ax.get_yticklabels(), layout):
                    if sp is None:
                        tick.set_fontweight("bold")
            else:
                ax.set_yticklabels([])
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(f"{device}: {machines[device]}: {title}" if device in machines else f"{device}: {title}",
                         fontsize=9)
            if row == len(devices) - 1:
                ax.set_xlabel("speedup over torch eager (right of 1.0x: fastnorm faster)")
    fig.suptitle(f"fastnorm against torch, mode {data.get('mode') or 'unknown'}, "
                 f"commit {build.get('commit') or 'unknown'}, torch {torch_version}", fontsize=11)
    fig.savefig(path, dpi=100)
