"""Dev-only: writes tests/fixtures/tiny_rrdbnet.pth, a one-block RRDBNet ×4 (4 features, growth
2) in PyTorch's checkpoint format, the way Real-ESRGAN's releases are saved:
`torch.save({"params_ema": state_dict})`, a zip holding `data.pkl` (protocol-2 pickle whose
tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`
with storages as persistent ids) and one raw little-endian file per storage.

PyTorch is not needed (nor installable here without gigabytes of CUDA wheels): the pickler
below emits the same opcodes for the same objects. Element j of the i-th tensor (BasicSR
order, weight then bias per convolution) is ((i * 7 + j) % 23 - 11) / 64, which the Rust test
(host/src/models/convert.rs) recomputes.

    python3 installer/dev/tiny_rrdbnet_pth.py tests/fixtures/tiny_rrdbnet.pth
"""

import collections
import io
import pickle
import struct
import sys
import types
import zipfile

# Stand-ins that pickle by reference exactly as torch's own objects do.
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")


class FloatStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise NotImplementedError


FloatStorage.__module__ = "torch"
_rebuild_tensor_v2.__module__ = "torch._utils"
torch.FloatStorage = FloatStorage
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


class Storage:
    def __init__(self, key, values):
        self.key, self.values = key, values


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return _rebuild_tensor_v2, (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict())


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", len(obj.values))
        return None


def convs(num_block, feat, grow):
    out = [("conv_first", feat, 3)]
    for b in range(num_block):
        for r in (1, 2, 3):
            for c in range(1, 6):
                out.append(("body.%d.rdb%d.conv%d" % (b, r, c), grow if c < 5 else feat, feat + grow * min(c - 1, 4)))
    out += [("conv_body", feat, feat), ("conv_up1", feat, feat), ("conv_up2", feat, feat), ("conv_hr", feat, feat), ("conv_last", 3, feat)]
    return out


def main(path):
    state, storages = collections.OrderedDict(), []
    i = 0
    for name, o, c in convs(1, 4, 2):
        for suffix, shape in (("weight", [o, c, 3, 3]), ("bias", [o])):
            n = 1
            for d in shape:
                n *= d
            values = [((i * 7 + j) % 23 - 11) / 64 for j in range(n)]
            storage = Storage(str(len(storages)), values)
            storages.append(storage)
            state["%s.%s" % (name, suffix)] = Tensor(storage, shape)
            i += 1
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"params_ema": state})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("tiny_rrdbnet/data.pkl", buf.getvalue())
        for s in storages:
            z.writestr("tiny_rrdbnet/data/" + s.key, struct.pack("<%df" % len(s.values), *s.values))
        z.writestr("tiny_rrdbnet/version", "3\n")
        z.writestr("tiny_rrdbnet/byteorder", "little")
    print("wrote", path, len(storages), "tensors")


if __name__ == "__main__":
    main(sys.argv[1])
