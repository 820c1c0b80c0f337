"""The original Keras loops, run in their own environment (`make bench` calls this file there).

extract: per image, keras load_img at 299 px, img_to_array, InceptionV3's preprocess_input,
model.predict on a batch of one, global average pooling of the 8x8x2048 maps, as the original work
extracted its bottleneck features. InceptionV3 has random weights (weights=None): the ImageNet file
would be a download, and the weights do not change the arithmetic.
head: the original bottleneck head (1x1 Conv2D 64, BatchNorm, ReLU, Dropout, Flatten, Dense softmax)
trained with model.fit on 8x8x2048 maps, batch 64; steady-state time per sample and epoch, as
benchmarks/run.py measures ours ((4 epochs - 1 epoch) / 3). Each prints one JSON line.

    python keras_loop.py extract IMAGE... [--warmup N]
    python keras_loop.py head [--samples N]
"""

from __future__ import annotations

import json
import os
import sys
import time


def head(samples: int = 2048) -> dict:
    import numpy as np
    from tensorflow import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 8, 8, 2048)).astype(np.float32)
    y = rng.integers(0, 4, samples)
    model = keras.Sequential([keras.Input((8, 8, 2048)), keras.layers.Conv2D(64, 1, use_bias=False),
                              keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Dropout(0.5),
                              keras.layers.Flatten(), keras.layers.Dense(4, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    seconds = {}
    for epochs in (1, 1, 4):  # the first fit builds the training function and is overwritten
        start = time.perf_counter()
        model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
        seconds[epochs] = time.perf_counter() - start
    return {"samples": samples, "us_per_sample_per_epoch": round((seconds[4] - seconds[1]) / (3 * samples) * 1e6, 1),
            "loop": "Conv2D(64, 1x1) + BN + ReLU + Dropout + Flatten + Dense, model.fit, batch 64"}


def main(argv: list[str]) -> None:
    what, argv = argv[0], argv[1:]
    if what == "head":
        print(json.dumps(head(int(argv[argv.index("--samples") + 1]) if "--samples" in argv else 2048) | _versions()))
        return
    warmup = 3
    if "--warmup" in argv:
        i = argv.index("--warmup")
        warmup, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    paths = argv
    import numpy as np
    from tensorflow import keras

    model = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(299, 299, 3))
    prep = keras.applications.inception_v3.preprocess_input

    def one(path: str) -> np.ndarray:
        img = keras.utils.load_img(path, target_size=(299, 299))
        x = prep(np.expand_dims(keras.utils.img_to_array(img), 0))
        return model.predict(x, verbose=0).mean(axis=(1, 2))

    for p in paths[:warmup]:  # graph building and the first allocations are not the loop's rate
        one(p)
    start = time.perf_counter()
    for p in paths:
        one(p)
    seconds = time.perf_counter() - start
    print(json.dumps({"images": len(paths), "seconds": round(seconds, 2), "images_per_s": round(len(paths) / seconds, 2),
                      "loop": "load_img -> img_to_array -> preprocess_input -> InceptionV3.predict (batch 1) -> mean"}
                     | _versions()))


def _versions() -> dict:
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "keras": tf.keras.__version__,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()}


if __name__ == "__main__":
    main(sys.argv[1:])
