"""Train the shipped needle-retrieval model (squeeze/data/needle-llama) on a CPU.

    python benchmarks/train_needle_model.py --out squeeze/data/needle-llama --seed 0

The task (squeeze/needle.py): key→value records ``k017 v342`` among filler words, then
questions ``? k017`` whose answer is the key's value. Loss is on the answer tokens only; the rest of a sequence is
random and unpredictable, so predicting it would only waste capacity.

Choices, and why:
- 2 layers: key→value lookup is an induction pattern, the minimum depth for it. Layer 0 lets each
  value see the key just before it; layer 1 matches the question's key against them and copies
  the value. Records are two adjacent tokens so that only one positional head is needed.
- hidden 128, 4 query heads / 2 KV heads, head_dim 32: GQA like the models squeeze targets, small
  enough that a step at 4K tokens takes seconds on two cores (the weights are ~2 MB in fp32).
- rope_theta 1e4 (Llama-2's): with head_dim 32 there are only 16 RoPE frequencies. At 1e6 only
  three of them turn faster than 0.1 rad/token, too few to build a sharp previous-token head
  (runs at 1e6 sat at the copy-any-value plateau); 1e4 spreads them evenly over 1..1e-4
  rad/token. Length generalisation is not needed: the last phase trains at 2K-4K tokens.
- curriculum over the number of records, then length: one record first (copying the only value
  is the answer, the copy circuit forms in ~100 steps), then 2-40 records in short contexts,
  where the induction circuit has to form (the long plateau: cheap tokens, dense questions),
  then longer contexts with more distractors so attention learns to stay sharp at 4K.
- lr 2e-3 (5e-3 never left the uniform-over-values plateau), AdamW, constant, cosine in the last
  phase; loss on answer tokens only.

Deterministic for a seed on one machine (data from numpy's generator, torch seeded, 2 threads).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from squeeze import needle

#: (max steps, context lengths (min, max), record density (min, max), batch size, questions per
#: sequence (at most one per record), running answer accuracy that ends the phase early (None:
#: run every step)). The number of records grows from 1 to ~500: with one record, copying it is
#: the answer and the copy circuit forms in ~100 steps; each later phase only has to sharpen the
#: choice among more records and more distractors.
PHASES = [
    (300, (4, 16), (0.5, 0.9), 32, 8, 0.9),
    (2500, (16, 96), (0.4, 0.9), 32, 16, 0.9),
    (800, (64, 256), (0.2, 0.6), 16, 32, 0.9),
    (800, (256, 1024), (0.1, 0.5), 8, 48, 0.93),
    (300, (1024, 2048), (0.1, 0.4), 4, 64, 0.95),
    (150, (2048, 4096), (0.1, 0.4), 2, 96, None),
]
ROPE_THETA = 1e4
#: steps the running accuracy averages over; a phase lasts at least this long
RUNNING = 25


def model_config(vocab_size: int):
    """The LlamaConfig of the shipped model (see the module docstring for the choices)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=True,
        bos_token_id=needle.BOS,
        eos_token_id=needle.EOS,
        pad_token_id=needle.PAD,
        attn_implementation="sdpa",
    )


def make_batch(rng: np.random.Generator, lens, batch: int, n_q: int, density=(0.1, 0.5)):
    """Returns ids ``[B, T]`` int64 and targets ``[B, T]`` int64 (-100 = no loss), right-padded."""
    n = int(rng.integers(lens[0], lens[1] + 1))
    rows = [
        needle.training_example(rng, n, n_q, density=float(rng.uniform(*density)))
        for _ in range(batch)
    ]
    t = max(len(r[0]) for r in rows)
    ids = torch.full((batch, t), needle.PAD, dtype=torch.long)
    tgt = torch.full((batch, t), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.from_numpy(x)
        tgt[i, : len(y)] = torch.from_numpy(y)
    return ids, tgt


def answer_loss(model, ids: torch.Tensor, tgt: torch.Tensor):
    """Cross-entropy and accuracy on the answer positions only (logits computed only there)."""
    h = model.model(input_ids=ids).last_hidden_state  # [B, T, hidden]
    mask = tgt != -100
    logits = model.lm_head(h[mask])  # [n_answers, vocab]
    y = tgt[mask]
    return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean().item()


@torch.no_grad()
def dense_accuracy(model, n_tokens: int, n_contexts: int, n_q: int, seed: int) -> float:
    """Exact match of the first answer token, questions appended to a context in one forward."""
    rng = np.random.default_rng(seed)
    hits = total = 0
    for _ in range(n_contexts):
        ids, tgt = make_batch(rng, (n_tokens, n_tokens), 1, n_q)
        h = model.model(input_ids=ids).last_hidden_state
        mask = tgt != -100
        pred = model.lm_head(h[mask]).argmax(-1)
        hits += int((pred == tgt[mask]).sum())
        total += int(mask.sum())
    return hits / max(total, 1)


def save(model, out: Path) -> None:
    """The model (safetensors, fp32) and the word-level tokenizer, loadable from ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = needle.PAD
    model.save_pretrained(out)
    needle.build_tokenizer().save_pretrained(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="squeeze/data/needle-llama")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--threads", type=int, default=1, help="1: the measured run (bitwise reproducible)"
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply every phase's steps")
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)

    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    model = LlamaForCausalLM(model_config(len(needle.WORDS)))
    n_params = sum(p.numel() for p in model.parameters())
    phases = [(max(RUNNING, int(s * args.scale)), *rest) for s, *rest in PHASES]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = 30
    out = Path(args.out)

    def lr_at(step, phase_step, phase_steps, last):
        """Linear warm-up, constant, then a cosine decay to 5% over the last phase."""
        if step < warm:
            return args.lr * (step + 1) / warm
        if not last:
            return args.lr
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * phase_step / phase_steps)))

    print(f"params {n_params:,}  phases {phases}", flush=True)
    t0 = time.time()
    step, log, ended = 0, [], []
    for p_i, (n_steps, lens, dens, batch, n_q, stop_acc) in enumerate(phases):
        last = p_i == len(phases) - 1
        recent: list[float] = []
        for p_step in range(n_steps):
            lr = lr_at(step, p_step, n_steps, last)
            for g in opt.param_groups:
                g["lr"] = lr
            ids, tgt = make_batch(rng, lens, batch, n_q, dens)
            loss, acc = answer_loss(model, ids, tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            recent = [*recent, acc][-RUNNING:]
            running = sum(recent) / len(recent)
            if step % args.log_every == 0:
                el = time.time() - t0
                log.append(dict(step=step, len=ids.shape[1], loss=loss.item(), acc=running, t=el))
                print(
                    f"phase {p_i} step {step:5d}  len {ids.shape[1]:5d}  loss {loss.item():.3f}"
                    f"  acc(run) {running:.3f}  lr {lr:.2e}  {el:7.0f}s",
                    flush=True,
                )
            if stop_acc is not None and len(recent) == RUNNING and running >= stop_acc:
                break
        ended.append(dict(phase=p_i, step=step, seconds=round(time.time() - t0, 1)))
        print(f"phase {p_i} ended at step {step} ({time.time() - t0:.0f}s)", flush=True)
        save(model, out)  # every phase leaves a usable model behind
    train_s = time.time() - t0
    model.eval()
    evals = {n: dense_accuracy(model, n, 4, 50, seed=10_000 + n) for n in (1024, 2048, 4096)}
    print(f"trained in {train_s:.0f}s; dense accuracy (held-out seeds): {evals}", flush=True)

    save(model, out)
    (out / "training.json").write_text(
        json.dumps(
            dict(
                seed=args.seed,
                phases=phases,
                phase_ends=ended,
                lr=args.lr,
                params=n_params,
                train_seconds=round(train_s, 1),
                threads=args.threads,
                dense_accuracy_quick=evals,
                log=log,
            ),
            indent=1,
        )
    )
    print(f"saved to {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
