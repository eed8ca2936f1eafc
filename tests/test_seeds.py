"""The named seed streams (bench/seeds.py) draw exactly what the constants at their old call sites drew: the data
splits and rank draws of every record made so far depend on it."""
from __future__ import annotations

import numpy as np

from bench.seeds import HELDOUT_SEED, STREAMS, derive_seed, seed_stream

# the constant each stream has always mixed into the seed
CONSTANTS = {"client_ranks": 7919, "file_split": 104729, "partition": 15485863, "client_test": 7777,
             "test_limit": 31337, "dp_sampling": 6151}
SEEDS = (0, 1, 2, 3, 7, 42, 1234, 2 ** 31 - 1)


def test_every_stream_draws_what_its_constant_drew():
    assert STREAMS == CONSTANTS
    for name, constant in CONSTANTS.items():
        for seed in SEEDS:
            ours, old = seed_stream(name, seed), np.random.default_rng([seed, constant])
            assert np.array_equal(ours.permutation(1000), old.permutation(1000))
            assert np.array_equal(ours.random(16), old.random(16))


def test_extra_keys_extend_the_stream():
    for seed in SEEDS:
        for k in range(5):
            assert np.array_equal(seed_stream("client_test", seed, k).permutation(300),
                                  np.random.default_rng([seed, 7777, k]).permutation(300))


def test_stream_names_and_constants_are_unique():
    assert len(set(STREAMS.values())) == len(STREAMS)
    assert HELDOUT_SEED not in STREAMS.values()


def test_derive_seed_is_the_first_word_of_the_seed_sequence():
    for parts in ((0, 1), (3, 2, 5), (42, 10, 0)):
        assert derive_seed(*parts) == int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    from bench import server

    assert server.derive_seed is derive_seed
