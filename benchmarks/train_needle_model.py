"""Train the shipped needle-retrieval model (squeeze/data/needle-llama) on a CPU.

    python benchmarks/train_needle_model.py --out squeeze/data/needle-llama --seed 0

The task (squeeze/needle.py): key→value records among filler words, then questions ``? k :``
whose answer is the key's value. Loss is on the answer tokens only; the rest of a sequence is
random and unpredictable, so predicting it would only waste capacity.

Choices, and why:
- 2 layers: key→value lookup is an induction pattern, the minimum depth for it. Layer 0 lets each
  value see its key two tokens back; layer 1 matches the question's key against them.
- hidden 128, 4 query heads / 2 KV heads, head_dim 32: GQA like the models squeeze targets, small
  enough that a step at 4K tokens takes seconds on two cores (the weights are ~2 MB in fp32).
- rope_theta 1e6: the lowest RoPE frequencies then turn by well under a radian across 4K tokens,
  so content matching (which key?) is nearly position-free and carries from the short training
  lengths to 4K, while the highest frequency (1 rad/token) still serves the offset-2 head.
- curriculum over length: short contexts first (the induction circuit forms fastest when
  attention has few places to go), then longer ones so attention learns to stay sharp at 4K.

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

#: (max steps, context lengths (min, max), batch size, questions per sequence (at most one per
#: record), running answer accuracy that ends the phase early (None: run every step))
PHASES = [
    (1500, (64, 320), 8, 32, 0.97),
    (600, (320, 1024), 4, 48, 0.97),
    (300, (1024, 2048), 2, 64, 0.97),
    (120, (2048, 4096), 1, 96, None),
]
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
        rope_theta=1e6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True,
        bos_token_id=needle.BOS,
        eos_token_id=needle.EOS,
        pad_token_id=needle.PAD,
        attn_implementation="sdpa",
    )


def make_batch(rng: np.random.Generator, lens, batch: int, n_q: int):
    """Returns ids ``[B, T]`` int64 and targets ``[B, T]`` int64 (-100 = no loss), right-padded."""
    n = int(rng.integers(lens[0], lens[1] + 1))
    rows = [
        needle.training_example(rng, n, n_q, density=float(rng.uniform(0.1, 0.5)))
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
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--threads", type=int, default=2)
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
    warm = 50
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
    for p_i, (n_steps, lens, batch, n_q, stop_acc) in enumerate(phases):
        last = p_i == len(phases) - 1
        recent: list[float] = []
        for p_step in range(n_steps):
            lr = lr_at(step, p_step, n_steps, last)
            for g in opt.param_groups:
                g["lr"] = lr
            ids, tgt = make_batch(rng, lens, batch, n_q)
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
