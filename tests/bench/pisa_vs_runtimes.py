"""PiSA-SR's networks at Stable Diffusion 2.1-base size in Tessera, PyTorch and OpenVINO: the
same weights, machine, thread count and run; seconds and peak memory per stage.

    pip install torch diffusers safetensors openvino numpy   # dev-only (torch: any build; it runs on the CPU)
    cargo build --release -p tessera-pisa --example bench
    python3 tests/bench/pisa_vs_runtimes.py [--work DIR] [--threads 2] [--size 128] [--bf16]
    python3 tests/bench/pisa_vs_runtimes.py --device cuda [--exe BENCH] [--bf16]   # on a card: Tessera (and its bf16), PyTorch f32 and fp16

The UNet and VAE are diffusers' own modules built from SD2.1-base's configs with diffusers'
random initialisation (seed 0), saved once in diffusers layout (safetensors) with a random
empty-prompt embedding; every runtime reads those files. Stages, each timed inside one layered
job on a `size`² input (4 × size output), as PiSA-SR's adjustable mode runs it:

  encode   VAE encoder, posterior mean × 0.18215, on the 4 × size bicubic image
  unet     the UNet at t = 1 on a batch of two (ε_pix, ε_full)
  decode   one VAE decode of z_L − ε (the job does two: x_full and x_pix)
  job      encode + unet + 2 decodes + the AdaIN colour fix

Tessera runs its real path: rank-4 LoRA of both families on all 258 modules, applied per batch
item at run time (B = 0 here, so the results are the plain networks'); PyTorch and OpenVINO run
the plain networks, i.e. the LoRA merged, the fastest form of the same maths. PyTorch runs
diffusers' modules in inference mode; OpenVINO the same modules converted once with
`openvino.convert_model` and saved as IR (f32 weights), compiled for its CPU plug-in with f32
inference precision (`--bf16` adds a row with its bf16 hint, which it picks by itself on CPUs
with AVX512_BF16 or AMX). Each runtime runs in a fresh process; its peak is VmHWM from the
start of the job (weights loaded, models compiled) to its end, so the weights are in it.
Tessera's results are compared with PyTorch's (max abs difference) to show that all compute
the same function.

With `--device cuda` the same job runs on the card (tests/gpu/run.sh): Tessera's GPU build
(`--exe`, the bench example built with `--features cuda`), PyTorch in f32 and in fp16 (the
modules cast with `.half()`, as GPU pipelines run them); each runtime runs the job once to warm
up (kernel loading, cuBLAS's start) and then the timed one; its peak is the card's memory that
it allocated (PyTorch's max_memory_allocated; Tessera's card memory in use, sampled per step).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

UNET = {"act_fn": "silu", "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "sample_size": 64, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "use_linear_projection": True}
VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
       "norm_num_groups": 32, "out_channels": 3, "sample_size": 768, "scaling_factor": 0.18215,
       "up_block_types": ["UpDecoderBlock2D"] * 4}
SCALING = 0.18215


def vm_hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def bicubic_image(size):
    """The 4·size² stand-in for the bicubic image, exactly as the Rust example makes it."""
    n = 4 * size
    i = np.arange(3 * n * n, dtype=np.int64)
    return (((i * 7919) % 1000) / 1000.0).astype(np.float32).reshape(1, 3, n, n)


def adain(x, ref):
    """AdaIN colour fix: x's per-channel mean and std moved to ref's."""
    axes = (2, 3)
    xm, xs = x.mean(axes, keepdims=True), x.std(axes, keepdims=True, ddof=1)
    rm, rs = ref.mean(axes, keepdims=True), ref.std(axes, keepdims=True, ddof=1)
    return (x - xm) / (xs + 1e-5) * rs + rm


def make_weights(work):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    if os.path.isfile(os.path.join(work, "embedding.safetensors")):
        return
    torch.manual_seed(0)
    t = time.time()
    UNet2DConditionModel(**UNET).save_pretrained(os.path.join(work, "unet"), safe_serialization=True)
    AutoencoderKL(**VAE).save_pretrained(os.path.join(work, "vae"), safe_serialization=True)
    save_file({"embedding": torch.randn(1, 77, 1024)}, os.path.join(work, "embedding.safetensors"))
    print("wrote SD2.1-base-sized UNet and VAE with random weights to %s in %.0f s" % (work, time.time() - t), file=sys.stderr)


def torch_modules(work, threads):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(work, "unet")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(work, "vae")).eval()
    emb = __import__("safetensors.torch", fromlist=["load_file"]).load_file(os.path.join(work, "embedding.safetensors"))["embedding"]
    return torch, unet, vae, emb


class Stages:
    """The job, stage by stage, on three callables taking and returning numpy arrays."""

    def __init__(self, encode, unet, decode):
        self.encode, self.unet, self.decode = encode, unet, decode

    def job(self, size):
        bicubic = bicubic_image(size)
        reset_hwm()
        times = {}
        t = time.perf_counter()
        z_l = self.encode(bicubic * 2 - 1) * SCALING
        times["encode"] = time.perf_counter() - t
        t = time.perf_counter()
        eps = self.unet(np.concatenate([z_l, z_l]))
        times["unet"] = time.perf_counter() - t
        decodes, xs = [], []
        for k in (1, 0):  # x_full, then x_pix
            t = time.perf_counter()
            x = np.clip(self.decode((z_l - eps[k:k + 1]) / SCALING), -1, 1) * 0.5 + 0.5
            decodes.append(time.perf_counter() - t)
            xs.append(x)
        t = time.perf_counter()
        for x in xs:
            adain(x, bicubic)
        fix = time.perf_counter() - t
        times["decode"] = sum(decodes) / 2
        times["job"] = times["encode"] + times["unet"] + sum(decodes) + fix
        times["peak_mib"] = vm_hwm_mib()
        return times, {"z_l": z_l, "eps_full": eps[1:2], "x_full": xs[0]}


def child_torch_cuda(args):
    torch, unet, vae, emb = torch_modules(args.work, args.threads)
    dtype = torch.float16 if args.child == "torch-cuda-fp16" else torch.float32
    dev = torch.device("cuda")
    unet, vae = unet.to(dev, dtype), vae.to(dev, dtype)
    ctx = emb.repeat(2, 1, 1).to(dev, dtype)
    on = lambda x: torch.from_numpy(x).to(dev, dtype)
    back = lambda t: t.float().cpu().numpy()
    with torch.inference_mode():
        stages = Stages(lambda x: back(vae.encode(on(x)).latent_dist.mean),
                        lambda z: back(unet(on(z), 1, encoder_hidden_states=ctx).sample),
                        lambda z: back(vae.decode(on(z)).sample))
        stages.job(args.size)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times, out = stages.job(args.size)
        times["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if dtype == torch.float32:
        np.savez(os.path.join(args.work, "torch_out.npz"), **out)
    return times


def child_torch(args):
    torch, unet, vae, emb = torch_modules(args.work, args.threads)
    # torch-bf16: the modules' weights and activations in bf16 (oneDNN's AMX or AVX512_BF16
    # kernels where the CPU has them), results back in f32.
    dtype = torch.bfloat16 if args.child == "torch-bf16" else torch.float32
    unet, vae = unet.to(dtype), vae.to(dtype)
    ctx = emb.repeat(2, 1, 1).to(dtype)
    t = lambda a: torch.from_numpy(a).to(dtype)
    with torch.inference_mode():
        stages = Stages(lambda x: vae.encode(t(x)).latent_dist.mean.float().numpy(),
                        lambda z: unet(t(z), 1, encoder_hidden_states=ctx).sample.float().numpy(),
                        lambda z: vae.decode(t(z)).sample.float().numpy())
        times, out = stages.job(args.size)
    if dtype == torch.float32:
        np.savez(os.path.join(args.work, "torch_out.npz"), **out)
    return times


def child_convert(args):
    """The three networks as OpenVINO IR, f32, converted from the same diffusers modules."""
    import openvino as ov
    torch, unet, vae, emb = torch_modules(args.work, args.threads)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    n, lat = 4 * args.size, args.size // 2

    class Net(torch.nn.Module):
        """The network as a submodule, so its weights are parameters, not traced constants."""

        def __init__(self, net, forward):
            super().__init__()
            self.net, self.run = net, forward

        def forward(self, *xs):
            return self.run(self.net, *xs)

    out = os.path.join(args.work, "ov")
    os.makedirs(out, exist_ok=True)
    with torch.no_grad():
        for name, module, example in [
                ("encoder", Net(vae, lambda v, x: v.encode(x).latent_dist.mean), (torch.zeros(1, 3, n, n),)),
                ("unet", Net(unet, lambda u, z, c: u(z, 1, encoder_hidden_states=c).sample), (torch.zeros(2, 4, lat, lat), emb.repeat(2, 1, 1))),
                ("decoder", Net(vae, lambda v, z: v.decode(z).sample), (torch.zeros(1, 4, lat, lat),))]:
            t = time.time()
            ov.save_model(ov.convert_model(module, example_input=example), os.path.join(out, name + ".xml"), compress_to_fp16=False)
            print("converted the %s to OpenVINO IR in %.0f s" % (name, time.time() - t), file=sys.stderr)
    return {}


def child_openvino(args):
    import openvino as ov
    from safetensors.numpy import load_file
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "bf16" if args.child == "openvino-bf16" else "f32"}
    nets = {name: core.compile_model(os.path.join(args.work, "ov", name + ".xml"), "CPU", config)
            for name in ("encoder", "unet", "decoder")}
    ctx = np.repeat(load_file(os.path.join(args.work, "embedding.safetensors"))["embedding"], 2, axis=0)
    stages = Stages(lambda x: nets["encoder"]([x])[0], lambda z: nets["unet"]([z, ctx])[0], lambda z: nets["decoder"]([z])[0])
    times, _ = stages.job(args.size)
    return times


def run_child(args, which):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--work", args.work,
           "--threads", str(args.threads), "--size", str(args.size)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(r.stderr[-2000:] if r.returncode else "")
    if r.returncode:
        raise SystemExit("%s failed" % which)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_tessera(args, bf16=False):
    exe = args.exe or os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "examples", "bench")
    if not os.path.isfile(exe):
        raise SystemExit("build it first: cargo build --release -p tessera-pisa --example bench")
    save = os.path.join(args.work, "tessera_bf16_out.safetensors" if bf16 else "tessera_out.safetensors")
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    extra = ["--device", "cuda:0", "--warm"] if args.device == "cuda" else []
    extra += ["--bf16"] if bf16 else []
    r = subprocess.run([exe, str(args.size), str(args.size), "--weights", args.work, "--save", save, "--json"] + extra,
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit("the Tessera bench failed:\n" + r.stderr[-3000:])
    line = next(l for l in r.stdout.splitlines() if l.startswith("json: "))
    figures = json.loads(line[len("json: "):])
    if args.device == "cuda":
        figures["peak_mib"] = figures["card_peak_mib"]
    return figures


def compare(work, name="tessera_out.safetensors"):
    from safetensors.numpy import load_file
    ours = load_file(os.path.join(work, name))
    ref = np.load(os.path.join(work, "torch_out.npz"))
    return {k: float(np.abs(ours[k] - ref[k]).max()) for k in ("z_l", "eps_full", "x_full")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/var/tmp/tessera-pisa-bench", help="weights, IR and outputs (about 8 GB)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=128, help="input side in pixels (output is 4×)")
    ap.add_argument("--bf16", action="store_true", help="also each runtime in bf16: Tessera's precision bf16, PyTorch's modules in bf16, OpenVINO's bf16 hint")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: Tessera and PyTorch (f32, fp16) on the card")
    ap.add_argument("--exe", help="Tessera's bench example [default: target/release/examples/bench]")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = {"torch": child_torch, "torch-bf16": child_torch, "convert": child_convert, "openvino": child_openvino, "openvino-bf16": child_openvino,
              "torch-cuda": child_torch_cuda, "torch-cuda-fp16": child_torch_cuda}[args.child]
        print(json.dumps(fn(args)))
        return
    os.makedirs(args.work, exist_ok=True)
    make_weights(args.work)
    if args.device == "cuda":
        import torch
        version = torch.__version__.split("+")[0]
        rows = {"Tessera (f32)": run_tessera(args),
                "PyTorch %s (f32)" % version: run_child(args, "torch-cuda"),
                "PyTorch %s (fp16)" % version: run_child(args, "torch-cuda-fp16")}
        if args.bf16:
            rows["Tessera (bf16)"] = run_tessera(args, bf16=True)
        table(args, rows, "on %s" % torch.cuda.get_device_name(0), "card memory allocated during the job")
        return
    if not os.path.isfile(os.path.join(args.work, "ov", "decoder.xml")):
        run_child(args, "convert")
    import openvino
    import torch
    rows = {"Tessera (f32)": run_tessera(args),
            "PyTorch %s (f32)" % torch.__version__.split("+")[0]: run_child(args, "torch"),
            "OpenVINO %s (f32)" % openvino.__version__.split("-")[0]: run_child(args, "openvino")}
    if args.bf16:
        rows["Tessera (bf16)"] = run_tessera(args, bf16=True)
        rows["PyTorch %s (bf16)" % torch.__version__.split("+")[0]] = run_child(args, "torch-bf16")
        rows["OpenVINO %s (bf16 hint)" % openvino.__version__.split("-")[0]] = run_child(args, "openvino-bf16")
    table(args, rows, "%d threads" % args.threads, "peak RSS during the job")


def table(args, rows, where, peak_label):
    n = 4 * args.size
    print("\nPiSA-SR stages at SD2.1-base size, %d² → %d², %s, same weights, same run" % (args.size, n, where))
    stages = [("encode", "VAE encode %d²" % n), ("unet", "UNet, batch of 2 at %d² latent" % (n // 8)),
              ("decode", "VAE decode %d² latent" % (n // 8)), ("job", "layered job %d² → %d²" % (args.size, n))]
    names = list(rows)
    f32_others = [k for k in names if not k.startswith("Tessera") and "bf16" not in k and "fp16" not in k]
    all_others = [k for k in names if not k.startswith("Tessera")]
    # Tessera f32 against the fastest f32 runtime; Tessera bf16 (where run) against the
    # fastest of all, any precision.
    ratios = [("Tessera (f32)", f32_others, "Tessera f32 ÷ fastest f32 other")]
    if "Tessera (bf16)" in rows:
        ratios.append(("Tessera (bf16)", all_others, "Tessera bf16 ÷ fastest other"))
    elif all_others != f32_others:
        ratios.append(("Tessera (f32)", all_others, "Tessera f32 ÷ fastest other"))
    print("| stage | " + " | ".join(names) + " | " + " | ".join(r[2] for r in ratios) + " |")
    print("|---|" + "---:|" * (len(names) + len(ratios)))
    for key, label in stages + [("peak_mib", peak_label)]:
        fmt = (lambda v: "%.0f MiB" % v) if key == "peak_mib" else (lambda v: "%.3f s" % v)
        cells = " | ".join(fmt(rows[k][key]) for k in names)
        print("| %s | %s | %s |" % (label, cells, " | ".join("%.2f" % (rows[t][key] / min(rows[k][key] for k in others)) for t, others, _ in ratios)))
    print("\nTessera against PyTorch (f32), max abs difference: " + ", ".join("%s %.2e" % kv for kv in compare(args.work).items()))
    if "Tessera (bf16)" in rows:
        print("Tessera bf16 against PyTorch (f32), max abs difference: " + ", ".join("%s %.2e" % kv for kv in compare(args.work, "tessera_bf16_out.safetensors").items()))


if __name__ == "__main__":
    main()
