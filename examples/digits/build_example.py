"""Build the README's bundled example: a small CNN trained on scikit-learn's 8x8 digits, as ONNX.

    python examples/digits/build_example.py --out digits

writes, into the --out folder:
    digits_cnn.onnx  input "image" (batch, 1, 8, 8) float32 -> output "logits" (batch, 10)
    calib.npz        64 training images for calibration: "image" (64, 1, 8, 8) float32, "labels" int64
    test.npz         the 360-image test split, same keys
Training is deterministic: every run writes the same weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from regc.zoo import accuracy, digits_cnn, digits_data

CALIB_SIZE = 64


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the files into")
    out: Path = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)

    zm = digits_cnn()
    data = digits_data()
    onnx_path = out / "digits_cnn.onnx"
    torch.onnx.export(zm.module, zm.example_inputs, onnx_path, dynamo=True, external_data=False,
                      input_names=zm.input_names, output_names=zm.output_names,
                      dynamic_shapes=zm.dynamic_shapes, verbose=False)
    calib = slice(0, CALIB_SIZE)
    np.savez(out / "calib.npz", image=data.x_train[calib].numpy(), labels=data.y_train[calib].numpy())
    np.savez(out / "test.npz", image=data.x_test.numpy(), labels=data.y_test.numpy())

    print(f"wrote {onnx_path}  (input 'image' [batch, 1, 8, 8] float32 -> 'logits' [batch, 10])")
    print(f"wrote {out / 'calib.npz'}  ({CALIB_SIZE} calibration images)")
    print(f"wrote {out / 'test.npz'}  ({len(data.y_test)} test images)")
    print(f"test accuracy: {accuracy(zm.module, data.x_test, data.y_test):.2%}")


if __name__ == "__main__":
    main()
