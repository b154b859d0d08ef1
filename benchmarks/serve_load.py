"""Load on `lorafit serve` and its peers behind the same HTTP layer and batcher.

    .venv/bin/python benchmarks/serve_load.py --run runs/default-lora --out results/serve_load

From one trained lora run (the default comparison's), `--adapters` adapter runs are made by
copying it and perturbing its adapter weights (each a different model of the same shape, as
16 customers' adapters would be). Each system is a server process (benchmarks/serve_peer.py)
on this machine; a client of async HTTP requests, one review of the IMDb test split each,
keeps `concurrency` requests in flight for `--requests` requests, the adapters named in turn.
All servers run at once; each round measures every system at every concurrency, one after
another, the order rotating from round to round, so a ratio compares systems measured minutes
apart. Per system and concurrency: texts/s (median of the rounds, and each round's), p50
and p99 latency, and the server's peak RSS (VmHWM); the goals' ratios per round; the CPU's
matmul peak (benchmarks/peak.py), measured first in the same run.
Systems: lorafit with 1 adapter, lorafit with all, PEFT with all (mixed batches
through `adapter_names=`), and one merged model per adapter; `--systems` may add `threaded`
(lorafit with all, the adapters' updates on every intra-op thread: see
lorafit.lora.SERVED_UPDATES_ON_ONE_THREAD).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import commit  # noqa: E402
from lorafit.data.text import clean_text  # noqa: E402
from lorafit.machine import cpu_model  # noqa: E402


def make_adapters(run: Path, n: int, work: Path) -> dict[str, Path]:
    """`n` copies of `run` with their adapter weights perturbed (seeded), as NAME -> folder."""
    out = {}
    for i in range(n):
        folder = work / f"adapter{i:02d}"
        if not folder.exists():
            shutil.copytree(run, folder)
            path = folder / "adapter" / "adapter_model.safetensors"
            g = torch.Generator().manual_seed(i)
            tensors = {k: v + 0.1 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v
                       for k, v in load_file(path).items()}
            save_file(tensors, str(path))
        out[f"adapter{i:02d}"] = folder
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, names: list[str], texts: list[str], requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    queue = list(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            k = queue.pop()
            start = time.perf_counter()
            r = await client.post("/predict", json={"inputs": texts[k % len(texts)], "adapter": names[k % len(names)]})
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    lat = sorted(latencies)
    return {"texts_per_s": requests / seconds, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "requests": requests}


def start_server(system: str, chosen: dict[str, Path]) -> tuple[str, subprocess.Popen]:
    """A serve_peer.py process for `system` serving `chosen`; (url, process) once it answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("serve_peer.py")), "--system",
                             system.split("-")[0], "--port", str(port), *(f"{n}={p}" for n, p in chosen.items())])
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise SystemExit(f"the {system} server exited with {proc.returncode}") from None
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--requests", type=int, default=128, help="requests per system, concurrency and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--systems", default="lorafit-1,lorafit,peft,merged")
    ap.add_argument("--work", default="runs/serve_load")
    ap.add_argument("--out", default="results/serve_load")
    args = ap.parse_args()
    import lorafit
    from lorafit.runs import load_data

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    adapters = make_adapters(Path(args.run), args.adapters, work)
    texts = [clean_text(t) for t in load_data(lorafit.load_run(args.run).config).test.texts]
    from peak import measure

    peak = measure(trials=3, seconds=0.5)  # this CPU's matmul peak, before any server shares it
    systems = args.systems.split(",")
    concurrency = [int(x) for x in args.concurrency.split(",")]
    chosen = {s: dict(list(adapters.items())[:1]) if s == "lorafit-1" else adapters for s in systems}
    servers = {}
    try:
        for system in systems:  # every server up at once; each idles while another is measured
            servers[system] = start_server(system, chosen[system])
            asyncio.run(load(servers[system][0], list(chosen[system]), texts, 16, 4))  # warm-up
        rounds: list[dict] = []
        for k in range(args.rounds):
            order = systems[k % len(systems):] + systems[:k % len(systems)]  # each system leads in turn
            this = {}
            for c in concurrency:
                for system in order:
                    m = asyncio.run(load(servers[system][0], list(chosen[system]), texts, args.requests, c))
                    this.setdefault(system, {})[str(c)] = m
                    print(f"round {k} {system} c{c}", json.dumps(m), flush=True)
            rounds.append(this)
        rss = {system: peak_rss_mb(proc.pid) for system, (_, proc) in servers.items()}
    finally:
        for _, proc in servers.values():
            proc.terminate()
        for _, proc in servers.values():
            proc.wait(timeout=120)
    results = {}
    for system in systems:
        per = {}
        for c in map(str, concurrency):
            got = [r[system][c] for r in rounds]
            per[c] = {key: statistics.median(g[key] for g in got) for key in ("texts_per_s", "p50_ms", "p99_ms")}
            per[c]["texts_per_s_per_round"] = [g["texts_per_s"] for g in got]
        results[system] = {"adapters": len(chosen[system]), "by_concurrency": per, "peak_rss_mb": rss[system]}
    # the goals' ratios, round by round (the systems of one round ran minutes apart, not hours)
    ratios = {}
    for name, (a, b) in {"lorafit_16_over_1": ("lorafit", "lorafit-1"), "lorafit_16_over_peft": ("lorafit", "peft"),
                         "lorafit_16_over_merged": ("lorafit", "merged"),
                         "lorafit_16_over_threaded": ("lorafit", "threaded")}.items():
        if a in systems and b in systems:
            ratios[name] = {}
            for c in map(str, concurrency):
                per_round = [r[a][c]["texts_per_s"] / r[b][c]["texts_per_s"] for r in rounds]
                ratios[name][c] = {"median": statistics.median(per_round), "per_round": per_round}
    record = {"command": "benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
              "commit": commit(),
              "cpu": cpu_model(), "peak": peak, "rounds": args.rounds, "requests": args.requests, "results": results,
              "ratios": ratios}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Load on lorafit serve and its peers\n\n`{record['command']}` at commit {record['commit']}\n",
             f"CPU: {record['cpu']}; matmul peak measured in this run: bf16 "
             f"{peak['bfloat16']['peak_tflops']:.2f}, fp32 {peak['float32']['peak_tflops']:.2f} TFLOP/s. "
             f"Medians over {args.rounds} interleaved rounds of {args.requests} requests "
             "per system and concurrency.\n", "| system | adapters | concurrency | texts/s | texts/s per round | "
             "p50 ms | p99 ms | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for system, r in results.items():
        for c, m in r["by_concurrency"].items():
            spread = " / ".join(f"{x:.1f}" for x in m["texts_per_s_per_round"])
            lines.append(f"| {system} | {r['adapters']} | {c} | {m['texts_per_s']:.1f} | {spread} | "
                         f"{m['p50_ms']:.0f} | {m['p99_ms']:.0f} | {r['peak_rss_mb']:,.0f} |")
    lines += ["", "| ratio (median of the rounds' ratios) | " + " | ".join(f"concurrency {c}" for c in concurrency)
              + " |", "|---|" + "---|" * len(concurrency)]
    for name, per in ratios.items():
        lines.append(f"| {name} | " + " | ".join(f"{per[str(c)]['median']:.2f}x" for c in concurrency) + " |")
    (out / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
