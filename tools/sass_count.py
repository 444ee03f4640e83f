"""Count the instructions of the fused decode kernel's main loop, on a machine without a GPU.

    python tools/sass_count.py                                 # head_dim 128, K4/V4, the default build
    python tools/sass_count.py --bits 4/2 -D TT_FOLD=0 -D TT_KEY_INPLACE=0
    python tools/sass_count.py --dump /tmp/loop.sass           # also write the loop's steady-state road

Compiles the kernels of cuda/decode_attention.cu for sm_90 (H100/H200) with NVRTC, disassembles the cubin with
cuobjdump, finds the main loop (the backward branch whose body holds the copies and the mma instructions)
and counts the instructions on its steady-state road: the branches that skip more than --skip-over instructions (the
query fold at the start of each 128-token block) are left out. With one value group (the default) the run-time choice
between the folded and the plain value road is taken as the kernel takes it. Prints registers, spills and an opcode
histogram. Static counts are not time (a variant with 23% fewer instructions once measured no faster on an H200 while
the kernel was bound elsewhere; later the subnormal codes, 18% fewer, were 5-12% faster; 08_cuda), but the count is a
quick, exact check of what a change does to the loop. Also counts the window's tile loops (one per 16-bit type), which
every warp runs once or twice before its main loop.

NVRTC, cuobjdump and nvdisasm come from NVIDIA's Linux x86-64 wheels on PyPI (downloaded once into
~/.cache/tiny_turboquant/cuda-tools).
"""
import argparse, collections, ctypes, os, re, subprocess, sys, zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tiny_turboquant" / "cuda-tools"
WHEELS = ["nvidia-cuda-nvrtc-cu12==12.9.86", "nvidia-cuda-runtime-cu12==12.9.79", "nvidia-cuda-cuobjdump==13.5.37",
          "nvidia-cuda-nvdisasm==13.5.37"]  # cuobjdump runs the nvdisasm beside it


def cuda_tools():
    "Folder holding the unpacked wheels (NVRTC, the CUDA headers, cuobjdump, nvdisasm); fetched from PyPI on first use."
    nvidia = TOOLS / "nvidia"
    if not (nvidia / "cuda_nvrtc").exists() or not list(nvidia.glob("*/bin/nvdisasm")):
        TOOLS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux2014_x86_64", "-d", str(TOOLS / "wheels"), *WHEELS], check=True)
        for w in (TOOLS / "wheels").glob("*.whl"):
            with zipfile.ZipFile(w) as z: z.extractall(TOOLS)
        for exe in nvidia.glob("*/bin/*"): exe.chmod(0o755)
    return nvidia


def nvrtc_cubin(source, name, options, nvidia):
    "Compile `source` with NVRTC and return (cubin bytes, compile log) for the kernel `name`."
    lib = ctypes.CDLL(str(next((nvidia / "cuda_nvrtc" / "lib").glob("libnvrtc.so.*"))))
    prog = ctypes.c_void_p()
    def log():
        n = ctypes.c_size_t(); lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value); lib.nvrtcGetProgramLog(prog, buf)
        return buf.value.decode()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"decode_attention.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    lib.nvrtcAddNameExpression(prog, name.encode())
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    if lib.nvrtcCompileProgram(prog, len(options), opts): raise RuntimeError("NVRTC could not compile:\n" + log())
    n = ctypes.c_size_t(); lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    cubin = ctypes.create_string_buffer(n.value); lib.nvrtcGetCUBIN(prog, cubin)
    return cubin.raw, log()


def kernel_source(one_value_group=True):
    "The kernel source with its header inlined; with one value group the folded road is chosen at compile time."
    src = (ROOT / "cuda" / "decode_attention.cu").read_text()
    src = src.replace('#include "decode_attention.h"', (ROOT / "cuda" / "decode_attention.h").read_text())
    if one_value_group:
        choice = "TT_FOLD && vgroups == 1"
        if choice not in src: raise RuntimeError(f"cuda/decode_attention.cu no longer holds `{choice}`: update sass_count.py")
        src = src.replace(choice, "TT_FOLD")
    return src


def instructions(sass):
    "(address, instruction) of every SASS line."
    return [(int(m.group(1), 16), m.group(2).strip()) for line in sass.splitlines()
            if (m := re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line))]


def branch_target(ins):
    "Target of a plain branch (not BRA.DIV, which leaves for the divergent-shuffle path)."
    m = re.search(r"\bBRA\s+(?:!?U?P\w+,\s*)?0x([0-9a-f]+)", ins)
    return int(m.group(1), 16) if m else None


def steady_loop(code, skip_over):
    "The steady-state road of the smallest loop holding copies (UBLKCP bulk copies or LDGSTS cp.async) and, unless none does, HMMA (mma)."
    loops = []
    for addr, ins in code:
        t = branch_target(ins)
        if t is not None and t < addr:
            body = [(a, x) for a, x in code if t <= a <= addr]
            if any("UBLKCP" in x or "LDGSTS" in x for _, x in body): loops.append(body)
    if not loops: raise RuntimeError("no loop with copy instructions found in the kernel")
    with_mma = [b for b in loops if any("HMMA" in x for _, x in b)]  # none in a TT_ABLATE=1 build
    body = min(with_mma or loops, key=len)
    skipped = set()
    for a, x in body:
        t = branch_target(x)
        if t is not None and a < t <= body[-1][0] and (t - a) // 16 > skip_over: skipped |= {b for b, _ in body if a < b < t}
    return body, [(a, x) for a, x in body if a not in skipped]


def window_loops(code):
    "The window's tile loops (16 tokens a turn, one per 16-bit type): loops with mma and exp2 but no copies."
    loops = []
    for addr, ins in code:
        t = branch_target(ins)
        if t is not None and t < addr:
            body = [x for a, x in code if t <= a <= addr]
            if (any("HMMA" in x for x in body) and any("MUFU.EX2" in x for x in body)
                    and not any("UBLKCP" in x or "LDGSTS" in x for x in body)):
                loops.append(body)
    return loops


def opcode(ins): return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256))
    ap.add_argument("--bits", default="4/4", help="key/value bits, e.g. 4/2")
    ap.add_argument("-D", "--define", action="append", default=[], help="kernel macro, e.g. TT_FOLD=1")
    ap.add_argument("--value-groups", action="store_true", help="count the road for several value groups (no fold)")
    ap.add_argument("--masked", action="store_true", help="the kernel of calls with a key mask")
    ap.add_argument("--skip-over", type=int, default=250, help="leave out forward branches over more instructions")
    ap.add_argument("--dump", help="write the steady-state road's instructions to this file")
    args = ap.parse_args()
    kb, vb = (int(b) for b in args.bits.split("/"))
    nvidia = cuda_tools()
    options = ["-arch=sm_90", "-std=c++17", "-default-device", "-Xptxas=-v", f"-I{nvidia / 'cuda_runtime' / 'include'}"]
    name = f"quantized_kernel<{args.head_dim},{kb},{vb},{'true' if args.masked else 'false'}>"
    cubin, log = nvrtc_cubin(kernel_source(not args.value_groups), name,
                             options + [f"-D{d}" for d in args.define], nvidia)
    path = TOOLS / "kernel.cubin"
    path.write_bytes(cubin)
    cuobjdump = next(nvidia.glob("*/bin/cuobjdump"))
    sass = subprocess.run([str(cuobjdump), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    quantized = sass[sass.index("quantized_kernel"):] if "quantized_kernel" in sass else sass
    if "Function :" in quantized: quantized = quantized[:quantized.index("Function :")]  # this kernel only (addresses restart)
    mine = log[log.index("quantized_kernel"):]  # ptxas reports each kernel after its name
    regs = int(re.search(r"Used (\d+) registers", mine).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", mine).group(1))
    code = instructions(quantized)
    body, road = steady_loop(code, args.skip_over)
    hist = collections.Counter(opcode(x) for _, x in road)
    print(f"{name} {' '.join(args.define) or '(default build)'}: "
          f"{regs} registers, {spills} bytes spilled")
    print(f"main loop: {len(body)} instructions; steady-state road: {len(road)} per chunk")
    print("  " + " ".join(f"{k}:{v}" for k, v in hist.most_common()))
    for body in window_loops(code):  # run once or twice per call: latency, not throughput
        print(f"window tile loop: {len(body)} instructions, {sum('HMMA' in x for x in body)} mma, "
              f"{sum('SHFL' in x for x in body)} shuffles")
    if args.dump: Path(args.dump).write_text("\n".join(f"{a:05x} {x}" for a, x in road) + "\n")


if __name__ == "__main__":
    main()
