"""Turn a results file into what people read: a terminal table, a Markdown report and PNG plots
(throughput against batch size, speed-up over eager, share of the roofline floor)."""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .results import Result, Run
from .peaks import format_peak

# The eager engine speed-ups are measured against: the first of these that ran for the group.
BASELINES = ("torch-eager", "hf-eager", "timm-eager")
PLAN = "fastmvit"  # the fusion plan whose floor the "share of roofline" uses (see roofline.py)

# The issue's targets: MobileViT-S, 256x256, float16, same run.
TARGETS = (
    ("batch 256: >= 3x eager PyTorch with autocast", 256, "torch-autocast", 3.0),
    ("batch 256: >= 1.5x torch.compile max-autotune", 256, "compile-max-autotune", 1.5),
    ("batch 1: >= 15x eager PyTorch", 1, "torch-eager", 15.0),
    ("batch 1: >= 2x torch.compile reduce-overhead", 1, "compile-reduce-overhead", 2.0),
)


def _groups(results: List[Result]) -> "OrderedDict[Tuple[str, str, int], List[Result]]":
    groups: "OrderedDict[tuple, List[Result]]" = OrderedDict()
    for r in results:
        groups.setdefault((r.variant, r.dtype, r.size), []).append(r)
    return groups


def _lookup(results: List[Result]) -> Dict[tuple, Result]:
    return {(r.variant, r.dtype, r.size, r.batch, r.engine): r for r in results if r.status == "ok"}


def baseline(results: List[Result], variant: str, dtype: str, size: int = 256) -> Optional[str]:
    ran = {r.engine for r in results if r.status == "ok" and (r.variant, r.dtype, r.size) == (variant, dtype, size)}
    return next((b for b in BASELINES if b in ran), None)


def speedup(results: List[Result], r: Result, base: Optional[str]) -> Optional[float]:
    if base is None or r.status != "ok":
        return None
    b = _lookup(results).get((r.variant, r.dtype, r.size, r.batch, base))
    return b.ms.median / r.ms.median if b else None


def roofline_share(run: Run, r: Result) -> Optional[float]:
    """Floor time of the fused plan over the measured time, in percent."""
    for row in run.roofline:
        if (row["variant"], row["batch"], row["dtype"], row.get("size", 256)) == (r.variant, r.batch, r.dtype, r.size):
            floor = row["floor_ms"].get(PLAN)
            return 100 * floor / r.ms.median if floor and r.ms else None
    return None


def targets(run: Run) -> List[dict]:
    """The issue's targets, evaluated where the run has the numbers."""
    found = _lookup(run.results)
    out = []
    for what, batch, other, need in TARGETS:
        ours, theirs = found.get(("s", "float16", 256, batch, "fastmvit")), found.get(("s", "float16", 256, batch, other))
        if ours and theirs:
            ratio = theirs.ms.median / ours.ms.median
            out.append({"target": what, "measured": f"{ratio:.2f}x", "met": ratio >= need})
        else:
            missing = [n for n, x in (("fastmvit", ours), (other, theirs)) if not x]
            out.append({"target": what, "measured": f"no data ({', '.join(missing)} not measured)", "met": None})
    ours = found.get(("s", "float16", 256, 1, "fastmvit"))
    out.append({"target": "batch 1: under 0.2 ms", "measured": f"{ours.ms.median:.3f} ms" if ours else
                "no data (fastmvit not measured)", "met": (ours.ms.median < 0.2) if ours else None})
    return out


# --------------------------------------------------------------------------------------------------
# Terminal
# --------------------------------------------------------------------------------------------------

def _fmt(x: Optional[float], spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _loads(x) -> str:
    return " ".join(f"{v:.1f}" for v in x) if x else "-"


def _ms(x: float) -> str:
    """Three significant digits, never in exponent form: 2910, 12.3, 0.153."""
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{2 - math.floor(math.log10(x))}f}" if x > 0 else "0"


def render_terminal(run: Run) -> str:
    """What each engine runs here, then one line per measurement, grouped by model and dtype; what was not
    measured, and why; and, when other work competed with the run, a warning that its numbers are doubtful."""
    m = run.meta
    busy = m.get("busy") or []
    doubt = "?" if busy else ""
    lines = [f"fastmvit bench | {m['device']} | torch {m['versions']['torch']} | {m['date']}",
             f"peak: {format_peak(m.get('peak') or {})}", ""]
    measured = list(OrderedDict.fromkeys(r.engine for r in run.results))
    runs = m.get("runs") or {}
    if runs:
        lines.append("what each row runs on this device:")
        lines += [f"  {name:<24} {runs[name]}" for name in measured if name in runs]
        lines.append("")
    same = set(m.get("computes_reference") or [])
    head = (f"{'model':<8} {'dtype':<9} {'batch':>5}  {'engine':<24} {'ms/batch':>9} {'+-':>7} "
            f"{'images/s':>10} {'speed-up':>9} {'roofline':>9} {'max|dlogit|':>11}")
    lines += [head, "-" * len(head)]
    for (variant, dtype, size), rs in _groups(run.results).items():
        base = baseline(run.results, variant, dtype, size)
        for r in sorted((r for r in rs if r.status == "ok"), key=lambda r: r.batch):
            s, share = speedup(run.results, r, base), roofline_share(run, r)
            diff = "self" if r.engine in same and r.dtype == "float32" else _fmt(r.max_abs_diff, ".2g")
            lines.append(f"{variant:<8} {dtype:<9} {r.batch:>5}  {r.engine:<24} {r.ms.median:>9.3f} "
                         f"{(r.ms.q3 - r.ms.q1) / 2:>7.3f} {r.images_per_s:>10.1f} "
                         f"{_fmt(s, '.2f') + 'x' + doubt if s else '-':>9} "
                         f"{_fmt(share, '.1f') + '%' + doubt if share else '-':>9} {diff:>11}")
        lines.append("")
    if any(r.status == "ok" for r in run.results):
        lines.append("speed-up: over " + " / ".join(BASELINES) + " (the first that ran); +-: half the "
                     "interquartile range; roofline: the fused plan's floor time over the measured time; "
                     "max|dlogit|: against fastmvit's float32 torch path, same weights (self: the row runs "
                     "that very path, so there is nothing to compare)")
    tg = [t for t in targets(run) if t["met"] is not None]
    if tg:
        lines += ["", "targets (MobileViT-S, 256x256, float16)" + (": not judged, the machine was busy" if busy else ":")]
        lines += [f"  {('?      ' if busy else 'met    ' if t['met'] else 'NOT MET')}  {t['target']}: {t['measured']}"
                  for t in tg]
    lines += [""] + _not_measured(run.results)
    if busy:
        lines += ["", f"WARNING: the machine was busy while measuring ({'; '.join(busy)}). Other processes "
                      "competed for it, so the times and the ratios marked ? are doubtful: rerun when it is "
                      "quiet (`uptime` shows a load average below about half the CPUs)"
                      + (", or with fewer threads (--threads 1)" if m.get("device_type") == "cpu" else "") + "."]
    return "\n".join(lines).rstrip() + "\n"


def _not_measured(results: List[Result]) -> List[str]:
    reasons: "OrderedDict[tuple, List[str]]" = OrderedDict()
    for r in results:
        if r.status != "ok":
            reasons.setdefault((r.engine, r.status, r.reason), []).append(f"{r.variant}/{r.dtype}/b{r.batch}")
    lines = ["not measured:"] if reasons else []
    for (engine, status, reason), where in reasons.items():
        n = len(where)
        lines.append(f"  {engine} ({status}, {n} {'config' if n == 1 else 'configs'}): {reason}")
    return lines


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------

def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(run: Run, plots: Optional[List[str]] = None) -> str:
    m, v = run.meta, run.meta.get("versions", {})
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "cuda", "triton", "timm", "transformers", "python")
                         if v.get(k))
    lines = ["# fastmvit benchmark", ""]
    lines += _table(["", ""], [["device", m["device"]], ["date", m["date"]], ["commit", f"`{m.get('git_commit')}`"],
                               ["versions", versions], ["peak", format_peak(m.get("peak") or {})],
                               ["command", f"`{m.get('command', '')}`"]]
                      + ([["load average (1/5/15 min), start / end",
                           f"{_loads(m.get('load_average'))} / {_loads(m.get('load_average_end'))} "
                           f"on {m.get('threads')} threads"]] if m.get("device_type") == "cpu" else []))
    if m.get("busy"):
        lines += ["", f"**Doubtful: the machine was busy while measuring** ({'; '.join(m['busy'])}); rerun on a "
                      "quiet machine before drawing conclusions."]
    if m.get("runs"):
        lines += ["", "What each engine runs on this device: "
                  + "; ".join(f"`{name}`: {what}" for name, what in m["runs"].items()) + "."]
    size = m.get("size", 256)
    lines += ["", f"Times are per batch of random {size}x{size} images (inputs prepared and warm-up calls made outside "
              "the timed region; the device is synchronised inside every timed call): the median of the "
              "rounds, and in brackets the interquartile range. Every engine runs the same weights.", ""]
    tg = targets(run)
    if any(t["met"] is not None for t in tg):
        lines += ["## Targets (MobileViT-S, 256x256, float16)", ""]
        lines += _table(["target", "measured", "met"], [[t["target"], t["measured"],
                        {True: "yes", False: "**no**", None: "-"}[t["met"]]] for t in tg])
        lines.append("")
    found = _lookup(run.results)
    for (variant, dtype, size), rs in _groups(run.results).items():
        ok = [r for r in rs if r.status == "ok"]
        if not ok:
            continue
        batches = sorted({r.batch for r in ok})
        engines = list(OrderedDict.fromkeys(r.engine for r in ok))
        base = baseline(run.results, variant, dtype, size)
        lines += [f"## {variant} | {dtype} | {size}x{size}", "", "Images per second (ms per batch [IQR]):", ""]
        rows = []
        for e in engines:
            row = [e]
            for b in batches:
                r = found.get((variant, dtype, size, b, e))
                row.append(f"{r.images_per_s:,.1f} ({_ms(r.ms.median)} [{_ms(r.ms.q1)}-{_ms(r.ms.q3)}])" if r else "-")
            rows.append(row)
        lines += _table(["engine"] + [f"batch {b}" for b in batches], rows) + [""]
        if base:
            lines += [f"Speed-up over {base} / share of the roofline floor ({PLAN} plan):", ""]
            rows = []
            for e in engines:
                row = [e]
                for b in batches:
                    r = found.get((variant, dtype, size, b, e))
                    s, share = (speedup(run.results, r, base), roofline_share(run, r)) if r else (None, None)
                    row.append(f"{_fmt(s, '.2f')}x / {_fmt(share, '.1f')}%" if r else "-")
                rows.append(row)
            lines += _table(["engine"] + [f"batch {b}" for b in batches], rows) + [""]
        rows = []
        for e in engines:
            mine = [r for r in ok if r.engine == e]
            warm = [r.warmup_s for r in mine if r.warmup_s is not None]
            diff = [r.max_abs_diff for r in mine if r.max_abs_diff is not None]
            rows.append([e, _fmt(max(warm) if warm else None, ".3g"), _fmt(max(diff) if diff else None, ".2g")])
        lines += ["Warm-up (compilation, graph capture) and agreement with fastmvit's float32 torch path:", ""]
        lines += _table(["engine", "warm-up s (max over batches)", "max abs logit difference"], rows) + [""]
    if run.roofline:
        lines += ["## Roofline", "",
                  "FLOPs from the model structure; bytes: input, weights once, logits, plus the activations that "
                  "cross a kernel boundary in each fusion plan (ideal: none; fastmvit: the fused engine's "
                  "plan; layerwise: every layer's output written and read once). Floor = max(FLOPs / peak "
                  "FLOP/s, bytes / peak bandwidth). See fastmvit/benchmark/roofline.py.", ""]
        rows = []
        for row in run.roofline:
            f, mb = row["floor_ms"], row["mb"]
            rows.append([row["variant"], str(row["batch"]), row["dtype"], f"{row['gflop']:.3g}",
                         " / ".join(f"{mb[p]:.4g}" for p in ("ideal", "fastmvit", "layerwise")),
                         " / ".join(_fmt(f.get(p), ".3g") for p in ("ideal", "fastmvit", "layerwise")),
                         row["bound"].get(PLAN, "-"),
                         " / ".join(str(row["kernels"][p]) for p in ("ideal", "fastmvit", "layerwise"))])
        lines += _table(["variant", "batch", "dtype", "GFLOP", "MB (ideal / fastmvit / layerwise)",
                         "floor ms (ideal / fastmvit / layerwise)", "bound", "kernels"], rows) + [""]
    if run.kernels:
        lines += ["## Kernels", "", "`triton.testing.do_bench` medians (L2 flushed); bytes and FLOPs are each "
                  "op's minimum; % peak: of the resource that bounds the op.", ""]
        rows, missing = [], OrderedDict()
        for k in run.kernels:
            if k.get("status") != "ok":
                missing.setdefault(k.get("reason", ""), []).append(f"{k['family']} {k['case']} {k['dtype']}")
                continue
            f, e = k["fused"], k["eager"]
            pct = f.get("pct_bandwidth") if k.get("bound") == "memory" else f.get("pct_flops")
            rows.append([k["family"], k["case"], k["dtype"], _ms(f["ms"]), _ms(e["ms"]), f"{k['speedup']:.2f}x",
                         f"{f['GBps']:.0f}", f"{f['TFLOPs']:.3g}", _fmt(pct, ".0f") + "%", k.get("bound", "-")])
        if rows:
            lines += _table(["family", "case", "dtype", "fused ms", "eager ms", "speed-up", "GB/s", "TFLOP/s",
                             "% peak", "bound"], rows) + [""]
        for reason, which in missing.items():
            shown = ", ".join(which[:4]) + (f" and {len(which) - 4} more" if len(which) > 4 else "")
            lines.append(f"- not measured ({len(which)}): {reason} ({shown})")
        lines += [""] if missing else []
    nm = _not_measured(run.results)
    if nm:
        lines += ["## Not measured", ""] + [f"- {line.strip()}" for line in nm[1:]] + [""]
    for p in plots or []:
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------

def render_plots(run: Run, out_dir) -> Tuple[List[Path], str]:
    """throughput.png, speedup.png and roofline.png in ``out_dir``; ([], reason) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception as e:
        return [], f"no plots: matplotlib is not importable ({type(e).__name__})"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = [(k, [r for r in rs if r.status == "ok"]) for k, rs in _groups(run.results).items()]
    groups = [(k, rs) for k, rs in groups if rs]
    if not groups:
        return [], "no plots: nothing was measured"
    title = f"{run.meta['device']} | {run.meta['date'][:10]}"
    all_engines = list(OrderedDict.fromkeys(r.engine for _, rs in groups for r in rs))
    colour = {e: plt.get_cmap("tab10" if len(all_engines) <= 10 else "tab20")(i) for i, e in enumerate(all_engines)}
    paths = []
    for kind in ("throughput", "speedup", "roofline"):
        cols = min(3, len(groups))
        rows = (len(groups) + cols - 1) // cols
        legend_in = 0.1 + 0.22 * ((len(all_engines) + 4) // 5)  # inches under the plots for the legend
        height = 3.6 * rows + 0.3 + legend_in
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, height), squeeze=False)
        for ax in axes.flat[len(groups):]:
            ax.axis("off")
        ratios = []
        for ax, ((variant, dtype, size), rs) in zip(axes.flat, groups):
            base = baseline(run.results, variant, dtype, size)
            batches = sorted({r.batch for r in rs})
            engines = [e for e in all_engines if any(r.engine == e for r in rs)]
            by = {(r.engine, r.batch): r for r in rs}
            width = 0.8 / len(engines)
            for i, e in enumerate(engines):
                pts = [(b, by[(e, b)]) for b in batches if (e, b) in by]
                if kind == "throughput":
                    ax.plot([b for b, _ in pts], [r.images_per_s for _, r in pts], marker="o", label=e,
                            color=colour[e])
                    continue
                vals = [(b, speedup(run.results, r, base) if kind == "speedup" else roofline_share(run, r))
                        for b, r in pts]
                vals = [(b, y) for b, y in vals if y is not None]
                ratios += [y for _, y in vals]
                ax.bar([batches.index(b) + (i - (len(engines) - 1) / 2) * width for b, _ in vals],
                       [y for _, y in vals], width=width, label=e, color=colour[e])
            if kind == "throughput":
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xticks(batches, [str(b) for b in batches])
                ax.set_ylabel("images / s")
                plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.3g}")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
            else:
                ax.set_xticks(range(len(batches)), [str(b) for b in batches])
                if kind == "speedup":
                    ax.axhline(1.0, color="grey", lw=0.8)
                    ax.set_ylabel(f"speed-up over {base or 'eager'}")
                    if ratios and max(ratios) / max(min(ratios), 1e-9) > 20:
                        ax.set_yscale("log")
                        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                else:
                    ax.set_ylabel(f"% of roofline floor ({PLAN} plan)")
            ax.set_xlabel("batch")
            ax.set_title(f"{variant} | {dtype} | {size}x{size}", fontsize=10)
            ax.grid(True, alpha=0.3)
        handles = [plt.Line2D([], [], color=colour[e], marker="o" if kind == "throughput" else "s",
                              linestyle="-" if kind == "throughput" else "", label=e) for e in all_engines]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(all_engines), 5), fontsize=8, frameon=False)
        fig.suptitle(f"fastmvit {kind} | {title}", fontsize=10)
        fig.tight_layout(rect=(0, legend_in / height, 1, 1))
        path = out_dir / f"{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths, ""


def write_report(run: Run, out_dir, plots: bool = True) -> Dict[str, object]:
    """report.md (and the plots beside it) in ``out_dir``; returns the paths and any note."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, note = render_plots(run, out_dir) if plots else ([], "plots not asked for")
    md = out_dir / "report.md"
    md.write_text(render_markdown(run, [str(p) for p in paths]))
    return {"markdown": md, "plots": paths, "note": note}
