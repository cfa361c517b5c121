"""srgan-pair's SRResNet in Tessera next to ONNX Runtime, same weights, same machine, same run.

    pip install onnx onnxruntime          # dev-only
    cargo build --release --workspace
    TESSERA_BIN_DIR=target/release python3 tests/bench/cnn_vs_onnxruntime.py [--sizes 128,256]

The ONNX graph is built here, node by node, from the store's safetensors (BatchNorm folded with
Keras's ε = 1e-3, DepthToSpace in CRD mode = torch's pixel_shuffle) and first checked against
the TensorFlow fixture; then both run the SRResNet forward at each size with 2 threads. Tessera
is timed as a whole srgan-pair job (both networks and the three layers) and halved, so its
figure includes the tiling, the base layer and the transport that ONNX Runtime's does not.
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
    return {k: np.frombuffer(data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]], "<f4").reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__"}


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="128,256")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    store = os.environ.get("TESSERA_MODEL_DIR") or os.path.expanduser("~/.local/share/tessera/models")
    weights = read_safetensors(os.path.join(store, "srgan-pair", "srresnet.safetensors"))
    model = srresnet_onnx(weights)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count()
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    fx = np.load(os.path.join(ROOT, "tests", "fixtures", "srgan_tf.npz"))
    x = (fx["input_cat"].astype(np.float32) / 255).transpose(2, 0, 1)[None]
    y = sess.run(["y"], {"x": x})[0][0].transpose(1, 2, 0)
    print("ONNX Runtime %s vs TensorFlow fixture: max |Δ| %.1e on [0, 1]" % (ort.__version__, np.abs(y - fx["pre_cat"]).max()))
    print("%-8s %16s %22s %8s" % ("input", "ORT s (SRResNet)", "Tessera s (per net)", "T / ORT"))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, Daemon(os.path.join(tmp, "rt"), env={"TESSERA_MODEL_DIR": store}) as d, d.client() as c:
        for side in (int(s) for s in args.sizes.split(",")):
            img = rng.random((1, 3, side, side), dtype=np.float32)
            best_ort = min(_timed(lambda: sess.run(["y"], {"x": img})) for _ in range(args.repeat))
            buf = c.alloc(side, side, 3, sample="f32")
            np.frombuffer(buf.view, np.float32)[:] = img[0].transpose(1, 2, 0).ravel()
            best_t = float("inf")
            for _ in range(args.repeat):
                job = c.submit("srgan-pair", 4, buf, output_sample="f32")
                for layer in job.wait(timeout=3600):
                    c.release(layer)
                best_t = min(best_t, job.seconds / 2)
            c.release(buf)
            print("%-8s %16.2f %22.2f %8.2f" % ("%d²" % side, best_ort, best_t, best_t / best_ort))
    print("binaries: %s, %d threads" % (bin_dir(), os.cpu_count()))


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
