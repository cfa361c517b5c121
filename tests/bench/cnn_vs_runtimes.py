"""The cnn networks in Tessera next to ONNX Runtime and OpenVINO: same weights, same machine,
same thread count, same run.

    pip install onnx onnxruntime openvino          # dev-only
    cargo build --release --workspace
    TESSERA_BIN_DIR=target/release python3 tests/bench/cnn_vs_runtimes.py [--model srresnet|rrdbnet] [--sizes 128,256]

The ONNX graph is built here, node by node, from the store's safetensors: SRResNet (BatchNorm
folded with Keras's ε = 1e-3, DepthToSpace in CRD mode = torch's pixel_shuffle), checked
against the TensorFlow fixture, or Real-ESRGAN x4plus's RRDBNet (BasicSR's forward), checked
against the ncnn fixture. OpenVINO compiles the same graph for its CPU plug-in. Tessera is timed
as a whole job (srgan-pair runs two networks and is halved) so its figure includes the tiling,
the layers and the transport that the others' does not. ncnn: tests/bench/realesrgan_vs_ncnn.py.
"""

import argparse
import json
import os
import struct
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

from harness import Daemon, bin_dir  # noqa: E402


def read_safetensors(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    dtypes = {"F32": "<f4", "F16": "<f2"}
    return {k: np.frombuffer(data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]], dtypes[v["dtype"]])
            .astype(np.float32).reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__"}


def rrdbnet_onnx(t):
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name

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
    graph = helper.make_graph(nodes, "rrdbnet",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, None, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def srresnet_onnx(t):
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name

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
    graph = helper.make_graph(nodes, "srresnet",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, None, None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


MODELS = {
    # network: (store model, file, graph builder, fixture, fixture key of the expected output, networks a job runs)
    "srresnet": ("srgan-pair", "srresnet.safetensors", srresnet_onnx, "srgan_tf.npz", "pre_cat", 2),
    "rrdbnet": ("realesrgan-x4plus", "rrdbnet.safetensors", rrdbnet_onnx, "realesrgan_ncnn.npz", "x4plus_cat", 1),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="srresnet", choices=sorted(MODELS))
    ap.add_argument("--sizes", default="128,256")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    model_id, filename, build, fixture, expected, nets = MODELS[args.model]
    store = os.environ.get("TESSERA_MODEL_DIR") or os.path.expanduser("~/.local/share/tessera/models")
    graph = build(read_safetensors(os.path.join(store, model_id, filename))).SerializeToString()
    threads = os.cpu_count()
    runners = {}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    runners["ONNX Runtime " + ort.__version__] = lambda x: sess.run(["y"], {"x": x})[0]
    try:
        import openvino as ov
        core = ov.Core()
        compiled = core.compile_model(core.read_model(graph, b""), "CPU",
                                      {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
        runners["OpenVINO " + ov.__version__.split("-")[0]] = lambda x: compiled(x)[0]
    except ImportError:
        print("(OpenVINO is not installed: pip install openvino)")

    fx = np.load(os.path.join(ROOT, "tests", "fixtures", fixture))
    x = (fx["input_cat"].astype(np.float32) / 255).transpose(2, 0, 1)[None]
    for name, run in runners.items():
        y = np.asarray(run(x))[0].transpose(1, 2, 0)
        print("%s vs the fixture: max |Δ| %.1e on [0, 1]" % (name, np.abs(y - fx[expected]).max()))
    print("%s, %d threads, best of %d" % (args.model, threads, args.repeat))
    print("%-8s" % "input" + "".join("%20s" % n for n in runners) + "%14s" % "Tessera" + "".join("%18s" % ("T / " + n.split()[0]) for n in runners))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, Daemon(os.path.join(tmp, "rt"), env={"TESSERA_MODEL_DIR": store}) as d, d.client() as c:
        for side in (int(s) for s in args.sizes.split(",")):
            img = rng.random((1, 3, side, side), dtype=np.float32)
            others = [min(_timed(lambda: run(img)) for _ in range(args.repeat)) for run in runners.values()]
            buf = c.alloc(side, side, 3, sample="f32")
            np.frombuffer(buf.view, np.float32)[:] = img[0].transpose(1, 2, 0).ravel()
            best_t = float("inf")
            for _ in range(args.repeat):
                job = c.submit(model_id, 4, buf, output_sample="f32")
                for layer in job.wait(timeout=3600):
                    c.release(layer)
                best_t = min(best_t, job.seconds / nets)
            c.release(buf)
            print("%-8s" % ("%d²" % side) + "".join("%19.2fs" % o for o in others) + "%13.2fs" % best_t
                  + "".join("%17.2f×" % (best_t / o) for o in others))
    print("binaries: %s" % bin_dir())


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
