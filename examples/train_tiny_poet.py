"""POET on any PyTorch model, in plain PyTorch: a tiny character-level GPT on Shakespeare.

The model is written with ordinary ``nn.Linear`` layers; ``convert_model`` swaps
them for ``POETLinear``; AdamW trains the POET factors (and the embeddings, norms
and output layer) and ``MergeScheduler`` merges every ``--merge-interval`` steps.

    python examples/train_tiny_poet.py --steps 300

Reads ``../shared/data/tinyshakespeare.txt`` (or ``--text FILE``); with neither,
it generates a small synthetic corpus so it runs anywhere.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from megatron_poet import MergeScheduler, convert_model, poet_param_groups

DEFAULT_TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, seq, dim)
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (batch, seq) -> (batch, seq, vocab)
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def load_text(path: str | None) -> str:
    path = path or DEFAULT_TEXT
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    g = torch.Generator().manual_seed(0)  # a learnable synthetic corpus: repeated random "words"
    words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (4,), generator=g)) for _ in range(50)]
    return " ".join(words[int(i)] for i in torch.randint(0, 50, (40_000,), generator=g))


def main(argv: list[str] | None = None) -> list[float]:
    """Train and return the logged training losses."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-length", type=int, default=64)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--poet-block-size", type=int, default=16)
    ap.add_argument("--poet-merge-interval", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--poet-lr", type=float, default=4e-3)
    ap.add_argument("--log-interval", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    text = load_text(args.text)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, valid = data[:split], data[split:]

    model = TinyGPT(len(chars), args.hidden_size, args.num_layers, 4, args.seq_length)
    convert_model(model, block_size=args.poet_block_size, exclude=("lm_head",))
    optimizer = torch.optim.AdamW(poet_param_groups(model, args.lr, args.poet_lr, weight_decay=0.1))
    merges = MergeScheduler(model, args.poet_merge_interval, optimizer=optimizer, seed=args.seed)

    def batch(source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, len(source) - args.seq_length - 1, (args.batch_size,))
        window = torch.stack([source[s:s + args.seq_length + 1] for s in start.tolist()])
        return window[:, :-1], window[:, 1:]

    def loss_on(source: torch.Tensor) -> torch.Tensor:
        tokens, labels = batch(source)
        return F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten())

    losses, start = [], time.time()
    for step in range(1, args.steps + 1):
        loss = loss_on(train)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        merged = merges.step()
        if step % args.log_interval == 0 or step == 1:
            losses.append(loss.item())
            elapsed = time.time() - start
            print(f" iteration {step:5d}/{args.steps} | loss {loss.item():.4f} | merges {merges.merges_done}"
                  f"{' (merged now)' if merged else ''} | max orth err {merges.max_orthogonality_error():.2e}"
                  f" | {elapsed / step * 1000:.1f} ms/it | ETA {elapsed / step * (args.steps - step):.0f}s",
                  flush=True)
    model.eval()
    with torch.no_grad():
        val = torch.stack([loss_on(valid) for _ in range(10)]).mean().item()
    print(f" validation loss {val:.4f} | perplexity {math.exp(val):.2f}")
    return losses


if __name__ == "__main__":
    main()
