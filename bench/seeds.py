"""The run's named random streams: every draw that mixes a fixed constant into a seed takes its generator here,
by name, so no two draws share a stream by accident and no constant lives at its call site.

`seed_stream(name, seed, *more)` is `np.random.default_rng([seed, STREAMS[name], *more])`: numpy seeds the
generator with a SeedSequence over that list of integers, so each name's constant keeps its stream apart from
the others. The constants are the values these draws have always used; changing one changes every data split
and rank draw made with it (and the records made with them), so they stay as they are.

How this relates to `derive_seed(*parts)` (the per-round and per-client training seeds, bench/server.py's
Server.configure): it is the first 32-bit word of the same SeedSequence(parts), an integer handed to a client,
where a stream is a generator used here. Both are pure functions of their integers, so a resumed run needs no
RNG state. Round-keyed draws use [seed, round] or [seed, round, client] (derive_seed, server.sample_clients)
and so share SeedSequence's input space with the streams: they stay apart while a run has fewer rounds than the
smallest constant (6151).
"""
from __future__ import annotations

import numpy as np

STREAMS: dict[str, int] = {
    "client_ranks": 7919,          # config: each client's rank, drawn from rank_set (seed)
    "file_split": 104729,          # data: a file's seeded train/test split (seed)
    "partition": 15485863,         # data: the clients' shards (seed)
    "client_test": 7777,           # data: each client's own held-out split (seed, client id)
    "test_limit": 31337,           # data: the test_limit subset of the held-out set (eval_seed: the same for every seed)
    "dp_sampling": 6151,           # privacy: DP-SGD's Poisson sampling of examples (the client's training seed)
}
# data: the held-out draw of a source with `heldout` sizes: one fixed permutation of the pool, not the run's seed,
# so that every run, seed and evaluation task holds out the same records
HELDOUT_SEED = 20240101


def seed_stream(name: str, seed: int, *more: int) -> np.random.Generator:
    """The generator of stream `name` for this seed (more: further keys, e.g. the client id)."""
    return np.random.default_rng([seed, STREAMS[name], *more])


def derive_seed(*parts: int) -> int:
    """Every random draw derives from (seed, round, client): a resumed run needs no RNG state."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
