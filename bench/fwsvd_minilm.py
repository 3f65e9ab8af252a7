"""FWSVD vs SVD on the pretrained all-MiniLM-L6-v2 with a task head: task accuracy against the kept
fraction of the encoder's linear weights, without fine-tuning and after one short fine-tuning epoch.

    python bench/fwsvd_minilm.py [--out bench/results/fwsvd_minilm.json] [--quick]

Task (built here, offline): 8-way sentence classification, topic (food, film, travel, tech) x
polarity, over templated review sentences; 5 of the 12 templates negate the adjective ("The soup
wasn't awful at all." is food/positive), so the label needs more than keyword spotting. Train and
test sentences are drawn with different seeds. Task model, as in the paper's setting (a task-tuned
model is factorized): ``regc.zoo.minilm()`` (mean-pooled, normalized embedding) + a linear head
trained on the frozen embeddings (a linear probe), then the whole model fine-tuned for one epoch over
the first --task-ft training sentences. Compressed: the 36 linear layers of the 6 encoder blocks, as
in the paper; embeddings and head stay dense.

Rows, at each ratio (one dense baseline measured in the same run):
  svd-uniform    truncated SVD, the same kept fraction in every layer (the paper's SVD baseline)
  svd-global     truncated SVD, ranks from the global allocation on singular values
  fwsvd-uniform  Fisher-weighted SVD, uniform ranks: the effect of the weighting alone
  fwsvd          Fisher-weighted SVD with the Fisher-weighted global allocation (the pass defaults);
                 Fisher of the task loss (labels) on the first --calib training sentences
Recovery fine-tuning (``regc.train.fit``: Adam, lr --ft-lr, cross-entropy to the labels, batch 32,
one epoch over the first --ft training sentences) is applied to svd-uniform and fwsvd.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

import torch
from _common import write_json
from torch import nn

import regc
from regc.train import TrainSpec, fit
from regc.zoo import minilm, minilm_tokenize

TOPICS = {
    "food": ["pasta", "soup", "steak", "salad", "pizza", "curry", "dessert", "bread", "sushi", "burger",
             "breakfast", "coffee"],
    "film": ["film", "movie", "plot", "acting", "soundtrack", "ending", "script", "sequel", "documentary",
             "cast", "trailer", "cinematography"],
    "travel": ["hotel room", "flight", "beach resort", "train journey", "tour guide", "hostel", "cruise",
               "airport lounge", "city tour", "campsite", "ferry", "road trip"],
    "tech": ["laptop", "phone", "battery", "keyboard", "camera", "software update", "headphones", "tablet",
             "smartwatch", "router", "printer", "charger"],
}
POSITIVE = ["wonderful", "fantastic", "great", "superb", "delightful", "impressive", "amazing", "lovely",
            "outstanding", "brilliant", "excellent", "pleasant"]
NEGATIVE = ["terrible", "awful", "disappointing", "horrible", "mediocre", "dreadful", "poor", "frustrating",
            "bad", "lousy", "unpleasant", "dull"]
TEMPLATES = [  # (text, negates the adjective {a}); {b} is an adjective of the other polarity
    ("The {n} was {a}.", False), ("I thought the {n} was {a}.", False),
    ("Honestly, the {n} was not {a}.", True), ("Nobody could say the {n} was {a}.", True),
    ("The {n} was {a}, to be honest.", False), ("I expected the {n} to be {b}, but it was {a}.", False),
    ("The {n} wasn't {a} at all.", True), ("Our {n} turned out {a}.", False),
    ("It would be wrong to call the {n} {a}.", True), ("Everyone agreed that the {n} was {a}.", False),
    ("I would never describe the {n} as {a}.", True),
    ("The {n} seemed {b} at first, yet in the end it was {a}.", False),
]
MAX_LEN = 20  # the longest templated sentence is 20 tokens
LAYERS = "enc.bert.encoder.*"


def make_task(n: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """``n`` sentences and labels ``2 * topic + (0 positive, 1 negative)``."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    sentences, labels = [], []
    for _ in range(n):
        t = rng.randrange(len(topics))
        positive = rng.random() < 0.5
        text, negates = rng.choice(TEMPLATES)
        word_positive = positive != negates
        a = rng.choice(POSITIVE if word_positive else NEGATIVE)
        b = rng.choice(NEGATIVE if word_positive else POSITIVE)
        sentences.append(text.format(n=rng.choice(TOPICS[topics[t]]), a=a, b=b))
        labels.append(2 * t + (0 if positive else 1))
    return sentences, torch.tensor(labels)


class TaskModel(nn.Module):
    """Sentence embedding -> linear head (8 logits)."""

    def __init__(self, enc: nn.Module, head: nn.Linear):
        super().__init__()
        self.enc, self.head = enc, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(input_ids, attention_mask))


def train_head(emb: torch.Tensor, labels: torch.Tensor, classes: int) -> nn.Linear:
    """Multinomial logistic regression on frozen embeddings (full batch Adam, small L2)."""
    torch.manual_seed(0)
    head = nn.Linear(emb.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(400):
        loss = nn.functional.cross_entropy(head(emb), labels) + 1e-4 * head.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def accuracy(model, data: regc.Dataset, batch: int = 128) -> float:
    with torch.no_grad():
        hits = sum(int((model(*xs).argmax(-1) == y).sum()) for xs, y in data.batches(batch))
    return hits / len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/fwsvd_minilm.json")
    ap.add_argument("--ratios", default="0.2,0.33,0.5,0.65,0.8")
    ap.add_argument("--train", type=int, default=1200, help="training sentences (for the linear probe)")
    ap.add_argument("--task-ft", type=int, default=600, help="training sentences to fine-tune the task model")
    ap.add_argument("--test", type=int, default=500, help="test sentences")
    ap.add_argument("--calib", type=int, default=256, help="training sentences for the Fisher")
    ap.add_argument("--fisher", default="batch", choices=["batch", "sample"])
    ap.add_argument("--ft", type=int, default=384, help="training sentences in the fine-tuning epoch")
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: immune to shared cores)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the script")
    args = ap.parse_args()
    if args.quick:
        args.ratios, args.train, args.task_ft, args.test, args.calib, args.ft = "0.5", 256, 64, 128, 64, 64
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    zm = minilm()
    names = zm.input_names
    tr_s, tr_y = make_task(args.train, seed=1)
    te_s, te_y = make_task(args.test, seed=2)
    train = regc.Dataset(dict(zip(names, minilm_tokenize(tr_s, MAX_LEN), strict=True)), tr_y)
    test = regc.Dataset(dict(zip(names, minilm_tokenize(te_s, MAX_LEN), strict=True)), te_y)
    with torch.no_grad():
        emb = torch.cat([zm.module(*xs) for xs, _ in train.batches(128)])
    head = train_head(emb, tr_y, 2 * len(TOPICS))
    dense = regc.capture(TaskModel(zm.module, head), zm.example_inputs, zm.dynamic_shapes)
    linear_params = sum(p.numel() for k, p in dense.named_parameters()
                        if k.startswith("enc.bert.encoder.") and p.dim() == 2)
    first = lambda n: regc.Dataset({k: v[:n] for k, v in train.inputs.items()}, tr_y[:n])  # noqa: E731
    probe_accuracy = accuracy(dense, test)
    fit(dense, TrainSpec(data=first(args.task_ft), loss="ce", optimizer="adam", lr=args.ft_lr, batch_size=32,
                         epochs=1, seed=0, progress=False))
    calib = first(args.calib)
    spec = TrainSpec(data=first(args.ft), loss="ce", optimizer="adam", lr=args.ft_lr, batch_size=32, epochs=1,
                     seed=0, progress=False)

    def finetuned_accuracy(model: regc.Model) -> float:
        fit(model, spec)
        return accuracy(model, test)

    result = {
        "bench": "fwsvd_minilm",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": args.threads, "load_avg_1m_at_start": os.getloadavg()[0]},
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "layers": LAYERS,
                   "classes": 2 * len(TOPICS), "max_len": MAX_LEN},
        "dense": {"accuracy": accuracy(dense, test), "linear_probe_accuracy": probe_accuracy,
                  "encoder_linear_params": linear_params},
        "rows": [],
    }
    d = result["dense"]
    print(f"dense task model: accuracy {d['accuracy']:.3f} (linear probe before fine-tuning "
          f"{d['linear_probe_accuracy']:.3f})", flush=True)
    methods = {
        "svd-uniform": "svd{{ratio={r},alloc=uniform,layers={l}}}",
        "svd-global": "svd{{ratio={r},layers={l}}}",
        "fwsvd-uniform": "fwsvd{{ratio={r},alloc=uniform,fisher={f},layers={l}}}",
        "fwsvd": "fwsvd{{ratio={r},fisher={f},layers={l}}}",
    }
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method, text in methods.items():
            text = text.format(r=ratio, f=args.fisher, l=LAYERS)
            t0 = time.perf_counter()
            model, records = regc.Pipeline.parse(text).run(dense.clone(), regc.PassContext(data=calib))
            stats = records[0]["stats"]
            row = {"ratio": ratio, "method": method, "pipeline": text, "accuracy": accuracy(model, test),
                   "ratio_achieved": round(stats["ratio_achieved"], 4), "params_after": stats["params_after"],
                   "ranks": {k: e["rank"] for k, e in stats["layers"].items()},
                   "compress_seconds": records[0]["seconds"]}
            row["accuracy_ft"] = finetuned_accuracy(model) if method in ("svd-uniform", "fwsvd") else None
            row["seconds"] = round(time.perf_counter() - t0, 1)
            result["rows"].append(row)
            ft = "" if row["accuracy_ft"] is None else f", after fine-tuning {row['accuracy_ft']:.3f}"
            print(f"ratio {ratio:<4} {method:<13} accuracy {row['accuracy']:.3f}{ft} "
                  f"(kept {row['ratio_achieved']:.3f}, {row['seconds']} s)", flush=True)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    out = write_json(args.out, result)
    print(table(result))
    print(f"wrote {out} ({result['seconds']} s)")


def table(result: dict) -> str:
    """Markdown table: accuracy per ratio and method (after fine-tuning in parentheses)."""
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    lines = ["| kept ratio | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for ratio in dict.fromkeys(r["ratio"] for r in result["rows"]):
        cells = []
        for m in methods:
            row = next(r for r in result["rows"] if r["ratio"] == ratio and r["method"] == m)
            ft = "" if row["accuracy_ft"] is None else f" ({row['accuracy_ft']:.3f})"
            cells.append(f"{row['accuracy']:.3f}{ft}")
        lines.append(f"| {ratio} | " + " | ".join(cells) + " |")
    lines.append(f"| dense | {result['dense']['accuracy']:.3f}" + " |" * len(methods))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
