"""Plain references and input makers for the tests (not part of the package)."""

from __future__ import annotations

import torch


def dense_reference(q, k_ctx, v_ctx, k_tail, v_tail, scale=None):
    """fp64 attention of ``q [B, Hq, M, D]`` over ``[context, tail]``.

    ``k_ctx, v_ctx [Hkv, N, D]`` are shared by the batch; ``k_tail, v_tail [B, Hkv, T, D]``.
    The M queries are the last M tail tokens (bottom-right causal). GQA by repeating KV heads.
    """
    b, hq, m, d = q.shape
    hkv = k_ctx.shape[0]
    scale = d**-0.5 if scale is None else scale
    k = torch.cat([k_ctx[None].expand(b, -1, -1, -1), k_tail], dim=2).double()
    v = torch.cat([v_ctx[None].expand(b, -1, -1, -1), v_tail], dim=2).double()
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    s = q.double() @ k.transpose(-1, -2) * scale
    n_total, _t = k.shape[2], k_tail.shape[2]
    pos_q = (n_total - m) + torch.arange(m)
    s = s.masked_fill(torch.arange(n_total)[None, :] > pos_q[:, None], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def make_keys(hkv, n, d, *, n_modes=12, dtype=torch.float32, generator=None):
    """Keys drawn from a mixture of Gaussians (so clusters mean something), ``[Hkv, N, D]``."""
    g = generator
    centers = torch.randn(hkv, n_modes, d, generator=g) * 2.0
    which = torch.randint(0, n_modes, (hkv, n), generator=g)
    keys = torch.gather(centers, 1, which[..., None].expand(-1, -1, d))
    keys = keys + 0.7 * torch.randn(hkv, n, d, generator=g)
    return keys.to(dtype)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ragged_selection(B, hkv, n, gen):
    """CSR segments per (b, h): (0) nothing, (1) everything in a few segments, (2) one 1-token
    segment, (3) only empty-length segments, others random clusters with empty segments mixed in."""
    import itertools

    ptr, starts, ends = [0], [], []
    for bh in range(B * hkv):
        pattern = bh % 5
        if pattern == 1:
            cuts = [0, n // 3, n // 3, 2 * n // 3, n]  # includes an empty segment
            segs = list(itertools.pairwise(cuts))
        elif pattern == 2:
            t = int(torch.randint(n, (1,), generator=gen))
            segs = [(t, t + 1)]
        elif pattern == 3:
            segs = [(5, 5), (9, 9)]
        elif pattern == 4:
            segs, pos = [], 0
            while True:
                gap, size = (int(x) for x in torch.randint(0, 30, (2,), generator=gen))
                if pos + gap + size > n:
                    break
                segs.append((pos + gap, pos + gap + size))  # size 0 gives an empty segment
                pos += gap + size
        else:
            segs = []
        starts += [s for s, _ in segs]
        ends += [e for _, e in segs]
        ptr.append(len(starts))
    as_t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return as_t(ptr), as_t(starts), as_t(ends)
