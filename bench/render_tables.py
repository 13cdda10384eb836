"""Render the numbers of README.md and docs/*.md from bench/results/*.json: one source for
each published number.

A generated section sits between two markers, on their own lines (a table, a list) or
inside a sentence::

    <!-- BEGIN hutchtrace-generated: probing-table -->
    ...rendered; never edited by hand...
    <!-- END hutchtrace-generated: probing-table -->

    auto needed <!-- BEGIN hutchtrace-generated: x -->2.5-27x<!-- END hutchtrace-generated: x --> fewer rows

    python bench/render_tables.py            # rewrite every generated section
    python bench/render_tables.py --check    # exit 1 if a section is stale (CI runs this)
    python bench/render_tables.py --list     # the sections, and the results file each reads
    python bench/render_tables.py --results /tmp/hutchtrace-bench --print all   # preview a run

Rules the sections follow: a time to the target is a measured run that reached it, or a
projection labelled with its factor, never beyond 10x (``models.MAX_PROJECTION``); ratios
are medians over interleaved rounds with their spread and the number of rounds; a target is
met, not met, or inside the noise. Results files written by older versions of the benchmarks
(no per-round spread, or extrapolations beyond 10x) are rendered by the same rules, and
labelled as such.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_PROJECTION = 10.0
MARK = re.compile(r"<!-- BEGIN hutchtrace-generated: ([\w-]+) -->(.*?)<!-- END hutchtrace-generated: \1 -->", re.S)


class MissingResults(Exception):
    pass


def results(name: str) -> dict:
    p = RESULTS / name
    if not p.exists():
        raise MissingResults(name)
    return json.loads(p.read_text())


def optional(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


# ------------------------------------------------------------------------------ formatting
def num(x: float, digits: int = 3) -> str:
    """``digits`` significant digits; from 100 on an integer, grouped by thin spaces from 10^4."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "∞" if x == math.inf else "-"
    if x != 0 and abs(x) >= 100:
        r = round(x, -int(math.floor(math.log10(abs(x)))) + digits - 1)
        txt = f"{r:,.0f}"
        return txt.replace(",", " ") if abs(r) >= 1e4 else txt.replace(",", "")
    return f"{x:.{digits}g}"


def count(n: int) -> str:
    """An exact integer, grouped by thin spaces from 10^4."""
    return f"{int(n):,}".replace(",", " ") if abs(n) >= 1e4 else str(int(n))


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def spread(values) -> dict:
    v = sorted(float(x) for x in values)
    q1, q3 = (statistics.quantiles(v, n=4, method="inclusive")[::2] if len(v) >= 2 else (v[0], v[0]))
    return {"median": statistics.median(v), "q1": q1, "q3": q3, "min": v[0], "max": v[-1], "n": len(v)}


def band(sp: dict) -> tuple[float, float]:
    """Interquartile range with 5 rounds or more, else the full range (as ``models.noise_band``)."""
    return (sp["q1"], sp["q3"]) if sp["n"] >= 5 else (sp["min"], sp["max"])


def fmt_band(sp: dict, unit: str = "x", digits: int = 3) -> str:
    lo, hi = band(sp)
    what = "IQR" if sp["n"] >= 5 else "range"
    if sp["n"] == 1:
        return f"{num(sp['median'], digits)}{unit} (1 round)"
    return f"{num(sp['median'], digits)}{unit} [{num(lo, digits)}-{num(hi, digits)}, {what} of {sp['n']} rounds]"


def verdict(sp: dict, threshold: float, want: str = "below") -> str:
    lo, hi = band(sp)
    if want == "below":
        return "met" if hi <= threshold else ("not met" if lo > threshold else "inside the noise")
    return "met" if lo >= threshold else ("not met" if hi < threshold else "inside the noise")


def loaded_note(d: dict) -> str:
    return " **(measured under load)**" if d.get("loaded") else ""


# ------------------------------------------------------------------------------ runs to a target
def run_view(x: dict) -> dict:
    """One run to the target, in either results format: status, projection factor, time and
    rows (None when not reached), and the measured time and rows."""
    mrows = x.get("measured_rows", x.get("rows"))
    msec = x.get("measured_seconds", x.get("seconds"))
    if x.get("converged", False) or x.get("K") == 0:
        factor = 1.0
    elif "factor" in x:
        factor = x["factor"]
    else:  # older format: "rows" already scaled by the (unbounded) extrapolation
        factor = max(1.0, x["rows"] / mrows) if mrows else 1.0
    status = "reached" if factor == 1.0 else ("projected" if factor <= MAX_PROJECTION else "not reached")
    ok = status != "not reached"
    return {"status": status, "factor": factor, "seconds": msec * factor if ok else None,
            "rows": mrows * factor if ok else None, "measured_seconds": msec, "measured_rows": mrows}


def method_view(runs: list[dict]) -> dict:
    views = [run_view(x) for x in runs]
    order = {"reached": 0, "projected": 1, "not reached": 2}
    status = max((v["status"] for v in views), key=order.get)
    out = {"status": status, "factor": max(v["factor"] for v in views), "rounds": len(views), "views": views,
           "measured_seconds_min": min(v["measured_seconds"] for v in views),
           "measured_rows_min": min(v["measured_rows"] for v in views)}
    if status != "not reached":
        out["seconds"] = spread([v["seconds"] for v in views])
        out["rows"] = spread([v["rows"] for v in views])
    return out


def fmt_time(m: dict) -> str:
    if m["status"] == "not reached":
        return f"not reached (> {num(m['measured_seconds_min'])} s)"
    s = m["seconds"]
    txt = f"{num(s['median'])} s" if s["n"] == 1 or s["min"] == s["max"] else \
        f"{num(s['median'])} s [{num(s['min'])}-{num(s['max'])}]"
    return txt + (f" (projected x{m['factor']:.1f})" if m["status"] == "projected" else "")


def fmt_rows(m: dict) -> str:
    if m["status"] == "not reached":
        return f"> {num(m['measured_rows_min'])}"
    r = m["rows"]["median"]
    return num(r) + ("*" if m["status"] == "projected" else "")


def round_ratio(num_runs: list[dict], den_runs: list[dict]) -> dict | None:
    a, b = [run_view(x) for x in num_runs], [run_view(x) for x in den_runs]
    if len(a) != len(b) or any(v["seconds"] is None for v in a + b):
        return None
    sp = spread([x["seconds"] / y["seconds"] for x, y in zip(a, b)])
    sp["factor"] = max(v["factor"] for v in a + b)
    return sp


def fmt_ratio(sp: dict | None) -> str:
    if sp is None:
        return "- (a run did not reach the target)"
    txt = f"{num(sp['median'])}x" if sp["n"] == 1 else f"{num(sp['median'])}x [{num(sp['min'])}-{num(sp['max'])}]"
    return txt + (f" (projected x{sp['factor']:.1f})" if sp["factor"] > 1 else "")


# ------------------------------------------------------------------------------ provenance
def provenance_line(d: dict, source: str) -> str:
    env = d.get("environment", {})
    load = d.get("load")
    if load:
        ld = f"load average {num(load['start'], 2)} at the start, {num(load['end'], 2)} at the end " \
             f"({load['cores']} cores)"
    elif env.get("loadavg"):
        ld = f"load average {num(env['loadavg'][0], 2)} when written (start not recorded)"
    else:
        ld = "load not recorded"
    return (f"`{source}`, commit `{env.get('commit', '?')[:10]}`, torch {env.get('torch', '?')}, "
            f"{env.get('threads', '?')} thread(s), {ld}{loaded_note(d)}")


SOURCES = {
    "cpu_overhead.json": "bench/bench_overhead.py", "cpu_memory.json": "bench/bench_memory.py",
    "cpu_probing.json": "bench/bench_probing.py", "cpu_peers.json": "bench/bench_peers.py",
    "cpu_auto_seeds.json": "bench/auto_seeds.py", "cpu_curvature.json": "bench/bench_curvature.py",
    "cpu_local_hessian.json": "bench/bench_local_hessian.py", "probing_study.json": "examples/probing_study.py",
    "cpu_overhead_before.json": "bench/bench_overhead.py (engine before issue 9)",
    "cpu_cusum_arl0.json": "bench/cusum_arl0.py",
    "probing_scale.json": "bench/probing_scale.py", "weight_sharing.json": "examples/weight_sharing.py",
    "cpu_kernels.json": "bench/bench_kernels.py (pytest-benchmark --benchmark-json)", "memorisation.json": "examples/memorisation_experiment.py",
}


def s_results_provenance() -> str:
    rows = []
    for f, src in SOURCES.items():
        d = optional(f)
        if d is None:
            rows.append([f"`{f}`", f"`{src}`", "not generated yet"])
            continue
        if "commit_info" in d:  # a pytest-benchmark JSON
            ci = d["commit_info"]
            rows.append([f"`{f}`", f"`{src}`", f"commit `{str(ci.get('id', 'not recorded'))[:10]}`"
                         f"{' (dirty tree)' if ci.get('dirty') else ''}, {d.get('datetime', 'date not recorded')[:19]}, "
                         "load not recorded"])
            continue
        env = d.get("environment", {})
        load = d.get("load")
        if load:
            ld = f"load average {num(load['start'], 2)} at the start, {num(load['end'], 2)} at the end, " \
                 f"{load['cores']} cores" + (" (**measured under load**)" if d.get("loaded") else "")
        elif env.get("loadavg"):
            ld = f"load average {num(env['loadavg'][0], 2)} when written (start not recorded)"
        else:
            ld = "load not recorded"
        if not env:
            what = "no environment recorded (exact computations and HVP rows: load-independent)"
        else:
            what = (f"commit `{str(env.get('commit', 'not recorded'))[:10]}`, {env.get('date', 'date not recorded')}, "
                    f"{ld}" + ("; a simulation, load-independent" if f == "cpu_cusum_arl0.json" else ""))
        rows.append([f"`{f}`", f"`{src}`", what])
    return table(["results file", "generated by", "provenance"], rows)


# ------------------------------------------------------------------------------ overhead
def _overhead_cases():
    d = results("cpu_overhead.json")
    legacy = [x for x in (optional("cpu_overhead_run1.json"),) if x]
    return d, legacy


def _overhead_cell(d, legacy, key, v):
    r = d["cases"][key]
    if "per_probe_ratio_spread" in r:
        sp = r["per_probe_ratio_spread"][v]
        return fmt_band(sp), r["verdict_5pct"][v]
    vals = [r["per_probe_ratio"][v]] + [x["cases"][key]["per_probe_ratio"][v] for x in legacy if key in x["cases"]]
    lo, hi = min(vals), max(vals)
    txt = f"{lo:.2f}-{hi:.2f}x ({len(vals)} runs, ratio of medians each)" if len(vals) > 1 else f"{lo:.2f}x (1 run)"
    st = "met" if hi <= 1.05 else ("not met" if lo > 1.05 else "inside the noise (the runs disagree)")
    return txt, st


def s_overhead_table() -> str:
    d, legacy = _overhead_cases()
    before = optional("cpu_overhead_before.json")
    rows = []
    for key, r in d["cases"].items():
        row = [r["model"], r["backbone"], num(r["bare_per_probe_ms"], 2)]
        for v in ("sample", "pairwise"):
            txt, st = _overhead_cell(d, legacy, key, v)
            b = before["cases"][key]["per_probe_ratio"][v] if before and key in before["cases"] else None
            row += [f"{b:.2f}x" if b is not None else "-", txt, st]
        rows.append(row)
    head = ["model", "backbone", "bare HVP ms / probe",
            "sample: before", "sample: now", "<= 1.05", "pairwise: before", "pairwise: now", "<= 1.05"]
    rounds = {r.get("rounds") for r in d["cases"].values()}
    note = (f"\n\nNow: {provenance_line(d, 'bench/bench_overhead.py')}"
            + (f"; also `cpu_overhead_run1.json` (an earlier run of the same code)" if legacy and
               "per_probe_ratio_spread" not in next(iter(d["cases"].values())) else "")
            + (f". Before: {provenance_line(before, 'bench/bench_overhead.py')}, the engine before the changes below"
               if before else "") + ".")
    if "per_probe_ratio_spread" not in next(iter(d["cases"].values())):
        note += (f" These results predate the per-round spread: each run gives one ratio of medians over "
                 f"{', '.join(map(str, rounds))} rounds, and the range is over runs.")
    return table(head, rows) + note


def s_overhead_summary() -> str:
    d, legacy = _overhead_cases()
    rows = []
    for key, r in d["cases"].items():
        if r["backbone"] != "reverse":
            continue
        cells = [_overhead_cell(d, legacy, key, v) for v in ("sample", "pairwise")]
        rows.append([f"{r['model']} ({num(r['P'] / 1000, 3)}k)", f"{num(r['bare_per_probe_ms'], 2)} ms",
                     f"{cells[0][0]}: {cells[0][1]}", f"{cells[1][0]}: {cells[1][1]}"])
    return table(["model (P)", "bare HVP", '`variance="sample"`: per-probe ratio, <= 1.05?',
                  '`variance="pairwise"` (default)'], rows) + f"\n\n{provenance_line(d, 'bench/bench_overhead.py')}."


def s_overhead_noise() -> str:
    """How much the bare HVP's own time moved: within a run (new format) or between runs."""
    d, legacy = _overhead_cases()
    first = next(iter(d["cases"].values()))
    if "times_per_round_s" in first:
        def rel(r):  # the whole bare loop of K HVPs, slowest round over fastest
            t = r["times_per_round_s"]["bare@K"]
            return max(t) / min(t)
        key, r = max(d["cases"].items(), key=lambda kv: rel(kv[1]))
        t = r["times_per_round_s"]["bare@K"]
        return (f"the bare loop of {r['K']} HVPs itself took up to {num(100 * (rel(r) - 1), 2)} % longer in its "
                f"slowest round than in its fastest, within one run ({key}: {num(1e3 * min(t), 3)}-"
                f"{num(1e3 * max(t), 3)} ms over {len(t)} rounds)")
    if not legacy:
        return "the run-to-run noise of this machine was not measured"
    pairs = [(k, r["bare_per_probe_ms"], legacy[0]["cases"][k]["bare_per_probe_ms"]) for k, r in d["cases"].items()
             if k in legacy[0]["cases"]]
    k, a, b = max(pairs, key=lambda t: max(t[1], t[2]) / min(t[1], t[2]))
    return (f"the bare HVP's own time per probe differed by up to {num(100 * (max(a, b) / min(a, b) - 1), 2)} % "
            f"between two runs of the same code ({k}: {num(min(a, b), 3)} vs {num(max(a, b), 3)} ms)")


# ------------------------------------------------------------------------------ memory
def s_memory_table() -> str:
    d = results("cpu_memory.json")
    rows = [[name, f"{r['hvp_bytes'] / 2**20:.1f} MiB", f"{r['ratio']['sequential, sample']:.2f}x",
             f"{r['ratio']['sequential, pairwise']:.2f}x", f"{r['ratio']['default']:.2f}x"]
            for name, r in d["cases"].items()]
    return table(["model", "one HVP", 'sequential, `variance="sample"`', 'sequential, `variance="pairwise"`',
                  "all defaults"], rows) + f"\n\n{provenance_line(d, 'bench/bench_memory.py')}."


def s_memory_summary() -> str:
    d = results("cpu_memory.json")
    s = [r["ratio"]["sequential, sample"] for r in d["cases"].values()]
    p = [r["ratio"]["sequential, pairwise"] for r in d["cases"].values()]
    return (f'{min(s):.2f}-{max(s):.2f}x one HVP with the default `variance="auto"`, which is the sample variance '
            f'in this mode; an explicit `variance="pairwise"` keeps a round of 16 products and probes '
            f"({min(p):.2f}-{max(p):.2f}x)")


# ------------------------------------------------------------------------------ probing
SCHEMES = ("global", "isolated", "colored", "auto")


def _probing():
    d = results("cpu_probing.json")
    out = {}
    for name, r in d["cases"].items():
        m = {s: method_view(r["schemes"][s]["runs"]) for s in SCHEMES}
        runs = {s: r["schemes"][s]["runs"] for s in SCHEMES}
        timed = [s for s in ("global", "isolated", "colored") if "seconds" in m[s]]
        best = min(timed, key=lambda s: m[s]["seconds"]["median"]) if timed else None
        g_over_auto = round_ratio(runs["global"], runs["auto"])
        a_over_best = round_ratio(runs["auto"], runs[best]) if best else None
        out[name] = {"r": r, "m": m, "best": best, "global_over_auto": g_over_auto, "auto_over_best": a_over_best,
                     "plans": {s: (r["schemes"][s].get("final_plan"), r["schemes"][s].get("groups")) for s in SCHEMES}}
    return d, out


def _faster(sp: dict | None) -> str:
    return f"{fmt_ratio(sp)} faster" if sp else "not measured (a run did not reach the target within 10x)"


def _probing_targets(name, x):
    r = x["r"]
    g, b = x["global_over_auto"], x["auto_over_best"]
    t10 = "n/a (weakly coupled)" if not r["coupled"] else (verdict(g, 10, "above") if g else "unknown")
    t12 = verdict(b, 1.2, "below") if b else "unknown"
    return t10, t12


def s_probing_table() -> str:
    d, cases = _probing()
    parts = []
    for name, x in cases.items():
        r, m = x["r"], x["m"]
        rows = []
        for s in SCHEMES:
            plan, groups = x["plans"][s]
            rows.append([s, fmt_time(m[s]), fmt_rows(m[s]), f"{plan} ({groups} groups)" if plan == "colored" else plan,
                         fmt_ratio(round_ratio(r["schemes"]["global"]["runs"], r["schemes"][s]["runs"]))
                         if s != "global" else "1"])
        t10, t12 = _probing_targets(name, x)
        title = f"{r['model']}; " if r.get("model") else ""
        parts.append(f"**{name}**: {title}P = {count(r['P'])}, L = {r['L']}, largest variance inflation of global "
                     f"probing {num(r['inflation'])}x ({'coupled' if r['coupled'] else 'weakly coupled'}); "
                     f"{m['auto']['rounds']} rounds (seeds)\n\n"
                     + table(["scheme", "time to target, median [range]", "HVP rows (median)", "final plan",
                              "global / scheme, per round"], rows)
                     + f"\n\n`auto` vs `global`: {_faster(x['global_over_auto'])} (target >= 10x: {t10}); "
                       f"`auto` / best fixed scheme ({x['best']}): {fmt_ratio(x['auto_over_best'])} "
                       f"(target <= 1.2: {t12}).")
    return ("\n\n".join(parts) + f"\n\n\\* projected: the run stopped at its probe cap and its time and rows are "
            f"scaled by the factor shown (at most {MAX_PROJECTION:.0f}x). "
            f"{provenance_line(d, 'bench/bench_probing.py')}.")


def s_probing_summary() -> str:
    d, cases = _probing()
    rows = []
    for name, x in cases.items():
        r, m = x["r"], x["m"]
        rows.append([f"{name} (L = {r['L']})"] + [fmt_time(m[s]) for s in SCHEMES] + [fmt_ratio(x["global_over_auto"])])
    models = "; ".join(f"{name}: {x['r']['model']}" if x["r"].get("model") else
                       f"{name}: P = {count(x['r']['P'])}, L = {x['r']['L']}" for name, x in cases.items())
    return (table(["model", "global", "isolated", "colored", "auto", "auto vs global, per round"], rows)
            + f"\n\nMedians over {', '.join(sorted({str(x['m']['auto']['rounds']) for x in cases.values()}))} "
              f"rounds (seeds) with the range. Models: {models}. {provenance_line(d, 'bench/bench_probing.py')}.")


def s_auto_seeds_table() -> str:
    d = results("cpu_auto_seeds.json")
    rows = []
    for name, per in d["cases"].items():
        cells = []
        for label in ("isolated", "auto, pilot_K=8", "auto, pilot_K=16"):
            v = per[label]
            cells.append(f"{num(statistics.median(v))} / {num(statistics.mean(v))} / {num(max(v))}")
        iso, auto = per["isolated"], per["auto, pilot_K=8"]
        fewer = sum(a < i for a, i in zip(auto, iso))
        rows.append([f"{name} ({len(iso)})"] + cells + [f"{fewer} of {len(iso)}"])
    return table(["model (seeds)", "`isolated` median / mean / max", "`auto`, `pilot_K=8` (default)",
                  "`auto`, `pilot_K=16`", "seeds where `auto` (default) needs fewer rows than `isolated`"], rows) + \
        f"\n\n{provenance_line(d, 'bench/auto_seeds.py')}; HVP rows do not depend on the load."


# ------------------------------------------------------------------------------ peers
PEER_NAMES = {"pyhessian": "PyHessian", "curvlinops": "curvlinops", "eigenthings": "hessian-eigenthings",
              "backpack": "BackPACK"}


def _peers():
    d = results("cpu_peers.json")
    out = {}
    for name, r in d["cases"].items():
        if "methods" in r:
            methods = r["methods"]
            runs = {k: v["runs"] for k, v in methods.items() if "runs" in v}
        else:  # older format: one run per method
            methods = {k: v for k, v in r["runs"].items()}
            runs = {k: [v] for k, v in r["runs"].items() if "error" not in v}
        views = {k: method_view(v) for k, v in runs.items()}
        peers = [k for k in views if not k.startswith("hutchtrace") and "seconds" in views[k]]
        fastest = min(peers, key=lambda k: views[k]["seconds"]["median"]) if peers else None
        speed = round_ratio(runs[fastest], runs["hutchtrace auto"]) if fastest else None
        errors = {k: v["error"] for k, v in methods.items() if "error" in v}
        ran = any(not k.startswith("hutchtrace") for k in views)
        out[name] = {"r": r, "views": views, "fastest": fastest, "speedup": speed, "errors": errors, "ran": ran}
    return d, out


def _peer_label(method: str, versions: dict) -> str:
    peer, _, scheme = method.partition(" ")
    if peer == "hutchtrace":
        return f"hutchtrace `{scheme}`"
    v = versions.get(peer)
    return f"{PEER_NAMES.get(peer, peer)}{' ' + v if v else ''}" + (f" ({scheme})" if scheme else "")


def s_peers_table() -> str:
    d, cases = _peers()
    names = list(cases)
    methods = []
    for x in cases.values():
        for k in list(x["views"]) + list(x["errors"]):
            if k not in methods:
                methods.append(k)
    # an error recorded for a whole peer ("curvlinops") shows in that peer's scheme rows
    methods = [k for k in methods if " " in k or not any(m.startswith(k + " ") for m in methods)]
    versions = next((x["r"].get("versions") for x in cases.values() if x["r"].get("versions")), {}) or {}
    rows = []
    for k in methods:
        row = [_peer_label(k, versions)]
        for name in names:
            x = cases[name]
            if k in x["views"]:
                row.append(f"{fmt_time(x['views'][k])}, {fmt_rows(x['views'][k])} rows")
            else:
                err = x["errors"].get(k) or x["errors"].get(k.split(" ")[0])
                row.append(_short_error(err) if err else "-")
        rows.append(row)
    rows.append(["**fastest peer / hutchtrace `auto`, per round**"]
                + [f"{fmt_ratio(cases[n]['speedup'])} (vs {_peer_label(cases[n]['fastest'], versions)})"
                   if cases[n]["fastest"] else ("no peer reached the target within 10x" if cases[n]["ran"]
                                                else "no peer ran") for n in names])
    rounds = sorted({str(v["rounds"]) for x in cases.values() for v in x["views"].values()})
    return (table(["method"] + names, rows)
            + f"\n\nTime to target: median [range]; rounds (seeds) per method: {', '.join(rounds)}; * rows projected (factor as shown, "
              f"at most {MAX_PROJECTION:.0f}x). {provenance_line(d, 'bench/bench_peers.py')}.")


def _short_error(err: str) -> str:
    if "wrong Hessian-vector products" in err:
        m = re.search(r"relative error ([0-9.eE+-]+)", err)
        return f"wrong products (relative error {m.group(1)}), not timed" if m else "wrong products, not timed"
    if "not installed" in err:
        return "not installed"
    if "nn.Sequential" in err or "unsupported" in err:
        return "unsupported model"
    return err[:60]


def s_peers_summary() -> str:
    d, cases = _peers()
    versions = next((x["r"].get("versions") for x in cases.values() if x["r"].get("versions")), {}) or {}
    names = list(cases)
    auto = ["hutchtrace `auto`"] + [fmt_time(cases[n]["views"]["hutchtrace auto"]) for n in names]
    fastest = ["fastest peer"] + [f"{_peer_label(cases[n]['fastest'], versions)}: {fmt_time(cases[n]['views'][cases[n]['fastest']])}"
                                  if cases[n]["fastest"] else "none reached the target within 10x" for n in names]
    speed = ["speed-up, per round"] + [fmt_ratio(cases[n]["speedup"]) for n in names]
    return table([""] + names, [auto, fastest, speed]) + f"\n\n{provenance_line(d, 'bench/bench_peers.py')}."


# ------------------------------------------------------------------------------ targets
def s_targets() -> str:
    rows = []
    ov, legacy = _overhead_cases()
    counts = {}
    for key in ov["cases"]:
        for v in ("sample", "pairwise"):
            _, st = _overhead_cell(ov, legacy, key, v)
            counts.setdefault(v, {}).setdefault(st.split(" (")[0], []).append(key)
    for v, c in counts.items():
        rows.append([f"`block_traces` per-probe overhead <= 5 % on CPU (`variance=\"{v}\"`)",
                     "; ".join(f"{st}: {len(ks)} of {sum(len(x) for x in c.values())} model/backbone cases"
                               for st, ks in sorted(c.items()))])
    mem = results("cpu_memory.json")
    s = [r["ratio"]["sequential, sample"] for r in mem["cases"].values()]
    rows.append(["memory <= 1.2x one HVP, sequential mode (default variance)",
                 f"{'met' if max(s) <= 1.2 else 'not met'} ({min(s):.2f}-{max(s):.2f}x)"])
    _, pcases = _probing()
    t10, t12 = [], []
    for name, x in pcases.items():
        a, b = _probing_targets(name, x)
        t10.append(f"{name}: {a}" + (f" ({fmt_ratio(x['global_over_auto'])})" if x["global_over_auto"] else
                                     " (global did not reach the target within 10x of its run)"))
        t12.append(f"{name}: {b}" + (f" ({fmt_ratio(x['auto_over_best'])}, best: {x['best']})" if x["auto_over_best"]
                                     else " (a run did not reach the target within 10x)"))
    rows.append(["`probing=\"auto\"` >= 10x faster than `global` on coupled models", "; ".join(t10)])
    rows.append(["`auto` at most 20 % slower than the best fixed scheme", "; ".join(t12)])
    _, ecases = _peers()
    t3 = []
    for name, x in ecases.items():
        if x["fastest"] is None:
            t3.append(f"{name}: " + ("unknown (no peer reached the target within 10x)" if x["ran"] else "no peer ran"))
        elif x["speedup"] is None:
            t3.append(f"{name}: unknown (a run did not reach the target)")
        else:
            t3.append(f"{name}: {verdict(x['speedup'], 3.0, 'above')} ({fmt_ratio(x['speedup'])})")
    rows.append([">= 3x faster than the fastest peer", "; ".join(t3)])
    return table(["target", "result"], rows) + (
        "\n\n'inside the noise': the interquartile range (5 rounds or more) or the range over rounds or runs "
        "straddles the threshold.")


# ------------------------------------------------------------------------------ probing study (exact)
def _study():
    return results("probing_study.json")


def s_study_summary() -> str:
    d = _study()
    rows = []
    for s in d["studies"]:
        infl = [b["inflation"] for b in s["blocks"] if b["var_isolated"] > 0 and math.isfinite(b["inflation"])]
        runs = s["runs"]
        g, i, a = (runs[k]["hvp_rows"] for k in ("global", "isolated", "auto"))
        rows.append([s["model"], count(s["P"]), s["L"], f"{num(min(infl))}x - {num(max(infl))}x",
                     f"{count(g)} / {count(i)} / **{count(a)}**", f"{num(g / a, 2)}x fewer"])
    return table(["model (exact Hessian, float64)", "P", "blocks", "variance inflation of global probing, per block",
                  "HVP rows to 5 % SE on every block: global / isolated / **auto**", "auto vs global"], rows)


def s_study_inflation_range() -> str:
    d = _study()
    infl = [b["inflation"] for s in d["studies"] for b in s["blocks"]
            if b["var_isolated"] > 0 and math.isfinite(b["inflation"])]
    return f"{num(min(infl), 2)}-{num(max(infl), 2)}×"


def s_study_blocks() -> str:
    """Per model: the blocks global probing hurts most and least (no general rule: the
    ranking is the model's)."""
    d = _study()
    lines = []
    for s in d["studies"]:
        bl = [b for b in s["blocks"] if b["var_isolated"] > 0 and math.isfinite(b["inflation"])]
        bl.sort(key=lambda b: b["inflation"], reverse=True)
        need = sorted(bl, key=lambda b: b["K_global"], reverse=True)

        def desc(b):
            return (f"`{b['block']}` ({b['numel']} entries, {num(b['inflation'], 3)}x: "
                    f"{num(math.ceil(b['K_global']))} global vs {num(math.ceil(b['K_isolated']))} isolated probes)")
        most = f"most global probes needed: {desc(need[0])}" if need[0] not in bl[:2] else \
            f"`{need[0]['block']}` needs the most global probes"
        lines.append(f"* {s['model']}: most inflated {desc(bl[0])} and {desc(bl[1])}; least inflated "
                     f"{desc(bl[-1])}; {most}.")
    return "\n".join(lines)


def s_study_kstar() -> str:
    d = _study()
    ks = d["kstar"]
    head = ["block"] + [k["block"] for k in ks]

    def cell(k):
        lo, hi = k["ci"]
        if not math.isfinite(k["k_star"]):
            return f"≥ {num(lo, 2)}"
        return f"{num(k['k_star'], 2)} [{num(lo, 2)}, {num(hi, 2) if math.isfinite(hi) else '∞'}]"
    return table(head, [["K*"] + [cell(k) for k in ks]])


def s_study_auto_vs_global() -> str:
    d = _study()
    r = [s["runs"]["global"]["hvp_rows"] / s["runs"]["auto"]["hvp_rows"] for s in d["studies"]]
    return f"{num(min(r), 2)}-{num(max(r), 2)}×"


# ------------------------------------------------------------------------------ curvature
CURV_ROWS = [("block_traces", "`block_traces` (1 HVP + its statistics)"), ("hvp_loop", "bare HVP loop"),
             ("ggn_loop", "bare GGN-vp loop"), ("block_traces_ggn", '`block_traces(curvature="ggn")`'),
             ("decompose", "**`decompose`** (HVP + GGN-vp)"),
             ("coupling_block", '**`block_coupling(mode="block")`**, per probe index (L products)'),
             ("coupling_block_per_product", "... per product"),
             ("coupling_rowsum", '**`block_coupling(mode="rowsum")`**'),
             ("coupling_ustat", '**`block_coupling(mode="ustat")`**')]


def s_curvature_table() -> str:
    new = optional("cpu_curvature.json")
    if new:
        cases = new["cases"]
        rows = []
        for key, label in CURV_ROWS:
            row = [label]
            for c in ("mlp", "resnet"):
                for ref in ("ratio_vs_block_traces", "ratio_vs_hvp_loop"):
                    sp = cases[c][ref][key]
                    lo, hi = band(sp)
                    row.append(f"{sp['median']:.2f} [{lo:.2f}-{hi:.2f}]")
            rows.append(row)
        ab = "; ".join(f"{c}: `block_traces` {num(1e3 * cases[c]['per_probe_s']['block_traces']['median'])} ms, "
                       f"bare HVP {num(1e3 * cases[c]['per_probe_s']['hvp_loop']['median'])} ms per probe"
                       for c in ("mlp", "resnet"))
        rounds = cases["mlp"]["rounds"]
        note = (f"Median [interquartile range] of per-round ratios over {rounds} interleaved rounds. Absolute "
                f"(medians): {ab}. {provenance_line(new, 'bench/bench_curvature.py')}.")
    else:
        d = results("curvature_ratios.json")
        cases = d["cases"]
        rows = [[label] + [f"{cases[c][ref][key]:.2f}" for c in ("mlp", "resnet")
                           for ref in ("ratios_vs_block_traces", "ratios_vs_hvp_loop")] for key, label in CURV_ROWS]
        ab = "; ".join(f"{c}: `block_traces` {num(1e3 * cases[c]['per_probe_s_block_traces'])} ms, "
                       f"bare HVP {num(1e3 * cases[c]['per_probe_s_hvp_loop'])} ms per probe" for c in ("mlp", "resnet"))
        note = (f"**Legacy results** (`bench/results/curvature_ratios.json`: one run, no spread, no environment "
                f"recorded; written before `block_traces`' per-probe statistics were optimised, see "
                f"[performance](performance.md)): regenerate with `python bench/run_cpu_suite.py --publish --suites "
                f"curvature`. Absolute: {ab}.")
    return table(["per probe", "MLP vs `block_traces`", "MLP vs HVP loop", "ResNet vs `block_traces`",
                  "ResNet vs HVP loop"], rows) + "\n\n" + note


# ------------------------------------------------------------------------------ local Hessian
def s_local_hessian_table() -> str:
    d = optional("cpu_local_hessian.json")
    if d is None:
        return ("*Not measured by the current benchmark yet*: `bench/bench_local_hessian.py` now writes "
                "`bench/results/cpu_local_hessian.json`; run `python bench/run_cpu_suite.py --publish --suites "
                "local_hessian`.")
    rows = []
    for r in d["cases"].values():
        for m, sp in r["ratio_over_closed_form"].items():
            sec = r["seconds"][m]
            rows.append([r["case"], m, f"{num(r['seconds']['closed_form']['median'])} s "
                         f"({r['seconds']['closed_form']['n']} rounds)", f"{num(sec['median'])} s ({sec['n']} rounds)",
                         f"**{num(sp['median'])}x** [{num(sp['min'])}-{num(sp['max'])}]"])
    return table(["case (1 thread)", "dense path", "closed form", "dense path time", "dense / closed form, per round"],
                 rows) + f"\n\n{provenance_line(d, 'bench/bench_local_hessian.py')}."


def s_local_hessian_speedup() -> str:
    d = optional("cpu_local_hessian.json")
    if d is None:
        return "timings: docs/local_hessian.md"
    sp = d["cases"]["256"]["ratio_over_closed_form"]["generic"]
    return f"{num(sp['median'])}× faster than the generic torch.func path on a 256×256 Linear+tanh layer"



# ------------------------------------------------------------------------------ monitor
def clopper_pearson(x: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval (by bisection on the binomial tails)."""
    a = (1 - level) / 2

    def tail_ge(p):  # P(X >= x)
        return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(x, n + 1))

    def tail_le(p):  # P(X <= x)
        return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(0, x + 1))

    def solve(f, target, increasing):
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if (f(mid) < target) == increasing:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2
    low = 0.0 if x == 0 else solve(tail_ge, a, True)
    high = 1.0 if x == n else solve(tail_le, a, False)
    return low, high


SEED_PAPER = {"power": "179/180 = 0.994", "false alarms": "16/120 = 0.133"}  # quoted from the seed paper


def _memo():
    d = results("memorisation.json")
    prim = d["primary"]
    clean = prim["0"]["summary"] if "0" in prim else prim["0.0"]["summary"]
    arms = sorted((k for k in prim if float(k) > 0), key=float, reverse=True)
    return d, clean, [(k, prim[k]["summary"]) for k in arms]


def s_memorisation_table() -> str:
    d, clean, arms = _memo()

    def rate(sm):
        lo, hi = clopper_pearson(sm["alarmed"], sm["n"])
        return f"{sm['alarmed']}/{sm['n']} = {sm['rate']:.2f} (95 % CI {lo:.2f}-{hi:.2f})"
    power = "; ".join(f"{100 * float(k):.0f} % random labels: {rate(sm)}" for k, sm in arms)
    delay = "; ".join(f"{100 * float(k):.0f} %: {sm['delay_median']:.0f} [{sm['delay_q25']:.0f}, "
                      f"{sm['delay_q75']:.0f}] steps" for k, sm in arms)
    memo = max(sm["memorised_at_alarm_median"] for _, sm in arms)
    m = re.search(r"MLP [\d-]+", d["protocol"]["task"])
    task = d["protocol"]["task"].split(",")[0] + (f", {m.group(0)}" if m else "")
    rows = [["detection power", power, SEED_PAPER["power"]],
            ["false-alarm rate", rate(clean), SEED_PAPER["false alarms"]],
            ["first alarm − memorisation onset, median [IQR]",
             delay + f" (negative: the alarm comes first; at most {100 * memo:.1f} % of the mislabeled examples "
                     "memorised at the median alarm)", "–"]]
    return table(["", f"hutchtrace, {task}", "seed paper, ResNet-18/34 + VGG-11 on CIFAR-10/100 (quoted)"], rows)


def s_memorisation_goal() -> str:
    _, clean, arms = _memo()
    ok = all(sm["rate"] >= 0.95 for _, sm in arms) and clean["rate"] <= 0.05
    return "met" if ok else "not met"


def s_cusum_arl0_table() -> str:
    d = results("cpu_cusum_arl0.json")
    rows = []
    for label, c in d["cases"].items():
        txt = f"{c['mean']:.0f} ± {c['se']:.0f}" if not c.get("censored") else \
            f"≥ {c['mean']:.0f} ({c['censored']} of {c['paths']} series without an alarm after {count(c['tmax'])} steps)"
        rows.append([label, txt, f"{c['median']:.0f}"])
    paths = sorted({c["paths"] for c in d["cases"].values()})
    return table(["configuration", "mean run length ± Monte-Carlo se", "median"], rows) + (
        f"\n\nTarget ARL0 {d['target']}, `k = 0.5`, {', '.join(map(str, paths))} simulated series per configuration "
        f"(`bench/cusum_arl0.py`; simulation, so independent of the machine's load).")


def s_probing_scale_table() -> str:
    d = results("probing_scale.json")
    sys.path.insert(0, str(ROOT / "bench"))
    from probing_scale import markdown  # the benchmark's own rendering: one definition of the table

    return markdown(d["studies"]).split("\n", 2)[2].strip("\n")  # without its heading


def s_probing_scale_summary() -> str:
    d = results("probing_scale.json")
    ratios = [s["auto_rows_mean"] / min(s["global_rows"], s["isolated_rows"]) for s in d["studies"]]
    share = [100 * s["pilot_share_mean"] for s in d["studies"]]
    Ls = [s["L"] for s in d["studies"]]
    return (f"at L = {min(Ls)}-{max(Ls)} blocks `auto` reached the target in {min(ratios):.2f}-{max(ratios):.2f}× "
            f"the HVP rows of the better of exact `global` and exact `isolated`, its pilot "
            f"{min(share):.1f}-{max(share):.1f} % of them")


def s_weight_sharing_table() -> str:
    d = results("weight_sharing.json")

    def signed(x):
        return f"{x:+.3f}".replace("-", "−")
    rows = [[r["model"], r["tensor"], r["uses"], signed(r["true_exact"]), signed(r["unrolled_exact"]),
             signed(r["cross_exact"]),
             f"{r['true_est'][0]:.3f} ± {r['true_est'][1]:.3f}".replace("-", "−")] for r in d["rows"]]
    return table(["model", "tensor", "uses", "true trace", "unrolled (per-use) sum", "cross-use terms",
                  f"`unrolled_traces` estimate of the true trace (K = {d['rows'][0]['K']})"], rows)


def _kernel_times():
    """``{(group, implementation): min seconds}`` from pytest-benchmark's JSON of bench/bench_kernels.py."""
    d = results("cpu_kernels.json")
    out = {}
    for b in d["benchmarks"]:
        impl = b["name"][b["name"].index("[") + 1:-1].split("-")
        out[(b["group"], "-".join(x for x in impl if x in ("compiled", "reference", "foreach", "regen",
                                                            "explicit")))] = b["stats"]["min"]
    return d, out


def _x(r: float) -> str:
    return f"{num(r, 2) if r < 10 else f'{r:.0f}'}x"


def _ms(t: float) -> str:
    return f"{t * 1e6:.0f} µs" if t < 1e-3 else f"{num(t * 1e3, 2)} ms"


def s_kernels_table() -> str:
    d, t = _kernel_times()
    groups = {g for g, _ in t}
    P = max(int(float(g.split("P=")[1].split("-")[0])) for g in groups if "P=" in g)
    Ptag = next(g.split("P=")[1].split("-")[0] for g in groups if "P=" in g and int(float(g.split("P=")[1].split("-")[0])) == P)
    Ls = sorted({int(g.split("L=")[1]) for g in groups if g.startswith("block_dot-cpu") and f"P={Ptag}" in g})

    def row(label, group_of, impl, ref_impl):
        cells, ratios = [], []
        for L in Ls:
            g = group_of(L)
            cells.append(_ms(t[(g, impl)]) if (g, impl) in t else "")
            if ref_impl and (g, ref_impl) in t and (g, impl) in t:
                ratios.append(_x(t[(g, ref_impl)] / t[(g, impl)]))
        return [label, *cells, " / ".join(ratios)]
    bd = lambda L: f"block_dot-cpu-P={Ptag}-L={L}"  # noqa: E731
    rows = [row("`block_dot` (compiled)", bd, "compiled", None),
            row("`block_dot`: reference loop (ratio: reference / compiled)", bd, "reference", None),
            row("`block_dot`: `torch._foreach` (ratio: foreach / compiled)", bd, "foreach", None)]
    rows[1][-1] = " / ".join(_x(t[(bd(L), "reference")] / t[(bd(L), "compiled")]) for L in Ls)
    rows[2][-1] = " / ".join(_x(t[(bd(L), "foreach")] / t[(bd(L), "compiled")]) for L in Ls)
    for kind in ("rademacher", "gaussian"):
        rows.append(row(f"`block_dot_regen`, {kind.capitalize()} (ratio: reference / regen)",
                        lambda L, k=kind: f"block_dot_regen-{k}-cpu-P={Ptag}-L={L}", "compiled-regen", "reference"))
    fill = [t.get((f"probes-{k}-cpu-P={Ptag}", "compiled")) for k in ("rademacher", "gaussian")]
    fill_r = [t.get((f"probes-{k}-cpu-P={Ptag}", "reference")) for k in ("rademacher", "gaussian")]
    if all(fill) and all(fill_r):
        rows.append(["`fill_probes_` (P floats), Rademacher / Gaussian", f"{_ms(fill[0])} / {_ms(fill[1])}",
                     *[""] * (len(Ls) - 1), " / ".join(_x(r / c) for r, c in zip(fill_r, fill))])
    rows.append(row("`welford_update_` (8 rows; ratio: reference / compiled)", lambda L: f"welford_update-cpu-L={L}",
                    "compiled", "reference"))
    env = d.get("machine_info", {})
    cpu = env.get("cpu", {}).get("brand_raw", env.get("machine", "?"))
    return table(["op", *[f"L = {L}" for L in Ls], "ratio per L"], rows) + (
        f"\n\nP = {P:.0e} parameters in L equal tensors, float32 inputs, float64 accumulation; minimum over "
        f"rounds; `bench/results/cpu_kernels.json` (pytest-benchmark, {d.get('datetime', '?')[:19]}, {cpu}).")


def s_kernels_regen_vs_explicit() -> str:
    _, t = _kernel_times()
    groups = sorted({g for g, _ in t if g.startswith("block_dot_regen-rademacher-cpu")},
                    key=lambda g: (float(g.split("P=")[1].split("-")[0]), int(g.split("L=")[1])))
    P = groups[-1].split("P=")[1].split("-")[0]
    sel = [g for g in groups if f"P={P}-" in g]
    return ", ".join(_x(t[(g, "compiled-explicit")] / t[(g, "compiled-regen")]) for g in sel) + \
        " at L = " + ", ".join(g.split("L=")[1] for g in sel)


# ------------------------------------------------------------------------------ the registry
SECTIONS = {
    "results-provenance": (s_results_provenance, "every bench/results file"),
    "overhead-table": (s_overhead_table, "cpu_overhead.json, cpu_overhead_before.json"),
    "overhead-summary": (s_overhead_summary, "cpu_overhead.json"),
    "overhead-noise": (s_overhead_noise, "cpu_overhead.json (and cpu_overhead_run1.json)"),
    "memory-table": (s_memory_table, "cpu_memory.json"),
    "memory-summary": (s_memory_summary, "cpu_memory.json"),
    "probing-table": (s_probing_table, "cpu_probing.json"),
    "probing-summary": (s_probing_summary, "cpu_probing.json"),
    "auto-seeds-table": (s_auto_seeds_table, "cpu_auto_seeds.json"),
    "peers-table": (s_peers_table, "cpu_peers.json"),
    "peers-summary": (s_peers_summary, "cpu_peers.json"),
    "targets": (s_targets, "cpu_overhead, cpu_memory, cpu_probing, cpu_peers"),
    "study-summary": (s_study_summary, "probing_study.json"),
    "study-inflation-range": (s_study_inflation_range, "probing_study.json"),
    "study-blocks": (s_study_blocks, "probing_study.json"),
    "study-kstar": (s_study_kstar, "probing_study.json"),
    "study-auto-vs-global": (s_study_auto_vs_global, "probing_study.json"),
    "curvature-table": (s_curvature_table, "cpu_curvature.json (else the legacy curvature_ratios.json)"),
    "local-hessian-table": (s_local_hessian_table, "cpu_local_hessian.json"),
    "local-hessian-speedup": (s_local_hessian_speedup, "cpu_local_hessian.json"),
    "memorisation-table": (s_memorisation_table, "memorisation.json"),
    "memorisation-goal": (s_memorisation_goal, "memorisation.json"),
    "cusum-arl0-table": (s_cusum_arl0_table, "cpu_cusum_arl0.json"),
    "probing-scale-table": (s_probing_scale_table, "probing_scale.json"),
    "weight-sharing-table": (s_weight_sharing_table, "weight_sharing.json"),
    "kernels-table": (s_kernels_table, "cpu_kernels.json"),
    "kernels-regen-vs-explicit": (s_kernels_regen_vs_explicit, "cpu_kernels.json"),
    "probing-scale-summary": (s_probing_scale_summary, "probing_scale.json"),
}


def render(text: str, path: Path, problems: list[str]) -> str:
    def sub(m):
        name, old = m.group(1), m.group(2)
        if name not in SECTIONS:
            problems.append(f"{path.relative_to(ROOT)}: unknown generated section {name!r}")
            return m.group(0)
        try:
            body = SECTIONS[name][0]()
        except MissingResults as exc:
            problems.append(f"{path.relative_to(ROOT)}: section {name!r} needs bench/results/{exc}")
            return m.group(0)
        body = body.strip("\n")
        inner = f"\n{body}\n" if old.startswith("\n") else body
        return f"<!-- BEGIN hutchtrace-generated: {name} -->{inner}<!-- END hutchtrace-generated: {name} -->"

    return MARK.sub(sub, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail (exit 1) when a generated section is stale")
    ap.add_argument("--list", action="store_true", help="list the sections and where they are used")
    ap.add_argument("--results", type=Path, default=None,
                    help="read the results from this directory instead (e.g. /tmp/hutchtrace-bench); with --print")
    ap.add_argument("--print", dest="show", metavar="SECTION", default=None,
                    help="print one rendered section (or 'all') instead of writing files: a preview of a run")
    args = ap.parse_args(argv)
    global RESULTS
    if args.results is not None:
        if args.show is None:
            ap.error("--results previews only: add --print SECTION (the committed files render from bench/results)")
        RESULTS = args.results
    if args.show is not None:
        names = list(SECTIONS) if args.show == "all" else [args.show]
        for name in names:
            try:
                print(f"===== {name}\n{SECTIONS[name][0]()}\n")
            except MissingResults as exc:
                print(f"===== {name}\n(missing {exc})\n")
            except (KeyError, ValueError, TypeError) as exc:  # e.g. a smoke run's partial results
                print(f"===== {name}\n(cannot render from these results: {type(exc).__name__}: {exc})\n")
        return 0
    problems: list[str] = []
    stale: list[str] = []
    used: dict[str, list[str]] = {}
    for path in DOCS:
        text = path.read_text()
        for m in MARK.finditer(text):
            used.setdefault(m.group(1), []).append(str(path.relative_to(ROOT)))
        new = render(text, path, problems)
        if new != text:
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(new)
    if args.list:
        for name, (_, src) in SECTIONS.items():
            print(f"{name:<24} {src:<58} {', '.join(used.get(name, [])) or '(unused)'}")
        return 0
    for p in problems:
        print(f"render_tables: {p}", file=sys.stderr)
    if args.check:
        if stale:
            print("render_tables: stale generated sections in " + ", ".join(stale)
                  + "; run `python bench/render_tables.py` and commit the result", file=sys.stderr)
        return 1 if (stale or problems) else 0
    print("render_tables: " + (f"updated {', '.join(stale)}" if stale else "everything up to date"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
