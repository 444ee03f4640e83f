"""Serving throughput and memory of `tiny-turboquant-server`: TinyKVCache against the uncompressed DynamicCache.

    python benchmarks/bench_server.py --device cpu     # writes benchmarks/results/server_cpu.json
    python benchmarks/bench_server.py --device cuda    # writes benchmarks/results/server_cuda.json

Throughput: for each cache (`--compression`, default safe, and `none` = DynamicCache) the server runs as a subprocess
on a free port of 127.0.0.1. For 1, 4 and 16 concurrent streaming clients, `--rounds` rounds of simultaneous greedy
chat requests of `--max-tokens` tokens each are sent over plain HTTP (SSE). Aggregate tokens/s is completion tokens
(from `usage`) over the wall time of a round; time to first token (TTFT) is measured per request, from sending it to
its first chunk with text; p50/p95 over all requests of that level.

Sessions in a budget: one real `--session-tokens` (4096) token session is prefilled through the model into a
DynamicCache, and the same keys and values are appended to a TinyKVCache, layer by layer, as a prefill does. Bytes per
session are measured (`memory_report`), and the largest number of such sessions fitting `--budget-gib` is reported for
each cache, counting held bytes only and also the transient of a decode step (TinyKVCache dequantizes one layer's
history, then concatenates the new token: two full-precision copies of one layer; DynamicCache concatenates: one).
On CPU the bytes are also given for bfloat16 (the same keys and values cast), the dtype a GPU would serve in.
"""
import argparse, asyncio, datetime, json, math, os, platform, socket, statistics, subprocess, sys, time
from pathlib import Path

import httpx
import torch

TOPICS = ["a lighthouse keeper", "a lost robot", "the first winter on Mars", "a river that flows uphill",
          "a library with no books", "an old clockmaker", "a dragon who hates gold", "the last train home",
          "a city under the sea", "a painter who sees sound", "a cat that runs a shop", "a storm in a teacup",
          "a map of forgotten roads", "a garden on the moon", "a violin made of ice", "a letter never sent"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, compression):
    port = free_port()
    cmd = [sys.executable, "-c", "from tiny_turboquant.server import main; main()", "--port", str(port),
           "--compression", compression, "--device", args.device, "--dtype", args.dtype, "--max-batch", "16",
           "--max-queue", "64", "--max-new-tokens-limit", str(max(args.max_tokens, 64))]
    if args.model: cmd += ["--model", args.model]
    if args.threads: cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None: raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200: return proc, url
        except httpx.HTTPError: pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("server did not start within 600 s")


async def one_request(client, url, topic, max_tokens):
    body = dict(model="bench", messages=[{"role": "user", "content": f"Write a long story about {topic}."}],
                max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]": continue
            chunk = json.loads(line[6:])
            if "error" in chunk: raise RuntimeError(chunk["error"])
            if chunk.get("usage"): tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]): ttft = time.perf_counter() - t0
    return ttft, tokens


async def run_level(url, clients, rounds, max_tokens):
    ttfts, rates = [], []
    async with httpx.AsyncClient(timeout=1200, limits=httpx.Limits(max_connections=64)) as client:
        for r in range(rounds):
            t0 = time.perf_counter()
            got = await asyncio.gather(*(one_request(client, url, TOPICS[(i + r) % len(TOPICS)], max_tokens)
                                         for i in range(clients)))
            wall = time.perf_counter() - t0
            ttfts += [t for t, _ in got if t is not None]
            rates.append(sum(n for _, n in got) / wall)
    return dict(clients=clients, rounds=rounds, tokens_per_s=statistics.median(rates), tokens_per_s_rounds=rates,
                ttft_p50_s=statistics.median(ttfts), ttft_p95_s=sorted(ttfts)[min(len(ttfts) - 1, int(0.95 * len(ttfts)))])


def bench_throughput(args, compression):
    proc, url = start_server(args, compression)
    try:
        asyncio.run(run_level(url, 1, 1, 8))  # warm-up
        levels = []
        for clients in args.clients:
            level = asyncio.run(run_level(url, clients, args.rounds, args.max_tokens))
            levels.append(level)
            print(f"{compression:>8} {clients:2} clients: {level['tokens_per_s']:8.1f} tokens/s, TTFT p50 "
                  f"{level['ttft_p50_s']:.3f} s, p95 {level['ttft_p95_s']:.3f} s", flush=True)
        metrics = httpx.get(url + "/metrics").json()
        return dict(compression=compression, levels=levels, server_metrics=metrics)
    finally:
        proc.terminate()
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill()


def bench_sessions(args, dtype):
    "Measured bytes of one real session of `args.session_tokens` tokens, for each cache and dtype."
    from transformers import DynamicCache
    from tiny_turboquant.models import load_model, sample_text, corpus_files
    from tiny_turboquant.models import cache_kwargs
    from tiny_turboquant.server import cache_factory, kv_bytes
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    files = corpus_files()
    text = files[0].read_text() if files else sample_text()
    ids = tok(text, return_tensors="pt")["input_ids"][:, :args.session_tokens].to(args.device)
    if ids.shape[1] < args.session_tokens: raise ValueError(f"sample text has only {ids.shape[1]} tokens")
    full = DynamicCache(config=model.config)
    kw = cache_kwargs(model, full)  # cache= or past_key_values=
    with torch.inference_mode():
        for s in range(0, ids.shape[1], 1024):  # chunked prefill: bounded attention memory, same cache
            model(ids[:, s:s + 1024], use_cache=True, **kw)
    dtypes = [dtype] + ([torch.bfloat16] if dtype != torch.bfloat16 else [])
    rows = []
    for dt in dtypes:
        tiny = cache_factory(model, args.compression)()
        ref = DynamicCache(config=model.config)
        for i, layer in enumerate(full.layers):
            for cache in (tiny, ref): cache.update(layer.keys.to(dt), layer.values.to(dt), i)
        layer_full = max(2 * l.keys.numel() * l.keys.element_size() for l in ref.layers)  # K+V of the largest layer
        for name, cache, transient in ((args.compression, tiny, 2 * layer_full), ("none", ref, layer_full)):
            held, uncompressed = kv_bytes(cache)
            rows.append(dict(compression=name, dtype=str(dt).replace("torch.", ""), tokens=args.session_tokens,
                             held_bytes=held, uncompressed_bytes=uncompressed, decode_transient_bytes=transient,
                             budget_gib=args.budget_gib,
                             sessions_in_budget=int(args.budget_gib * 2**30 // held),
                             sessions_in_budget_with_transient=int(args.budget_gib * 2**30 // (held + transient))))
        print(f"{rows[-2]['dtype']}: one {args.session_tokens}-token session holds {rows[-2]['held_bytes'] / 2**20:.1f} MiB "
              f"({args.compression}) vs {rows[-1]['held_bytes'] / 2**20:.1f} MiB (none): "
              f"{rows[-2]['sessions_in_budget']} vs {rows[-1]['sessions_in_budget']} sessions in {args.budget_gib} GiB", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    p.add_argument("--model", default=None, help="model path or hub name (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--compression", default="safe", help="TinyKVCache preset compared with the uncompressed cache")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=None, help="rounds per concurrency level (default 2 on CPU, 5 on CUDA)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 32 on CPU, 256 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the server")
    p.add_argument("--session-tokens", type=int, default=4096)
    p.add_argument("--budget-gib", type=float, default=16.0, help="KV-cache memory budget for the sessions count")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/server_<device>.json)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.rounds = args.rounds or (5 if cuda else 2)
    args.max_tokens = args.max_tokens or (256 if cuda else 32)
    dtype = getattr(torch, args.dtype)

    result = dict(benchmark="server", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=args.device, device_name=torch.cuda.get_device_name(args.device) if cuda else platform.processor() or platform.machine(),
                  cpu_count=os.cpu_count(), torch=torch.__version__, model=args.model or "SmolLM2-135M-Instruct (embedded)",
                  dtype=args.dtype, threads=args.threads, max_tokens=args.max_tokens, rounds=args.rounds)
    sessions = bench_sessions(args, dtype)
    by = {(r["compression"], r["dtype"]): r for r in sessions}
    result["sessions"] = sessions
    result["sessions_ratio"] = {dt: by[(args.compression, dt)]["sessions_in_budget"] / by[("none", dt)]["sessions_in_budget"]
                                for dt in {r["dtype"] for r in sessions}}
    result["sessions_ratio_with_transient"] = {
        dt: by[(args.compression, dt)]["sessions_in_budget_with_transient"] / by[("none", dt)]["sessions_in_budget_with_transient"]
        for dt in {r["dtype"] for r in sessions}}
    if not args.skip_throughput:
        runs = {c: bench_throughput(args, c) for c in (args.compression, "none")}
        result["throughput"] = list(runs.values())
        rate = {c: {l["clients"]: l["tokens_per_s"] for l in r["levels"]} for c, r in runs.items()}
        lo, hi = min(args.clients), max(args.clients)
        result["batching_speedup"] = {c: rate[c][hi] / rate[c][lo] for c in runs}  # aggregate tokens/s, most vs fewest clients
        result["tokens_per_s_vs_uncompressed"] = {n: rate[args.compression][n] / rate["none"][n] for n in args.clients}
        print(f"batching speedup {hi} vs {lo} clients: {result['batching_speedup']}")
        print(f"{args.compression} vs none tokens/s: {result['tokens_per_s_vs_uncompressed']}")
    print(f"sessions ratio ({args.compression} / none): {result['sessions_ratio']}, "
          f"with decode transient: {result['sessions_ratio_with_transient']}")
    out = Path(args.out or Path(__file__).parent / "results" / f"server_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
