"""The contract between the federated engine and an aggregation method.

Everything here is plain tensors: a module name maps to LoRA factors. No peft, no training loop,
no I/O, so the math can be read on one screen and tested in milliseconds.

Conventions (peft's): a LoRA module adds  s · B @ A  to a frozen weight W (d_out × d_in), with
A: r × d_in, B: d_out × r, and scaling s = α / r (or α / √r with rsLoRA).

The server never stores a client's scaling inside its state: the global adapter is kept *effective*,
i.e. with the scaling folded into B, so that   global model = base + B_glob @ A_glob.   A client of
rank r_k and scaling s_k receives (A_glob[:r_k], B_glob[:, :r_k] / s_k), which makes its own
effective update s_k · B · A equal the rank-r_k slice of the global one. Forgetting that division
(or multiplying twice) is the classic bug; tests/test_methods_math.py pins it down.

A round, as the server runs it (bench/server.py):
    task_k = method.configure(state, ClientSpec(k, r_k, s_k, round))     for each sampled client
    ... client k trains from task_k (bench/client.py), calling method.client_penalty each step and
        method.client_finish at the end, and sends back the factors named by task_k.upload ...
    agg = method.aggregate(updates, state)
The client calls the method's client_* hooks itself (every client has the registry), so a method's
client-side rule lives in the method's own module, beside its server rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

# module name -> (A, B). A factor a client does not send (see ClientTask.upload) is None.
Factors = dict[str, tuple[Tensor | None, Tensor | None]]

FACTOR_SETS = ("AB", "A", "B", "", "R")


@dataclass(frozen=True)
class ClientSpec:
    """Who the server is configuring: client id, its current rank and scaling, and the round to train."""

    client_id: int
    rank: int
    scaling: float
    round: int


@dataclass
class ClientTask:
    """What a method tells one client for one round (plain data: it crosses every transport).

    init:  module -> (A, B) to start from, un-scaled, as the client's peft layer holds them; None for the
           whole dict: a fresh peft init (A from the round's shared seed, B = 0). A factor given with
           fewer rows/columns than the client's rank fills the first ones; a None factor is fresh.
    train: the factors the client optimizes; the others stay bit for bit as they started. "R": only the r×r core
           (see `core`), A and B fixed.
    keep:  the factors the client takes from its own previous round instead of `init` (personal state;
           fresh the first time it takes part).
    upload: the factors the client sends back; the others never leave it. "R": the trained core, sent in A's slot
           of the factor pair, (R, None): it is the factor that multiplies A (the client's A is R @ A_init).
    info:  JSON numbers about what the client receives (e.g. FlexLoRA's truncation loss), recorded in the
           client's row of the round.
    options: method-defined JSON values the client-side hooks read (e.g. a regularizer's weight).
    core:  module -> r×r core R to start from (train "R"): the client's adapter is s · B R A with A and B from
           `init`, fixed (peft's lora_A slot computing R (A x)), and only R trains (LoRA-SB, Fed-SB).
    """

    init: Factors | None = None
    train: str = "AB"
    keep: str = ""
    upload: str = "AB"
    info: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    core: dict[str, Tensor] | None = None

    def __post_init__(self):
        for what in ("train", "keep", "upload"):
            if getattr(self, what) not in FACTOR_SETS:
                raise ValueError(f"ClientTask.{what}: {getattr(self, what)!r} is not one of {FACTOR_SETS}")
        if (self.train == "R") != (self.core is not None) or (self.upload == "R" and self.train != "R") \
                or (self.core is not None and (self.init is None or self.keep)):
            raise ValueError("ClientTask: train 'R' needs a core and an init (A, B) and keeps nothing; "
                             "upload 'R' needs train 'R'")


@dataclass
class ClientUpdate:
    """What one client sends up after local training.

    rank: the rank of the factors sent, at most the rank the client was given (a method's client_finish
    may lower it, e.g. HetLoRA's self-pruning); the server configures the client at this rank from then on.
    """

    client_id: int
    rank: int
    scaling: float
    num_examples: int
    factors: Factors  # module -> (A: r×d_in, B: d_out×r), as trained (scaling NOT folded in)


@dataclass
class GlobalState:
    """What the server keeps between rounds.

    adapter: module -> (A, B) with scaling folded into B: the global model is base + B @ A.
             Factors are ordered so that the first r columns/rows are what a rank-r client gets.
    extra:   method-owned tensors that must survive a checkpoint (name -> tensor).
    """

    adapter: Factors = field(default_factory=dict)
    round: int = 0
    extra: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Aggregate:
    """The result of one round of aggregation.

    state:  the new global state.
    merge:  module -> (A, B) whose product B @ A is added into the base weights *now* (FLoRA, a
            residual); empty for methods that keep the base fixed. Kept in full precision by the
            server and by every client (bench/server.py, bench/client.py).
    metrics: JSON-serialisable numbers (e.g. aggregation noise).
    """

    state: GlobalState
    merge: Factors = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """A method option a user can set (`--method-option name=value`), with its default and source."""

    default: Any
    help: str


class AggregationMethod:
    """Base class, in the spirit of a Flower strategy: configure a client, aggregate the round.

    Subclasses set `name` (by @register_method), `description` and `citation` (shown by
    `bench methods`), may set `recipe` (config defaults that the method's paper uses, applied only
    where the user did not choose) and `options` (name -> Option), and implement `aggregate`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    recipe: ClassVar[dict] = {}
    options: ClassVar[dict[str, Option]] = {}
    # True: aggregate() returns factors to merge into the base weights each round.
    merges_into_base: ClassVar[bool] = False
    # True: the global adapter is an average of the clients' factors, so its product differs from the
    # average of the products: the server records the aggregation noise, reports plot it.
    averages_factors: ClassVar[bool] = False
    # True: each client also has a model of its own, scored on its own data: what it would start its next round
    # from, i.e. base + merges + s_k · B · A with (A, B) = configure()'s init for its current rank, its kept
    # factors (ClientTask.keep) in place (FedSA-LoRA: the global A and its own B; HetLoRA: its truncation of
    # the global adapter at its own, possibly pruned, rank).
    personalized: ClassVar[bool] = False
    # False: the server's state is no model (FedSA-LoRA holds no B), so the exported "global model" is the base
    # plus merges only and says nothing about the method; its per-client (personalized) score is its score.
    has_global_model: ClassVar[bool] = True
    # False: clients of different ranks are refused before any work (check_ranks says why).
    heterogeneous_ranks: ClassVar[bool] = True
    # False: a round's clients cannot share one batched forward (e.g. each trains on a base of its own); the
    # in-process engine then trains them one by one (bench/batched.py).
    batchable: ClassVar[bool] = True
    # What one engine round is for this method, when it is not one iteration of the paper's algorithm (recorded in
    # the results record's method_info, so that comparisons at equal rounds say what they compare).
    round_convention: ClassVar[str] = "one round = one iteration of the paper's algorithm (one communication each way)"
    # How many configure → train → aggregate exchanges one engine round holds. More than one (RoLoRA's
    # schedule=paper: its two half-steps): the engine runs them back to back with the same sampled clients, each with
    # its own aggregation, and writes one row for the round (bench/engine.py); the server's state.round and the
    # ClientSpec.round the method sees count exchanges, so round r's exchanges are (r−1)·E+1 … r·E.
    exchanges_per_round: int = 1
    # False: `bench run --dp-*` is refused (bench/privacy.py), with `dp_refusal` as the reason. True when what a
    # client uploads is a function of its DP-SGD-trained factors and of the task alone: then the uploads are
    # post-processing of the DP mechanism, and so is everything the server computes from them. The client hooks
    # below see only factors and the task, never the data, so a method meets this unless its clients send
    # something else computed from their data.
    supports_dp: ClassVar[bool] = True
    dp_refusal: ClassVar[str] = ""

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"method_options: {self.name} has no option {unknown[0]!r}; its options: {known}")
        self.opts = {k: o.default for k, o in self.options.items()}
        for k, v in options.items():
            default = self.options[k].default
            if default is not None and not isinstance(v, type(default)) and not (isinstance(default, float) and isinstance(v, int)):
                raise ValueError(f"method_options: {self.name} option {k!r} expects {type(default).__name__}, got {v!r}")
            self.opts[k] = float(v) if isinstance(default, float) else v

    def check_ranks(self, ranks: list[int]) -> None:
        """Refuse a rank setting this method cannot aggregate (ValueError, one line naming the fix)."""
        if not self.heterogeneous_ranks and len(set(ranks)) > 1:
            raise ValueError(f"ranks: {self.name} needs every client at the same rank, got {sorted(set(ranks))}; "
                             "use --ranks with one value repeated or --rank-distribution homo")

    def configure(self, state: GlobalState, client: ClientSpec) -> ClientTask:
        """The task a client trains from. Default: the first min(rank, R) rows/columns of the effective
        global adapter (R its rank), un-scaled by the client's s_k; a fresh init when there is none yet.

        When rank > R the client fills the rest with a fresh peft init (random A, zero B): the product
        is unchanged, and the extra rank can still learn (zero rows in A *and* zero columns in B would
        get zero gradient forever).
        """
        return ClientTask(init=slice_adapter(state.adapter, client.rank, client.scaling) if state.adapter else None)

    def aggregate(self, updates: list[ClientUpdate], state: GlobalState) -> Aggregate:
        raise NotImplementedError

    # ---- client side: pure tensor functions the client calls during its local training ----------
    def client_penalty(self, factors: Factors, task: ClientTask) -> Tensor | None:
        """A term added to the client's mean token loss at every step (None: nothing)."""
        return None

    def client_finish(self, factors: Factors, task: ClientTask) -> Factors:
        """The factors to send, from the trained ones (may lower the rank). Default: as trained."""
        return factors


def slice_adapter(adapter: Factors, rank: int, scaling: float) -> Factors:
    """The first min(rank, R) rows of A and columns of B / scaling: the client's share of an effective
    global adapter (a copy: the client may train it in place)."""
    out: Factors = {}
    for name, (a, b) in adapter.items():
        r = min(rank, a.shape[0])
        out[name] = (a[:r].clone(), b[:, :r] / scaling)
    return out


def client_weights(updates: list[ClientUpdate]) -> list[float]:
    """p_k = n_k / Σ n over the clients that took part in this round, in float64 (Σ p_k = 1 within K ulp)."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("num_examples: every client in the round has 0 examples; nothing to aggregate")
    return [u.num_examples / total for u in updates]


def module_names(updates: list[ClientUpdate]) -> list[str]:
    names = list(updates[0].factors)
    for u in updates[1:]:
        if list(u.factors) != names:
            raise ValueError(f"factors: client {u.client_id} sent modules that differ from client {updates[0].client_id}")
    return names
