"""Small transformers with the layer structure of BERT and GPT-2, untrained but seeded.

``BertEncoder``: post-LN encoder, separate q/k/v ``nn.Linear``, padding mask, attention through
``F.scaled_dot_product_attention`` (the capture keeps ``aten.scaled_dot_product_attention`` whole).
``GPT2Decoder``: pre-LN decoder, HF-style ``Conv1D`` (weight (in, out), ``torch.addmm``) with fused
qkv, explicit causal mask and ``matmul``/``softmax`` attention, tied LM head.
Between them the zoo covers both attention op vocabularies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from regc.zoo._common import ZooModel, randomize_norm_affine, seeded


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H) -> (B, heads, S, H / heads)."""
    b, s, h = t.shape
    return t.view(b, s, heads, h // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, S, D) -> (B, S, heads * D)."""
    b, heads, s, d = t.shape
    return t.transpose(1, 2).reshape(b, s, heads * d)


# ---- BERT ---------------------------------------------------------------------------------------


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with separate ``query``/``key``/``value`` projections and ``out``."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.query, self.key, self.value))
        return self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias)))


class BertLayer(nn.Module):
    """Post-LN encoder layer: ``x = LN(x + attn(x))``, then ``x = LN(x + W2 gelu(W1 x))``."""

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float):
        super().__init__()
        self.attention = BertSelfAttention(hidden, heads)
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.output = nn.Linear(intermediate, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, mask_bias)))
        return self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class BertEncoder(nn.Module):
    """Word + position embeddings with LayerNorm, then post-LN encoder layers.

    ``forward(input_ids, attention_mask)`` -> last hidden state (B, S, hidden); padded positions
    (``attention_mask == 0``) are never attended to.
    """

    def __init__(self, vocab_size: int = 1000, hidden: int = 64, layers: int = 2, heads: int = 4,
                 intermediate: int = 256, max_positions: int = 64, dropout: float = 0.1):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.embedding_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(BertLayer(hidden, heads, intermediate, dropout) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.dropout(self.embedding_norm(x))
        # additive bias (B, 1, 1, S): 0 on tokens, the most negative float on padding
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x


def bert_encoder(vocab_size: int = 1000, hidden: int = 64, layers: int = 2, heads: int = 4,
                 max_positions: int = 64, seed: int = 0) -> ZooModel:
    """A BERT-style encoder on ``input_ids`` and ``attention_mask`` (both (2, 16) int64, the second
    row padded after 12 tokens); output ``last_hidden_state``; dynamic batch and sequence length."""
    with seeded(seed):
        module = BertEncoder(vocab_size, hidden, layers, heads, 4 * hidden, max_positions)
        randomize_norm_affine(module)
        input_ids = torch.randint(1, vocab_size, (2, 16))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 12:] = 0
    input_ids[1, 12:] = 0
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=max_positions)
    return ZooModel(
        name="bert_encoder",
        module=module.eval(),
        example_inputs=(input_ids, attention_mask),
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )


# ---- GPT-2 --------------------------------------------------------------------------------------


class Conv1D(nn.Module):
    """HF GPT-2's linear layer: ``weight`` is stored (in, out) and applied as ``addmm(bias, x, weight)``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features) * 0.02)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.weight.shape[1])


class GPT2Attention(nn.Module):
    """Causal self-attention: fused ``c_attn`` (q, k, v), softmax(q k^T / sqrt(d)) masked to the past,
    ``c_proj``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.c_attn = Conv1D(n_embd, 3 * n_embd)
        self.c_proj = Conv1D(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, e = x.shape[1], x.shape[2]
        q, k, v = (_split_heads(t, self.n_head) for t in self.c_attn(x).split(e, dim=2))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(e // self.n_head)
        # built per call, not sliced from a (n_positions, n_positions) buffer: slicing a buffer to its
        # full length makes torch.export specialize the sequence length away from n_positions
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = torch.where(causal, scores, torch.finfo(scores.dtype).min)
        probs = self.attn_dropout(scores.softmax(dim=-1))
        return self.resid_dropout(self.c_proj(_merge_heads(torch.matmul(probs, v))))


class GPT2MLP(nn.Module):
    """``c_proj(gelu_tanh(c_fc(x)))`` with a 4x wider hidden layer."""

    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.c_fc = Conv1D(n_embd, 4 * n_embd)
        self.c_proj = Conv1D(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GPT2Block(nn.Module):
    """Pre-LN decoder block: ``x += attn(ln_1(x))``, then ``x += mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = GPT2Attention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = GPT2MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Decoder(nn.Module):
    """Token + position embeddings, pre-LN blocks, final LayerNorm, LM head tied to the token embedding.

    ``forward(input_ids)`` -> next-token logits (B, S, vocab_size). Module names follow HF GPT-2
    (``wte``, ``wpe``, ``h.N.attn.c_attn``, ``ln_f``, ``lm_head``).
    """

    def __init__(self, vocab_size: int = 1000, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                 n_positions: int = 64, dropout: float = 0.1):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(GPT2Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt2_decoder(vocab_size: int = 1000, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                 n_positions: int = 64, seed: int = 0) -> ZooModel:
    """A GPT-2-style decoder on ``input_ids`` ((2, 16) int64); output ``logits``; dynamic batch and
    sequence length (up to ``n_positions``)."""
    with seeded(seed):
        module = GPT2Decoder(vocab_size, n_embd, n_layer, n_head, n_positions)
        randomize_norm_affine(module)
        input_ids = torch.randint(0, vocab_size, (2, 16))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=n_positions)
    return ZooModel(
        name="gpt2_decoder",
        module=module.eval(),
        example_inputs=(input_ids,),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}},
    )
