"""regc: a compiler for model compression.

    m = regc.load("model.onnx")                 # or regc.capture(module, example_inputs)
    m = regc.compress(m, "fold_bn,prune{ratio=0.3}", data=calib)
    m.save("out/model.onnx")
    art = regc.lower(m, "x86_64")               # art.save(folder)
"""

from regc import train  # regc.train.TrainSpec without a separate import
from regc.api import capture, load, lower
from regc.data import Dataset, load_npz
from regc.errors import *  # noqa: F403
from regc.errors import __all__ as _errors_all
from regc.ir import Model
from regc.opclass import OpClass, op_class
from regc.pipeline import Pipeline, compress, parse_pipeline
from regc.registry import PassContext, PassResult, Phase, register_pass
from regc.train import TrainSpec, fit

__all__ = [
    "Model", "capture", "load", "lower", "compress", "Pipeline", "parse_pipeline", "register_pass",
    "PassResult", "PassContext", "Phase", "OpClass", "op_class", "Dataset", "load_npz",
    "train", "TrainSpec", "fit", *_errors_all,
]
