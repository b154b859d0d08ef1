"""Load on `lorafit serve` and its peers behind the same HTTP layer and batcher.

    .venv/bin/python benchmarks/serve_load.py --run runs/default-lora --out results/serve_load

From one trained lora run (the default comparison's), `--adapters` adapter runs are made by
copying it and perturbing its adapter weights (each a different model of the same shape, as
16 customers' adapters would be). Each system is a server process (benchmarks/serve_peer.py)
on this machine; a client of async HTTP requests, one review of the IMDb test split each,
keeps `concurrency` requests in flight for `--requests` requests, the adapters named in turn.
Per system and concurrency: texts/s, p50 and p99 latency, and the server's peak RSS
(VmHWM). Systems: lorafit with 1 adapter, lorafit with all, PEFT with all (mixed batches
through `adapter_names=`), and one merged model per adapter.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--requests", type=int, default=256)
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
    results = {}
    for system in args.systems.split(","):
        chosen = dict(list(adapters.items())[:1]) if system == "lorafit-1" else adapters
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("serve_peer.py")), "--system",
                                 system.split("-")[0], "--port", str(port),
                                 *(f"{n}={p}" for n, p in chosen.items())])
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    if proc.poll() is not None:
                        raise SystemExit(f"the {system} server exited with {proc.returncode}") from None
                    time.sleep(0.5)
            asyncio.run(load(url, list(chosen), texts, 16, 4))  # warm-up
            per = {}
            for c in (int(x) for x in args.concurrency.split(",")):
                per[str(c)] = asyncio.run(load(url, list(chosen), texts, args.requests, c))
                print(system, c, json.dumps(per[str(c)]), flush=True)
            results[system] = {"adapters": len(chosen), "by_concurrency": per, "peak_rss_mb": peak_rss_mb(proc.pid)}
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    record = {"command": "benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "cpu": cpu_model(), "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Load on lorafit serve and its peers\n\n`{record['command']}` at commit {record['commit']}\n",
             f"CPU: {record['cpu']}\n", "| system | adapters | concurrency | texts/s | p50 ms | p99 ms | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for system, r in results.items():
        for c, m in r["by_concurrency"].items():
            lines.append(f"| {system} | {r['adapters']} | {c} | {m['texts_per_s']:.1f} | {m['p50_ms']:.0f} | "
                         f"{m['p99_ms']:.0f} | {r['peak_rss_mb']:,.0f} |")
    (out / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
