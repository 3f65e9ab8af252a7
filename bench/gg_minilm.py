"""GG priors on pretrained all-MiniLM-L6-v2: the fitted GG shape per weight tensor and globally (with KS
distances of GG, Gaussian and Laplace fits), then DeepShape on the encoder weights and a short
distillation recovery, measured against the original model in the same run.

    python bench/gg_minilm.py [--out bench/results/gg_minilm.json] [--steps 600] [--lr 1e-4]
                              [--sentences 2048]

Recovery distills (MSE to the original model's embeddings, dropout off) on unlabeled sentences taken
from Python standard-library docstrings plus halves of two ``SENTENCES`` joined, and is scored on the
32 real ``regc.zoo.SENTENCES`` (cosine of the sentence embeddings to the original model's).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import regc
import regc.passes  # noqa: F401  (registers the passes)
from regc.passes import _gg_math as gg
from regc.passes._reg_layers import matching_params
from regc.train import TrainSpec, fit
from regc.zoo import SENTENCES, minilm, minilm_tokenize

_DOC_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email.message", "fractions",
                "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "pathlib",
                "pickletools", "random", "shutil", "statistics", "string", "subprocess", "tarfile",
                "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile")


def training_sentences(n: int, seed: int = 0) -> list[str]:
    """Unlabeled English for distillation, disjoint from the scored SENTENCES: sentences from the
    docstrings of a fixed set of Python standard-library modules, plus halves of two SENTENCES joined."""
    import importlib
    import inspect
    import re

    rng = random.Random(seed)
    found: list[str] = []
    for name in _DOC_MODULES:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""] + [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(mod)
                                               if inspect.isfunction(obj) or inspect.isclass(obj)]
        for doc in docs:
            for sent in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 6 <= len(sent.split()) <= 24 and sent[0].isupper() and not re.search(r"[>{}\[\]=_]", sent):
                    found.append(sent)
    found = sorted(set(found) - set(SENTENCES))
    rng.shuffle(found)
    words = [s.rstrip(".?!").split() for s in SENTENCES]
    joined = []
    for _ in range(n // 4):
        a, b = rng.sample(words, 2)
        joined.append(" ".join(a[: len(a) // 2] + b[len(b) // 2:]) + ".")
    return found[: n - len(joined)] + joined


def cosine(model: regc.Model, ref: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        c = F.cosine_similarity(model(ids, mask), ref)
    return {"mean": float(c.mean()), "min": float(c.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gg_minilm.json"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sentences", type=int, default=2048, help="distillation sentences")
    ap.add_argument("--layers", default="bert.encoder.*", help="deepshape layers pattern")
    args = ap.parse_args()
    t_start = time.perf_counter()
    zm = minilm()
    base = regc.capture(zm.module, zm.example_inputs, dynamic_shapes=zm.dynamic_shapes,
                        input_names=zm.input_names, output_names=zm.output_names)
    ids, mask = minilm_tokenize(SENTENCES)
    with torch.no_grad():
        ref = base(ids, mask)

    t0 = time.perf_counter()
    _, rec = regc.parse_pipeline("gg_fit").run(base, regc.PassContext(), verify=False)
    fit_stats = rec[0]["stats"]
    layers = fit_stats["layers"]
    gg_best = sum(v["ks"]["gg"] <= min(v["ks"]["gaussian"], v["ks"]["laplace"]) for v in layers.values())
    fit_seconds = time.perf_counter() - t0
    print(f"global nu {fit_stats['global']['nu']:.2f}  KS gg/gauss/laplace "
          f"{fit_stats['global']['ks']['gg']:.4f}/{fit_stats['global']['ks']['gaussian']:.4f}/"
          f"{fit_stats['global']['ks']['laplace']:.4f}; GG best in {gg_best}/{len(layers)} tensors")

    shaped = base.clone()
    t0 = time.perf_counter()
    shaped, rec = regc.parse_pipeline(f"deepshape{{layers={args.layers}}}").run(shaped, regc.PassContext(),
                                                                                verify=False)
    ds_stats = rec[0]["stats"]
    ds_seconds = time.perf_counter() - t0
    cos_shaped = cosine(shaped, ref, ids, mask)
    print(f"deepshape nu {ds_stats['nu_before']:.2f} -> {ds_stats['nu_after']:.2f} (target "
          f"{ds_stats['nu_target']:.2f}), alpha {ds_stats['alpha_before']:.4f} -> "
          f"{ds_stats['alpha_after']:.4f} (target {ds_stats['alpha_target']:.4f}); "
          f"cosine {cos_shaped['mean']:.4f}")

    train_text = training_sentences(args.sentences)
    gi, gm = minilm_tokenize(train_text, max_len=32)
    spec = TrainSpec(data=regc.Dataset({"input_ids": gi, "attention_mask": gm}), loss="distill", lr=args.lr,
                     batch_size=args.batch, steps=args.steps, schedule="cosine", train_mode=False)
    summary = fit(shaped, spec, teacher=base)
    cos_rec = cosine(shaped, ref, ids, mask)
    chosen = [shaped.get_tensor(t).detach() for _, t in matching_params(shaped, (args.layers,))]
    w = torch.cat([t.reshape(-1) for t in chosen if t.dim() >= 2])
    nu_rec = gg.estimate(w, center=True)
    print(f"recovery {args.steps} steps ({summary['seconds']:.0f} s): cosine {cos_rec['mean']:.4f} "
          f"(min {cos_rec['min']:.4f}), nu {nu_rec['nu']:.2f}")
    out = {
        "benchmark": "gg_minilm",
        "gg_fit": {"global": fit_stats["global"], "layers": layers, "gg_best_ks_tensors": gg_best,
                   "tensors": len(layers), "seconds": fit_seconds},
        "deepshape": {"layers": args.layers, **ds_stats, "seconds": ds_seconds},
        "baseline": {"model": "original all-MiniLM-L6-v2", "cosine": 1.0},
        "cosine_after_deepshape": cos_shaped,
        "recovery": {"steps": args.steps, "lr": args.lr, "batch": args.batch, "seconds": summary["seconds"],
                     "train_sentences": len(train_text),
                     "loss_first": summary["loss_first"], "loss_last": summary["loss_last"],
                     "cosine": cos_rec, "nu_after_recovery": nu_rec["nu"],
                     "alpha_after_recovery": nu_rec["alpha"]},
        "total_seconds": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
