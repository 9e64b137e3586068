"""Why does the interleaved A/B put ``fp8_attention`` at 1.04x cuDNN at L = 16896 when do_bench says 1.30x?

fp8_attention run 5 (H100, fd00813) timed ours (pre-pass + sm_90 kernel) at 8.79 ms with do_bench and at 10.46 ms
in ``bench_ab`` (CUDA graphs of n = 2 x (L2 flush, call), replayed alternately with cuDNN's), seconds apart;
cuDNN 11.46 and 10.95 ms. probe_prepass_time measured a CUDA graph of ``fp8_attention`` at 9.14-9.24 ms, 0.35 ms
more than its pre-pass and kernel graphed apart. This probe times, at L = 16896 and 4608, the same calls with each
timer (do_bench; a graph of n calls for n = 2 and 10; the A/B against cuDNN, against itself, and the kernel alone
against cuDNN) while ``nvidia-smi`` logs the SM clock and power every 50 ms (the script records when each
measurement ran, so that the log can be lined up with it).

Expectation (written before run 1): if power or clocks explain it, the log shows a lower SM clock during the A/B
rounds of ours than during its do_bench, and the self A/B is ~1.0 with ours_ms near the A/B's 10.5 ms; if graph
replay itself slows ours, a graph of n = 2 measures ~10.4 ms with clocks unchanged.

    python3 reports/fp8_attention/probe_attn_timer.py --out $OUT/probe_attn_timer_run1.json  # starts nvidia-smi
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "fp8_matmul"))
from bench_fp8_attention import bench, flux_like, sdpa_fn  # noqa: E402
from bench_fp8_matmul import bench_ab, bench_graph  # noqa: E402

EXPECTATION = " ".join(__doc__.split("Expectation (written before run 1): ")[1].split("\n\n")[0].split())


def time_length(fa, sm90, L: int, log) -> dict:
    q, k, v = flux_like(1, 48, L, 128)
    quant = fa.quantize_qkv(q, k, v, v_perm16=True)
    cudnn = sdpa_fn("cudnn")
    fns = {
        "cudnn": lambda: cudnn(q, k, v),
        "ours": lambda: fa.fp8_attention(q, k, v),
        "ours kernel": lambda: sm90(quant, v),
        "ours pre-pass": lambda: fa.quantize_qkv(q, k, v, v_perm16=True),
    }
    row = {"L": L, "do_bench_ms": {}, "graph_ms": {}, "ab": {}}
    for name, fn in fns.items():
        row["do_bench_ms"][name] = log(f"{L} do_bench {name}", lambda fn=fn: bench(fn)["ms"])
    for n in (2, 10):
        for name, fn in fns.items():
            row["graph_ms"][f"{name} n={n}"] = log(
                f"{L} graph n={n} {name}", lambda fn=fn, n=n: bench_graph(fn, n)["ms"]
            )
    for a, b in (("ours", "cudnn"), ("ours", "ours"), ("ours kernel", "cudnn"), ("cudnn", "cudnn")):
        row["ab"][f"{a} / {b}"] = log(f"{L} ab {a} / {b}", lambda a=a, b=b: bench_ab(fns[a], fns[b], 2, rounds=7))
    return row


def run(out: Path) -> None:
    import triton

    from flux2_bench.kernels import fp8_attention as fa
    from flux2_bench.kernels.fp8_attention_sm90 import fp8_attention_sm90

    smi_path = out.with_suffix(".smi.csv")
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,"
                            "clocks_event_reasons.active", "--format=csv", "-lms", "50"],
                           stdout=smi_path.open("w"), stderr=subprocess.DEVNULL)  # fmt: skip
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "git_sha": os.environ.get("GIT_SHA", "unknown"),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "expectation": EXPECTATION, "phases": [], "rows": []}  # fmt: skip

    def log(what, fn):
        t0 = time.time()
        r = fn()
        res["phases"].append({"what": what, "start": t0, "end": time.time()})
        print(what, r if not isinstance(r, dict) else {k: r[k] for k in ("ratio", "ours_ms", "anchor_ms")}, flush=True)
        return r

    try:
        for L in (16896, 4608):
            res["rows"].append(time_length(fa, fp8_attention_sm90, L, log))
            out.write_text(json.dumps(res, indent=1))
            torch.cuda.empty_cache()
    finally:
        smi.terminate()
    out.write_text(json.dumps(res, indent=1))


def _smi_samples(path: Path) -> list[tuple[float, float, float, str]]:
    """(unix time, SM MHz, W, throttle reasons) per nvidia-smi line (its timestamps are the machine's local time,
    as ``time.time()`` there: UTC on the device)."""
    out = []
    for line in path.read_text().splitlines()[1:]:
        f = [x.strip() for x in line.split(",")]
        try:
            t = datetime.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=datetime.UTC).timestamp()
            out.append((t, float(f[1].split()[0]), float(f[3].split()[0]), f[5]))
        except (ValueError, IndexError):
            continue
    return out


def render(path: Path) -> str:
    d = json.loads(path.read_text())
    smi = _smi_samples(path.with_suffix(".smi.csv"))
    # nvidia-smi's clock is local time; on the device that is UTC, but align on the offset that puts the most
    # samples inside the phases in case it is not
    offsets = [0.0] + [h * 3600.0 for h in range(-12, 13) if h]
    best = max(offsets, key=lambda o: sum(any(p["start"] <= t - o <= p["end"] for p in d["phases"]) for t, *_ in smi))
    lines = [f"# Attention timers and the power cap (generated by `probe_attn_timer.py --render {path.name}`)", "",
             f"{d['gpu']}, torch {d['torch']}, triton {d['triton']}, git {d['git_sha']}, {d['date']}. B=1, H=48, "
             "D=128, bf16 FLUX.2-like inputs; `ours` = `fp8_attention` (pre-pass + sm_90 kernel).", "",
             f"Expectation: {d['expectation']}", "",
             "| L | timer | ms or ratio | SM MHz (mean, min-max of the 50 ms samples) | W (mean) | samples |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    rows = {r["L"]: r for r in d["rows"]}
    for p in d["phases"]:
        L, kind, rest = p["what"].split(" ", 2)
        r = rows[int(L)]
        if kind == "do_bench":
            val = f"{r['do_bench_ms'][rest]:.3f} ms"
        elif kind == "graph":
            n, name = rest.split(" ", 1)
            val = f"{r['graph_ms'][f'{name} {n}']:.3f} ms"
        else:
            ab = r["ab"][rest]
            val = f"{ab['ratio']:.3f} (first {ab['ours_ms']:.3f} ms, second {ab['anchor_ms']:.3f} ms)"
        ss = [s for s in smi if p["start"] <= s[0] - best <= p["end"]]
        clk = (
            f"{sum(s[1] for s in ss) / len(ss):.0f} ({min(s[1] for s in ss):.0f}-{max(s[1] for s in ss):.0f})"
            if ss
            else ""
        )
        watts = f"{sum(s[2] for s in ss) / len(ss):.0f}" if ss else ""
        lines.append(f"| {L} | {kind} {rest} | {val} | {clk} | {watts} | {len(ss)} |")
    reasons = sorted({s[3] for s in smi})
    lines += ["", f"Clock-event reasons seen in the log: {', '.join(reasons)} (0x4: software power cap)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--render", type=Path)
    a = ap.parse_args()
    if a.render:
        print(render(a.render), end="")
    else:
        run(a.out)
