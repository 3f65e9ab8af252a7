"""eqnet: EQ-Net elastic quantization (Xu et al., ICCV 2023; TECHNIQUES.md section 5).

1. Supernet: every conv/linear gets an elastic LSQ+ weight quantizer and an input quantizer with one
   shared float weight and separate learnable (s, beta) per bit-width 2..8, symmetry and (weights)
   granularity (``_eqnet_quant``, ``_eqnet_supernet``).
2. Training through ``regc.train.fit``: each step the sandwich H (highest bits), ``random_subnets`` x R
   and L (lowest bits) run on the batch; the task loss is the plain sandwich sum of cross-entropies or,
   with ``gpg``, the progressive chain CE(H) + sum lambda KL(prev || next) + (1 - lambda) CE(next)
   (``_eqnet_losses``); ``wdr`` adds mean_l(Skew^2 + 0.015 (Kurt - 1.8)^2) of the float weights (all
   but the first layer), the ``regularize{kind=wdr}`` math; gradients are clipped by value.
3. CQAP: ``predictor_samples`` random subnets are measured (BN recalibrated per subnet on
   ``calib_samples`` training samples, accuracy on ``eval_samples`` others; labels, or the float model's
   argmax without labels), an MLP predictor is fit on all but the ``holdout`` fraction and its Kendall
   tau / Pearson r on the held-out subnets are reported (``_eqnet_predictor``).
4. Genetic search for the best predicted subnet whose average weight and activation bits lie in
   (avg_bits - budget_window, avg_bits] (``_eqnet_search``); its accuracy is then measured.
5. Lowering: the chosen subnet's BN statistics are recalibrated and the graph gets int8 weight codes
   (4 bits or fewer packed two per byte) read through dequantize nodes, and exact elementwise
   quantize-dequantize ops on each layer input; the float graph elsewhere is unchanged.

The chosen per-layer bit-widths, conditions, averages, predictor quality and uniform-bit accuracies
are in the stats.

Defaults that differ from the paper's ImageNet setup (chosen for small models and data): predictor
depth 3 (code: 7 layers of 200) trained full-batch with Adam lr 1e-3 for 500 steps on 300 subnets (paper:
8000 subnets, 100 epochs, lr 4e-4); 100 search generations (paper: 500) from repaired uniform draws
(paper: Monte-Carlo draws conditioned on the average bit). Not copied from the official code: the
|beta| of its gradient scaling, its per-channel gradient scale, its asymmetry flags never set in the
predictor encoding, per-layer conditions while training, and 'arch_mutate_prob' shadowing mutate_prob.
Training uses ``ctx.train`` or Adam lr 1e-3, cosine, batch 256, 120 epochs on ``ctx.data``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from regc._train_data import open_source
from regc.errors import ConfigError
from regc.ir import Model
from regc.passes import _reg_math as rm
from regc.passes._eqnet_losses import sandwich_loss
from regc.passes._eqnet_predictor import encode, kendall_tau, pearson, train_predictor
from regc.passes._eqnet_quant import BITS
from regc.passes._eqnet_search import evolve
from regc.passes._eqnet_supernet import Space, Supernet
from regc.passes._quant_layers import find_layers
from regc.registry import PassContext, PassResult, Phase, check_choice, check_range, register_pass
from regc.train import Batch, TrainPlan, TrainSpec, fit, spec_for
from regc.verify import refresh_meta

__all__ = ["EqnetConfig", "EvalData", "build_supernet", "train_supernet", "eval_data"]


@dataclasses.dataclass(frozen=True)
class EqnetConfig:
    """Options for `eqnet`.

    Attributes:
        bits: the elastic bit-widths, ':'-separated, each in [2, 8].
        weights: elastic weight granularities: per_tensor and/or per_channel.
        weight_sym: elastic weight symmetries: sym and/or asym.
        act_sym: elastic activation symmetries: sym and/or asym.
        fix_ends: keep the first and last conv/linear at 8/8 bits (outside the search and the averages).
        wdr: add the weight distribution regularizer (skewness and kurtosis) to the loss.
        wdr_strength: weight of the WDR term, >= 0.
        kurt_weight: weight of the kurtosis part of WDR against the skewness part, >= 0.
        kurtosis_target: WDR's target kurtosis K_T (1.8 = uniform), > 0.
        gpg: progressive KL guidance between sandwich subnets (else plain summed cross-entropies).
        gpg_lambda: lambda, the KL share of each non-top subnet's loss, in [0, 1].
        temperature: softmax temperature of the KL terms, > 0.
        random_subnets: random subnets between the highest and lowest per step, >= 0.
        grad_clip_value: clip every gradient element to [-v, v]; 0 = off.
        calib_samples: training samples for quantizer init and per-subnet BN recalibration, >= 1.
        eval_samples: further training samples on which subnets are measured, >= 1.
        predictor_samples: measured random subnets for the accuracy predictor, >= 4.
        holdout: fraction of those kept out of predictor training to report its Kendall tau, in (0, 1).
        predictor_hidden: predictor MLP width, >= 1.
        predictor_depth: predictor hidden layers, >= 1.
        predictor_epochs: full-batch Adam steps of the predictor, >= 1.
        predictor_lr: predictor learning rate, > 0.
        avg_bits: budget c: average weight and activation bits of the elastic layers must be <= c.
        budget_window: and > c - budget_window, > 0.
        population: genetic search population, >= 2.
        generations: genetic search generations, >= 0.
        mutate_prob: probability that mutation redraws a gene, in [0, 1] (0.3: the value the official
            search script passes; its EvolutionFinder reads 'arch_mutate_prob', default 0.1, instead).
    """

    bits: tuple[int, ...] = BITS
    weights: tuple[str, ...] = ("per_tensor", "per_channel")
    weight_sym: tuple[str, ...] = ("sym", "asym")
    act_sym: tuple[str, ...] = ("sym", "asym")
    fix_ends: bool = True
    wdr: bool = True
    wdr_strength: float = 1.0
    kurt_weight: float = 0.015
    kurtosis_target: float = 1.8
    gpg: bool = True
    gpg_lambda: float = 0.5
    temperature: float = 1.0
    random_subnets: int = 1
    grad_clip_value: float = 1.0
    calib_samples: int = 256
    eval_samples: int = 512
    predictor_samples: int = 300
    holdout: float = 0.2
    predictor_hidden: int = 200
    predictor_depth: int = 3
    predictor_epochs: int = 500
    predictor_lr: float = 1e-3
    avg_bits: float = 4.0
    budget_window: float = 0.5
    population: int = 100
    generations: int = 100
    mutate_prob: float = 0.3

    def __post_init__(self):
        if not self.bits:
            raise ConfigError("eqnet.bits is empty: give bit-widths in [2, 8], e.g. bits=2:4:8")
        for b in self.bits:
            if not isinstance(b, int) or not 2 <= b <= 8:
                raise ConfigError(f"eqnet.bits must be integers in [2, 8], got {b!r}")
        for key, allowed in (("weights", ("per_tensor", "per_channel")), ("weight_sym", ("sym", "asym")),
                             ("act_sym", ("sym", "asym"))):
            if not getattr(self, key):
                raise ConfigError(f"eqnet.{key} is empty: give one or both of {':'.join(allowed)}")
            for v in getattr(self, key):
                check_choice("eqnet", key, v, allowed)
        inf = math.inf
        for key, lo, hi in (("wdr_strength", 0, inf), ("kurt_weight", 0, inf), ("gpg_lambda", 0, 1),
                            ("random_subnets", 0, inf), ("grad_clip_value", 0, inf),
                            ("calib_samples", 1, inf), ("eval_samples", 1, inf),
                            ("predictor_samples", 4, inf), ("predictor_hidden", 1, inf),
                            ("predictor_depth", 1, inf), ("predictor_epochs", 1, inf), ("population", 2, inf),
                            ("generations", 0, inf), ("mutate_prob", 0, 1), ("avg_bits", 2, 8)):
            check_range("eqnet", key, getattr(self, key), lo, hi)
        for key in ("kurtosis_target", "temperature", "predictor_lr", "budget_window"):
            check_range("eqnet", key, getattr(self, key), 0, inf, lo_open=True)
        check_range("eqnet", "holdout", self.holdout, 0, 1, lo_open=True, hi_open=True)
        if self.avg_bits < min(self.bits):
            raise ConfigError(f"eqnet.avg_bits={self.avg_bits} is below the lowest elastic bit-width "
                              f"{min(self.bits)}: raise avg_bits or add lower bits")

    def space(self) -> Space:
        return Space(self.bits, [w == "per_channel" for w in self.weights],
                     [s == "sym" for s in self.weight_sym],
                     [s == "sym" for s in self.act_sym])


@dataclasses.dataclass
class EvalData:
    """Calibration batches (quantizer init, BN recalibration), evaluation batches and their labels."""

    calib: list[tuple[torch.Tensor, ...]]
    batches: list[tuple[torch.Tensor, ...]]
    labels: torch.Tensor


def eval_data(model: Model, spec: TrainSpec, calib_samples: int, eval_samples: int) -> EvalData:
    """The first ``calib_samples`` samples of the training source for calibration and the next
    ``eval_samples`` for evaluation (all of them when fewer remain); batches are merged when the batch
    dimension is dynamic. Without labels, the float model's argmax is the label."""
    source = open_source(spec.data, model, spec.batch_size, spec.seed, 0, 1)
    calib, rest, n_c, n_e = [], [], 0, 0
    for raw in source.epoch(0):
        n = raw.inputs[0].shape[0]
        if n_c < calib_samples:
            calib.append(raw)
            n_c += n
        elif n_e < eval_samples:
            rest.append(raw)
            n_e += n
        else:
            break
    rest = rest or calib
    with torch.no_grad():
        first = model.run(*rest[0].inputs)[0]
    if first.dim() != 2:
        raise ConfigError(f"eqnet ranks subnets by top-1 accuracy, so the model's first output must be "
                          f"(batch, classes) logits; it is {tuple(first.shape)}. For encoders without a "
                          "classifier head use quant or rf8, or add the head before eqnet")
    labels = []
    for raw in rest:
        if raw.labels is None:
            with torch.no_grad():
                out = first if raw is rest[0] else model.run(*raw.inputs)[0]
            labels.append(out.argmax(-1))
        elif raw.labels.is_floating_point():
            raise ConfigError("eqnet measures subnets by top-1 accuracy and needs integer class labels "
                              f"(got {raw.labels.dtype}); give class labels or no labels (then the float "
                              "model's argmax is used)")
        else:
            labels.append(raw.labels.reshape(-1).long())
    dynamic = 0 in model.dynamic_dims(model.input_names[0])

    def merge(raws):
        if dynamic:
            return [tuple(torch.cat(t) for t in zip(*(r.inputs for r in raws), strict=True))]
        return [r.inputs for r in raws]

    return EvalData(merge(calib), merge(rest), torch.cat(labels))


def build_supernet(model: Model, config: EqnetConfig, data: EvalData) -> Supernet:
    """Elastic quantizers on every conv/linear of ``model`` (not yet in the graph)."""
    refresh_meta(model)
    layers = [q for q in find_layers(model)[0] if q.kind != "embedding"]
    if not layers:
        raise ConfigError("eqnet: the model has no conv/linear layer to quantize")
    if config.fix_ends and len(layers) < 3:
        raise ConfigError(f"eqnet: fix_ends=true keeps the first and last of the {len(layers)} conv/linear "
                          "layers at 8 bits, which leaves nothing elastic: set fix_ends=false")
    return Supernet(model, layers, config.space(), config.fix_ends, data.calib[0])


class _Sampler:
    """The generator of subnet draws (checkpointed with the run)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rng": self.g.get_state()}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        self.g.set_state(d["rng"])


def train_supernet(sn: Supernet, config: EqnetConfig, spec: TrainSpec) -> dict[str, Any]:
    """Install ``sn`` in the graph and train it by the sandwich rule through ``regc.train.fit``."""
    model = sn.model
    sampler = _Sampler(spec.seed)
    first = next(iter(open_source(spec.data, model, spec.batch_size, spec.seed, 0, 1).epoch(0)))
    teacher = model.clone() if first.labels is None else None  # labels = the float model's argmax
    sn.install()
    plan = TrainPlan()

    def task(m: Model, b: Batch) -> torch.Tensor:
        y = b.labels
        if y is None:
            with torch.no_grad():
                y = teacher.run(*b.inputs)[0].argmax(-1)
        chain = [b.output]
        for kind in ["random"] * config.random_subnets + ["min"]:
            sn.set(sn.sample(kind, sampler.g))
            chain.append(b.forward(*b.inputs)[0])
        return sandwich_loss(chain, y.reshape(-1).long(), config.gpg, config.gpg_lambda, config.temperature)

    plan.set_task_loss("eqnet_sandwich", task)
    plan.add_after_step("eqnet_next_top", lambda m, st: sn.set(sn.sample("max", sampler.g)))
    plan.add_state("eqnet_sampler", sampler)
    targets = [q.weight for q in sn.layers[1:]]
    if config.wdr and targets:
        plan.add_loss("wdr", lambda m, b: rm.wdr([m.get_tensor(t) for t in targets], config.kurtosis_target,
                                                 config.kurt_weight), weight=config.wdr_strength)
    if config.grad_clip_value > 0:
        params = [p for p in model.gm.parameters() if p.requires_grad]
        plan.add_before_step("eqnet_clip_value",
                             lambda m, st: torch.nn.utils.clip_grad_value_(params, config.grad_clip_value))
    sn.set(sn.sample("max", sampler.g))
    return fit(model, spec, plan)


def _predictor(sn: Supernet, config: EqnetConfig, data: EvalData, g: torch.Generator, seed: int):
    cfgs = [sn.sample("random", g) for _ in range(config.predictor_samples)]
    acc = torch.tensor([sn.accuracy(c, data.calib, data.batches, data.labels) for c in cfgs])
    x = encode(cfgs, sn.free)
    n_test = min(max(2, round(config.holdout * len(cfgs))), len(cfgs) - 2)
    net = train_predictor(x[:-n_test], acc[:-n_test], config.predictor_hidden, config.predictor_depth,
                          config.predictor_epochs, config.predictor_lr, seed)
    with torch.no_grad():
        pred = net(x[-n_test:])
    quality = {"samples": len(cfgs), "heldout": n_test, "kendall_tau": kendall_tau(pred, acc[-n_test:]),
               "pearson": pearson(pred, acc[-n_test:]),
               "accuracy_range": [float(acc.min()), float(acc.max())]}
    return net, quality


def _clean(v: float) -> float | None:
    return None if not math.isfinite(v) else round(v, 4)


@register_pass("eqnet", EqnetConfig, phase=Phase.QUANT, exact=False)
def eqnet(model: Model, config: EqnetConfig, ctx: PassContext) -> PassResult:
    """Train an elastic-quantization supernet, search a mixed-precision subnet under a bit budget with an
    accuracy predictor, and lower it to integer weights."""
    spec = spec_for(ctx, "eqnet", optimizer="adam", lr=1e-3, schedule="cosine", batch_size=256, epochs=120)
    bytes_before = model.weight_bytes()
    data = eval_data(model, spec, config.calib_samples, config.eval_samples)
    with torch.no_grad():
        pred = torch.cat([model.run(*xs)[0].argmax(-1) for xs in data.batches])
    float_acc = float((pred == data.labels).float().mean())
    sn = build_supernet(model, config, data)
    summary = train_supernet(sn, config, spec)
    g = torch.Generator().manual_seed(ctx.seed + 1)
    net, quality = _predictor(sn, config, data, g, ctx.seed)
    best, predicted, window_met = evolve(
        sn, lambda cs: net(encode(cs, sn.free)), config.avg_bits, config.budget_window, config.population,
        config.generations, config.mutate_prob, g)
    uniform = {str(b): sn.accuracy(sn.uniform(b, best.w_channel, best.w_sym, best.a_sym), data.calib,
                                   data.batches, data.labels) for b in sn.space.bits}
    measured = sn.accuracy(best, data.calib, data.batches, data.labels)  # leaves ``best`` set, recalibrated
    layers = sn.lower(best)
    w_avg, a_avg = sn.avg_bits(best)
    train = {k: v for k, v in summary.items() if k not in ("history", "spec")}
    stats = {
        "config": best.to_dict(), "layers": layers,
        "avg_bits": {"weights": round(w_avg, 4), "acts": round(a_avg, 4), "budget": config.avg_bits,
                     "window": config.budget_window, "window_met": window_met},
        "accuracy": {"float": float_acc, "searched": measured, "predicted": _clean(predicted),
                     "uniform_bits": uniform, "samples": int(data.labels.numel())},
        "predictor": {k: (_clean(v) if isinstance(v, float) else v) for k, v in quality.items()},
        "weight_bytes": {"before": bytes_before, "after": model.weight_bytes()},
        "train": train,
    }
    return PassResult(model, True, stats)
