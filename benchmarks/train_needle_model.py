"""Train the shipped needle-retrieval model (squeeze/data/needle-llama) on a CPU.

    python benchmarks/train_needle_model.py --out squeeze/data/needle-llama --seed 0

The task (squeeze/apps/needle.py): key→value records ``k017 v342`` among filler words, then
questions ``? k017`` whose answer is the key's value.

Choices, and why:
- 2 layers: key→value lookup is an induction pattern, the minimum depth for it. Layer 0 lets each
  value see the key just before it; layer 1 matches the question's key against them and copies
  the value. Records are two adjacent tokens so that only one positional head is needed.
- hidden 128, 4 query heads / 2 KV heads, head_dim 32: GQA like the models squeeze targets, small
  enough that a step at 4K tokens takes about a second on one core (weights ~1.8 MB in fp32).
- a structured start (prev_token_init, induction_init), then ordinary training of every weight
  except layer 0's head-0 query/key. From a plain init, every run we tried (rope_theta 1e4 and
  1e6, lr 1e-3 to 5e-3, a one-record warm-up, ~1500 steps each) learnt to copy *some* value
  and then sat on that plateau: the induction circuit is known to appear only after many
  thousands of steps, far beyond an hour of two CPU cores. Starting the circuit by hand (it
  answers ~90% at 256 tokens and ~50% at 4K before any training) leaves training the part that
  matters for squeezed attention: sharp attention on the one matching record among 4K tokens.
- rope_theta 1e8: head_dim 32 has only 16 RoPE frequency pairs. Half of them must be fast for
  the previous-token head (the 8 fastest, 1 .. 1e-4 rad/token at 1e8, are enough); the key match
  uses the 8 slowest, which turn by < 0.5 rad over 4K tokens at 1e8 (at 1e6 only 5 pairs do),
  so matching a key does not depend on how far back its record is.
- curriculum over the number of records, then length: 1-7 records, 2-40 in short contexts, then
  longer contexts with more distractors (0.1-0.5 of the tokens are records), ending at 2K-4K
  tokens so that attention learns to stay sharp at 4K. A phase ends early once the running
  answer accuracy passes its threshold.
- lr 2e-3, AdamW, constant, cosine in the last phase; loss on answer tokens only (the rest of a
  sequence is random: predicting it would only waste capacity).

Deterministic for a seed on one machine (data from numpy's generator, torch seeded, 1 thread).
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

from squeeze.apps import needle

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
    (300, (2048, 4096), (0.1, 0.4), 2, 96, None),
]
ROPE_THETA = 1e8
#: steps the running accuracy averages over; a phase lasts at least this long
RUNNING = 25


def model_config(vocab_size: int, rope_theta: float | None = None):
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
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta or ROPE_THETA},
        tie_word_embeddings=True,
        bos_token_id=needle.BOS,
        eos_token_id=needle.EOS,
        pad_token_id=needle.PAD,
        attn_implementation="sdpa",
    )


def prev_token_init(model, feature: float = 0.5, gain: float = 1.0, pairs: int = 8):
    """Start query head 0 of layer 0 (with its KV head 0) as a previous-token head.

    Every token embedding gets the same value ``feature`` in dimension 0, large enough to dominate
    the RMS norm (so the normalised value stays ~sqrt(hidden) however the other dimensions grow),
    and the head's query and key read only that dimension: its scores then depend on the relative position alone,
    ``u . R(j - i + 1) u`` summed over the ``pairs`` fastest RoPE pairs (the slow ones barely tell
    neighbours apart), which peaks at ``j = i - 1``. Everything
    else is trainable. Returns a function that puts these weights back (called after every
    optimizer step: left free, the head drifts away in the one-record phase, where the most
    recent value is the answer, and the induction circuit never forms).
    """
    cfg = model.config
    d = cfg.head_dim
    theta = cfg.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # [d/2]
    cos, sin = torch.cos(inv).repeat(2), torch.sin(inv).repeat(2)  # HF layout: halves
    u = torch.zeros(d, dtype=torch.float64)
    u[:pairs] = u[d // 2 : d // 2 + pairs] = 1.0
    w = u * cos + torch.cat([-u[d // 2 :], u[: d // 2]]) * sin  # R(1) u, as RoPE rotates
    attn = model.model.layers[0].self_attn

    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        rms0 = float(torch.sqrt((feature**2 + emb[:, 1:].pow(2).sum(1).mean()) / emb.shape[1]))

    @torch.no_grad()
    def restore():
        emb[:, 0] = feature
        model.model.layers[0].input_layernorm.weight[0] = 1.0
        # the other dimensions grow in training: scale so that the scores stay as sharp
        rms = float(torch.sqrt((feature**2 + emb[:, 1:].pow(2).sum(1).mean()) / emb.shape[1]))
        g = gain * rms / rms0
        attn.q_proj.weight[:d] = 0.0
        attn.q_proj.weight[:d, 0] = (g * u).float()
        attn.k_proj.weight[:d] = 0.0
        attn.k_proj.weight[:d, 0] = (g * w).float()

    restore()
    return restore


def induction_init(model, match: int = 16, gain: float = 4.0, copy: float = 0.5) -> None:
    """Start the whole induction circuit by hand; every weight set here stays trainable.

    Needs :func:`prev_token_init` (layer 0, head 0 attends to the previous token). Embedding dims
    ``1 .. 32`` are a token's code, dims ``H - match .. H - 1`` start empty:
    - layer 0, head 0: V reads the first ``match`` code dims, O writes them into the empty dims,
      so every position holds the code of the token before it (a value: its key's code);
    - layer 1, head 0: Q reads the current token's code, K the previous-token code, on the RoPE
      pairs that turn least (position-free over 4K tokens with rope_theta 1e8): a question's key
      matches the value that follows the same key; V reads that value's code and O adds it to
      the residual, where the tied unembedding reads it as the value token.
    Query heads 1 (which share these KV heads) start with their outputs off. At initialisation
    this already answers most short-context questions; training sharpens it for 4K tokens.
    """
    cfg = model.config
    h, d = cfg.hidden_size, cfg.head_dim
    emb = model.model.embed_tokens.weight
    l0, l1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    half = d // 2
    slow = [half - match // 2 + i for i in range(match // 2)]
    slow += [d - match // 2 + i for i in range(match // 2)]  # the slowest RoPE pairs, both halves
    with torch.no_grad():
        emb[:, 1 : 1 + d] = torch.randn(emb.shape[0], d) * 0.05
        emb[:, h - match :] = 0.0
        for attn in (l0, l1):
            attn.v_proj.weight[:d] = 0.0
            attn.o_proj.weight[:, : 2 * d] = 0.0
        for r in range(match):
            l0.v_proj.weight[r, 1 + r] = 1.0
            l0.o_proj.weight[h - match + r, r] = 0.05
        l1.q_proj.weight[:d] = 0.0
        l1.k_proj.weight[:d] = 0.0
        for i, r in enumerate(slow):
            l1.q_proj.weight[r, 1 + i] = gain
            l1.k_proj.weight[r, h - match + i] = gain
        for r in range(d):
            l1.v_proj.weight[r, 1 + r] = 1.0
            l1.o_proj.weight[1 + r, r] = copy


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
    p.add_argument("--no-induction-init", action="store_true", help="layer 1 from plain init")
    p.add_argument("--rope-theta", type=float, default=ROPE_THETA)
    p.add_argument("--first-phase", type=int, default=0, help="skip the phases before this one")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument(
        "--no-prev-token-init", action="store_true", help="plain init (see prev_token_init)"
    )
    args = p.parse_args(argv)

    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    model = LlamaForCausalLM(model_config(len(needle.WORDS), args.rope_theta))
    restore = (lambda: None) if args.no_prev_token_init else prev_token_init(model)
    if not args.no_induction_init and not args.no_prev_token_init:
        induction_init(model)
    n_params = sum(p.numel() for p in model.parameters())
    phases = [(max(RUNNING, int(s * args.scale)), *rest) for s, *rest in PHASES]
    phases = phases[args.first_phase :]
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
            restore()
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
