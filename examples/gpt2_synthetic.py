"""A Hugging Face GPT-2 on synthetic token data, end to end, on a CPU in well under a minute.

Each sequence counts through the vocabulary with one of a few steps (``start, start + s,
start + 2s, ... mod V``), so which training sequences should explain a query is known:
those counting with the query's step. The script

1. trains a small ``GPT2LMHeadModel`` (random initialisation, no download) for a few
   hundred Adam steps on dict batches ``{"input_ids", "attention_mask", "labels"}``;
2. fits EK-FAC on the same DataLoader, used unchanged (LayerNorm and the tied
   embedding are left out, as the one warning line says);
3. ranks the training sequences for each query (``top_k``) and reports how many of
   the top ones share the query's step;
4. splits the best training sequence's influence over its tokens
   (``per_token_influences``): the scores sum to its influence.

    python examples/gpt2_synthetic.py [--train 256] [--steps 150]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import torchfluence as tfl

VOCAB, LENGTH, STEPS_OF_SEQUENCES = 64, 16, (1, 3, 5, 7)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the unmasked tokens (labels -100 are ignored)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def sequences(n: int, seed: int) -> tuple[list[dict], torch.Tensor]:
    """n dict rows as a collator gives them, and each one's step (n,)."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.tensor(STEPS_OF_SEQUENCES)[torch.randint(len(STEPS_OF_SEQUENCES), (n,), generator=g)]
    starts = torch.randint(VOCAB, (n,), generator=g)
    ids = (starts[:, None] + steps[:, None] * torch.arange(LENGTH)) % VOCAB  # (n, T)
    labels = torch.cat([ids[:, 1:], torch.full((n, 1), -100)], dim=1)  # next token; none after the last
    rows = [{"input_ids": i, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": lab}
            for i, lab in zip(ids, labels)]
    return rows, steps


def train(model: GPT2LMHeadModel, loader: DataLoader, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    done, loss = 0, torch.tensor(0.0)
    while done < steps:
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = lm_loss(logits, batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    model.eval()
    return float(loss.detach())


def run(n_train: int = 256, n_query: int = 4, steps: int = 150, k: int = 10, seed: int = 0) -> dict:
    """Trains, fits EK-FAC, ranks and splits; returns what it printed, for the smoke test."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    rows, train_steps = sequences(n_train, seed=1)
    loader = DataLoader(rows, batch_size=32)  # dict batches, the collator's default
    final_loss = train(model, DataLoader(rows, batch_size=32, shuffle=True), steps)

    with warnings.catch_warnings(record=True) as caught:  # the one line saying what EK-FAC covers
        warnings.simplefilter("always")
        im = tfl.EkfacInfluence(model, lm_loss, 1e-3).fit(loader)
    coverage = [str(w.message) for w in caught if "covers" in str(w.message)]

    query_rows, query_steps = sequences(n_query, seed=2)
    query = {key: torch.stack([r[key] for r in query_rows]) for key in query_rows[0]}
    top = im.top_k(query, None, k=k)  # the fitted DataLoader is ranked; no (n_query, n_train) matrix
    same_step = (train_steps[top.helpful_indices] == query_steps[:, None]).float().mean(dim=1)  # (n_query,)

    best = int(top.helpful_indices[0, 0])
    # A dict as the engine's (inputs, targets): the inputs without "labels", and the whole dict.
    best_row = tfl.split_batch({key: v[None] for key, v in rows[best].items()})
    first_query = tfl.split_batch({key: v[:1] for key, v in query.items()})
    per_token = im.per_token_influences(*first_query, *best_row)[0, 0]  # (T,)
    total = float(im.influences(*first_query, *best_row)[0, 0])

    print(coverage[0] if coverage else "EkfacInfluence covers every parameter")
    print(f"training loss after {steps} steps: {final_loss:.3f}")
    for q in range(n_query):
        print(f"query {q} (step {int(query_steps[q])}): top-{k} training sequences {top.helpful_indices[q].tolist()}, "
              f"{100 * float(same_step[q]):.0f}% with the query's step")
    print(f"per-token scores of training sequence {best} (step {int(train_steps[best])}) on query 0:")
    for t, (token, score) in enumerate(zip(rows[best]["input_ids"].tolist(), per_token.tolist())):
        print(f"  position {t:2d}  token {token:3d}  {score:+.4g}")
    print(f"sum over tokens {float(per_token.sum()):+.6g}, influence {total:+.6g}; "
          f"{time.perf_counter() - t0:.1f} s in all")
    return {"top": top, "same_step": same_step, "per_token": per_token, "influence": total,
            "final_loss": final_loss, "coverage": coverage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=256, help="training sequences")
    parser.add_argument("--queries", type=int, default=4, help="query sequences")
    parser.add_argument("--steps", type=int, default=150, help="Adam steps of training")
    parser.add_argument("--k", type=int, default=10, help="training sequences ranked per query")
    args = parser.parse_args()
    run(args.train, args.queries, args.steps, args.k)


if __name__ == "__main__":
    main()
