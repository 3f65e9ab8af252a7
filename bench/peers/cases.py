"""The four model families of the peer bench, each with its data and its quality metric.

A ``Case`` carries what every entry, regc's or a peer's, needs:
    module, example_inputs, dynamic_shapes, input/output names   the fp32 torch model (deep-copied per entry)
    calib   {input: array}, labels                               calibration (and fine-tune) samples
    eval_feed / labels                                           the held-out quality inputs
    latency_feed                                                 the one batch every latency is timed on
Quality is measured from a ``predict(feed) -> output array`` callable, so onnxruntime sessions and torch
modules are scored by the same code:
    accuracy   top-1 = mean(argmax_c y[i, c] == label[i])                            (digits, ResNet)
    cosine     mean_i cos(y_i, y_i^fp32) = y . y' / (|y| |y'|), per sentence or per real token
               (attention_mask == 1), y^fp32 being the fp32 ONNX model's output      (MiniLM, BERT)
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from regc.zoo import SENTENCES, bert_encoder, digits_cnn, digits_data, minilm, minilm_tokenize, resnet18_style

Predict = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclasses.dataclass
class Case:
    name: str
    metric: str  # "accuracy" | "cosine"
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_shapes: Any
    input_names: list[str]
    output_names: list[str]
    calib: dict[str, np.ndarray]
    calib_labels: np.ndarray | None
    eval_feed: dict[str, np.ndarray]
    eval_labels: np.ndarray | None
    latency_feed: dict[str, np.ndarray]
    cnn: bool  # has BatchNorm to fold before regc's passes
    transformer: bool
    train_steps: int  # fine-tune steps for passes that train (issp)
    setup_s: float = 0.0  # building (and for digits/ResNet, training) the fp32 model
    reference: np.ndarray | None = None  # fp32 outputs on eval_feed, set by the runner
    options: dict[str, str] = dataclasses.field(default_factory=dict)  # per-pass option overrides
    skip: dict[str, str] = dataclasses.field(default_factory=dict)  # entry -> why this bench leaves it out

    def fresh_module(self) -> torch.nn.Module:
        return copy.deepcopy(self.module).eval()

    def quality(self, predict: Predict) -> tuple[float, float]:
        """(mean, worst-sample) quality of ``predict`` on ``eval_feed``: accuracy or cosine to fp32."""
        y = np.asarray(predict(self.eval_feed), dtype=np.float64)
        if self.metric == "accuracy":
            hit = (y.argmax(-1) == self.eval_labels).astype(np.float64)
            return float(hit.mean()), float(hit.mean())
        ref = self.reference
        cos = (y * ref).sum(-1) / (np.linalg.norm(y, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)
        if cos.ndim == 2:  # per token: keep the real (unpadded) ones
            cos = cos[self.eval_feed["attention_mask"].astype(bool)]
        return float(cos.mean()), float(cos.min())


def _train(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0) -> None:
    """Adam with a cosine-decayed lr on random batches of 64: a quick, seeded fit."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    module.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(module(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    module.eval()


def digits(quick: bool) -> Case:
    """The zoo's digits CNN (trained by ``digits_cnn()``, ~2 s), 1x8x8 images, test accuracy on 360."""
    t0 = time.perf_counter()
    z, d = digits_cnn(), digits_data()
    n_cal = 64 if quick else 128
    return Case("digits_cnn", "accuracy", z.module, z.example_inputs, z.dynamic_shapes, z.input_names,
                z.output_names, {"image": d.x_train[:n_cal].numpy()}, d.y_train[:n_cal].numpy(),
                {"image": d.x_test.numpy()}, d.y_test.numpy(), {"image": d.x_test[:64].numpy()},
                cnn=True, transformer=False, train_steps=30 if quick else 100,
                setup_s=time.perf_counter() - t0)


def resnet(quick: bool) -> Case:
    """``resnet18_style(width=8)`` trained here on the digits as 3x8x8 (the gray channel repeated)."""
    t0 = time.perf_counter()
    z, d = resnet18_style(width=8), digits_data()
    x_train, x_test = d.x_train.repeat(1, 3, 1, 1), d.x_test.repeat(1, 3, 1, 1)
    _train(z.module, x_train, d.y_train, 40 if quick else 120)
    n_cal = 64 if quick else 128
    batch = torch.export.Dim("batch")
    return Case("resnet18_style", "accuracy", z.module, (x_train[:8],), {"x": {0: batch}}, z.input_names,
                z.output_names, {"x": x_train[:n_cal].numpy()}, d.y_train[:n_cal].numpy(),
                {"x": x_test.numpy()}, d.y_test.numpy(), {"x": x_test[:16].numpy()},
                cnn=True, transformer=False, train_steps=20 if quick else 60,
                setup_s=time.perf_counter() - t0)


def _token_batch(n: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids with a random real length per row in [seq/2, seq], padding (id 0) after it."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, seq)).astype(np.int64)
    mask = (np.arange(seq)[None, :] < rng.integers(seq // 2, seq + 1, size=(n, 1))).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def bert(quick: bool) -> Case:
    """The zoo's BERT-style encoder (random init, 2 layers, hidden 64) on random token batches;
    quality = per-token cosine of ``last_hidden_state`` to fp32."""
    t0 = time.perf_counter()
    z = bert_encoder()
    calib = _token_batch(32 if quick else 64, 32, 1000, seed=1)
    return Case("bert_encoder", "cosine", z.module, z.example_inputs, z.dynamic_shapes, z.input_names,
                z.output_names, calib, None, _token_batch(64, 32, 1000, seed=2), None,
                _token_batch(8, 32, 1000, seed=3), cnn=False, transformer=True,
                train_steps=20 if quick else 60, setup_s=time.perf_counter() - t0)


def minilm_case(quick: bool) -> Case:
    """Pretrained all-MiniLM-L6-v2: calibration on SENTENCES[:16], quality = embedding cosine to fp32 on
    all 32 sentences (16 of them held out), latency on a batch of 8 sentences (32 tokens)."""
    t0 = time.perf_counter()
    z = minilm()
    ids, mask = (t.numpy() for t in minilm_tokenize(SENTENCES))
    n_cal = 8 if quick else 16
    # quant's per-layer sweep and speed check time one model run per layer: on 36 linears of a loaded
    # 2-core machine that is minutes, so the bench keeps them short here.
    opts = {"quant": "calib_samples=16,sweep_samples=2,speed_check=false"}
    return Case("minilm", "cosine", z.module, z.example_inputs, z.dynamic_shapes, z.input_names,
                z.output_names, {"input_ids": ids[:n_cal], "attention_mask": mask[:n_cal]}, None,
                {"input_ids": ids, "attention_mask": mask}, None,
                {"input_ids": ids[8:16], "attention_mask": mask[8:16]}, cnn=False, transformer=True,
                train_steps=10 if quick else 20, setup_s=time.perf_counter() - t0, options=opts,
                skip={"regc:eqnet": "eqnet's supernet training and subnet search on the 22M-parameter MiniLM "
                                    "take longer than this bench's whole budget"})


CASES: dict[str, Callable[[bool], Case]] = {
    "digits_cnn": digits, "resnet18_style": resnet, "bert_encoder": bert, "minilm": minilm_case,
}
