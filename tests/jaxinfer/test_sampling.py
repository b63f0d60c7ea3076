"""The per-slot sampler (jaxinfer.sampling.sample) against plain NumPy definitions of each filter,
SamplingParams validation, and the host-side key construction in make_requests.

How the statistical tests work
------------------------------
Every sampler case is one slot of ONE batch (so per-slot settings differ within the batch); the
batch is drawn N_DRAWS times with token indices 0..N_DRAWS-1 (vmapped, jitted once), i.e.
N_DRAWS independent keys fold_in(key(seed), i) per slot. For each slot:
- support: every drawn token must be in the set the NumPy reference allows (exact, no tolerance);
- distribution: each allowed token's count c must satisfy |c - N q| <= 5 sigma + 3, q the
  renormalised reference probability and sigma = sqrt(N q (1 - q)) its binomial standard
  deviation. The +3 is slack for discreteness: with it the exact binomial two-sided tail is
  <= 1.2e-6 for every N q (checked numerically over N q in [0.05, 10000]; ~4e-7 for N q >= 2,
  the 5-sigma normal value), although rare categories here have N q as small as 0.2. Over the
  ~140 category checks below a correct sampler fails spuriously with probability < 2e-4 -- and
  the keys are fixed, so a run is reproducible. With N_DRAWS = 20000 the check catches any
  per-token probability error larger than about 5 * sqrt(q(1-q)/N) <= 0.018 (e.g. a
  temperature that is not applied, or a filter that renormalises over the wrong set).
The NumPy references follow the definitions (and Hugging Face's order: temperature, top-k,
top-p, min-p, each on the distribution the previous one left) and are themselves checked
against transformers' logits warpers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling import SamplingParams, sample, sample_key
from jaxinfer.state import EngineConfig
from jaxinfer.steps import make_requests

VOCAB = 16
N_DRAWS = 20_000
SIGMAS = 5.0
SLACK = 3.0


# --------------------------------------------------------------------------- NumPy references
def masked_softmax(z: np.ndarray, keep: np.ndarray) -> np.ndarray:
    z = np.where(keep, z, -np.inf)
    e = np.exp(z - z[keep].max())
    return e / e.sum()


def reference(logits, temperature, top_k=0, top_p=1.0, min_p=0.0, margin=1e-4):
    """(allowed mask, renormalised probabilities) by the filters' definitions, in float64.

    Raises if a top-p / min-p threshold lies within `margin` of a boundary, where float32
    rounding in the sampler could legitimately decide either way (the cases avoid that)."""
    z = np.asarray(logits, np.float64) / temperature
    v = z.shape[0]
    keep = np.ones(v, bool)
    if top_k > 0:  # keep the k largest (logits are distinct)
        keep &= z >= np.sort(z)[-min(top_k, v)]
    if top_p < 1.0:  # smallest set of most likely tokens whose mass reaches top_p
        p = masked_softmax(z, keep)
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        assert np.min(np.abs(cum - top_p)) > margin, "top_p too close to a cumulative mass"
        m = int(np.argmax(cum >= top_p)) + 1
        keep_p = np.zeros(v, bool)
        keep_p[order[:m]] = True
        keep &= keep_p
    if min_p > 0.0:  # prob >= min_p * max prob
        p = masked_softmax(z, keep)
        ratio = p / p.max()
        others = ratio[keep & (p < p.max())]  # the top token's ratio is exactly 1: always kept
        assert np.all(np.abs(others - min_p) > margin), "min_p too close to a probability ratio"
        keep &= ratio >= min_p
    return keep, masked_softmax(z, keep)


def hf_allowed(logits, temperature, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The allowed set according to transformers' warpers, applied in generate()'s order."""
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    s = torch.tensor(np.asarray(logits, np.float64))[None]
    if temperature != 1.0:
        s = lp.TemperatureLogitsWarper(temperature)(None, s)
    if top_k > 0:
        s = lp.TopKLogitsWarper(top_k)(None, s)
    if top_p < 1.0:
        s = lp.TopPLogitsWarper(top_p)(None, s)
    if min_p > 0.0:
        s = lp.MinPLogitsWarper(min_p)(None, s)
    return torch.isfinite(s[0]).numpy()


# --------------------------------------------------------------------------- cases
def _logits(i: int, scale: float = 1.5) -> np.ndarray:
    return (scale * np.random.default_rng(100 + i).normal(size=VOCAB)).astype(np.float32)


# top_k=2 then top_p=0.5: after top-k the renormalised masses are (4/7, 3/7), so top-p keeps
# only the first token; on the unfiltered distribution the mass before token 2 would be 0.4 < 0.5.
_RENORM = np.log(np.array([0.4, 0.3, 0.2, 0.04] + [0.005] * 12, np.float64)).astype(np.float32)

# (name, logits, temperature, top_k, top_p, min_p). Temperature 0 is greedy.
CASES = [
    ("plain T=1", _logits(0), 1.0, 0, 1.0, 0.0),
    ("temperature 0.5", _logits(1), 0.5, 0, 1.0, 0.0),
    ("temperature 2", _logits(2), 2.0, 0, 1.0, 0.0),
    ("top_k 3", _logits(3), 1.0, 3, 1.0, 0.0),
    ("top_k 1", _logits(4), 1.0, 1, 1.0, 0.0),
    ("top_k > vocab", _logits(5), 1.0, 100, 1.0, 0.0),
    ("top_p 0.6", _logits(6), 1.0, 0, 0.6, 0.0),
    ("top_p 0.9 T 1.5", _logits(7), 1.5, 0, 0.9, 0.0),
    ("top_p tiny keeps argmax", _logits(8), 1.0, 0, 1e-6, 0.0),
    ("min_p 0.2", _logits(9), 1.0, 0, 1.0, 0.2),
    ("min_p 0.05 T 0.7", _logits(10), 0.7, 0, 1.0, 0.05),
    ("min_p 1 keeps argmax", _logits(11), 1.0, 0, 1.0, 1.0),
    ("T 0.8 top_k 6 top_p 0.7", _logits(12), 0.8, 6, 0.7, 0.0),
    ("top_k 5 min_p 0.3", _logits(13), 1.0, 5, 1.0, 0.3),
    ("T 1.3 top_p 0.8 min_p 0.1", _logits(14), 1.3, 0, 0.8, 0.1),
    ("T 0.9 top_k 8 top_p 0.85 min_p 0.15", _logits(15), 0.9, 8, 0.85, 0.15),
    ("top_k 2 then top_p 0.5 (renormalised)", _RENORM, 1.0, 2, 0.5, 0.0),
    ("greedy ignores filters", _logits(17), 0.0, 3, 0.5, 0.1),
]
NAMES = [c[0] for c in CASES]
SEEDS = np.arange(len(CASES), dtype=np.uint32) * 7919 + 11


def _batch(cases, seeds):
    return dict(
        logits=jnp.asarray(np.stack([c[1] for c in cases])),
        temperature=jnp.asarray([c[2] for c in cases], jnp.float32),
        top_k=jnp.asarray([c[3] for c in cases], jnp.int32),
        top_p=jnp.asarray([c[4] for c in cases], jnp.float32),
        min_p=jnp.asarray([c[5] for c in cases], jnp.float32),
        rng=jnp.asarray(np.stack([sample_key(int(s)) for s in seeds])),
    )


@jax.jit
def _draw_many(logits, temperature, top_k, top_p, min_p, rng):
    """[N_DRAWS, slots]: draw i uses token index i for every slot."""
    steps = jnp.broadcast_to(jnp.arange(N_DRAWS, dtype=jnp.int32)[:, None], (N_DRAWS, logits.shape[0]))
    return jax.vmap(sample, in_axes=(None, None, None, None, None, None, 0))(
        logits, temperature, top_k, top_p, min_p, rng, steps)


@functools.cache
def draws() -> np.ndarray:
    return np.asarray(_draw_many(**_batch(CASES, SEEDS)))


# --------------------------------------------------------------------------- tests
STOCHASTIC = [i for i, c in enumerate(CASES) if c[2] > 0]


@pytest.mark.parametrize("case", STOCHASTIC, ids=[NAMES[i] for i in STOCHASTIC])
def test_reference_matches_transformers(case):
    """The NumPy definitions agree with HF's warpers (so 'HF order' below means what HF does)."""
    name, logits, t, k, p, mp = CASES[case]
    keep, _ = reference(logits, t, k, p, mp)
    np.testing.assert_array_equal(keep, hf_allowed(logits, t, k, p, mp), err_msg=name)


@pytest.mark.parametrize("case", range(len(CASES)), ids=NAMES)
def test_sampler_support_and_distribution(case):
    name, logits, t, k, p, mp = CASES[case]
    got = draws()[:, case]
    counts = np.bincount(got, minlength=VOCAB)
    if t == 0:
        assert np.all(got == np.argmax(logits)), f"{name}: greedy slot drew {np.unique(got)}"
        return
    keep, q = reference(logits, t, k, p, mp)
    outside = np.nonzero(counts * ~keep)[0]
    assert outside.size == 0, (
        f"{name}: drew tokens {outside.tolist()} (counts {counts[outside].tolist()}) outside the "
        f"allowed set {np.nonzero(keep)[0].tolist()}"
    )
    expected = N_DRAWS * q
    tol = SIGMAS * np.sqrt(N_DRAWS * q * (1 - q)) + SLACK
    bad = np.nonzero(np.abs(counts - expected) > tol)[0]
    assert bad.size == 0, (
        f"{name}: tokens {bad.tolist()} counts {counts[bad].tolist()} vs expected "
        f"{np.round(expected[bad], 1).tolist()} (tolerance {np.round(tol[bad], 1).tolist()})"
    )


def test_cases_exercise_the_filters():
    """Guard against vacuous cases: each filter case really removes tokens, each plain case none."""
    for name, logits, t, k, p, mp in CASES:
        if t == 0:
            continue
        n_keep = reference(logits, t, k, p, mp)[0].sum()
        filtered = (0 < k < VOCAB) or p < 1 or mp > 0
        assert (n_keep < VOCAB) == filtered, (name, n_keep)
        if "keeps argmax" in name or name == "top_k 1":
            assert n_keep == 1, name


def test_greedy_is_argmax_in_mixed_batch():
    """temperature 0 slots return argmax whatever their filters, keys and neighbours."""
    rng = np.random.default_rng(0)
    slots, vocab = 8, 258
    logits = jnp.asarray(rng.normal(size=(slots, vocab)).astype(np.float32))
    temperature = jnp.asarray([0, 1.0, 0, 0.5, 0, 2.0, 0, 0], jnp.float32)
    args = (logits, temperature, jnp.asarray([0, 0, 5, 3, 1, 0, 0, 2], jnp.int32),
            jnp.asarray([1, 0.9, 0.3, 1, 1, 0.5, 1e-3, 1], jnp.float32),
            jnp.asarray([0, 0, 0.5, 0, 0.9, 0.1, 0, 0], jnp.float32),
            jnp.asarray(rng.integers(0, 2**32, size=(slots, 2), dtype=np.uint32)),
            jnp.asarray(rng.integers(0, 100, size=slots, dtype=np.int32)))
    got = np.asarray(jax.jit(sample)(*args))
    greedy = np.asarray(temperature) == 0
    np.testing.assert_array_equal(got[greedy], np.argmax(np.asarray(logits), -1)[greedy])
    # All-greedy batch (the cheap lax.cond branch) too.
    got = np.asarray(jax.jit(sample)(args[0], jnp.zeros(slots, jnp.float32), *args[2:]))
    np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), -1))


def test_draw_is_batch_invariant():
    """A slot's draw depends only on its own logits, settings, seed and token index: move every
    case to another slot (reverse the batch) and replace half of the other slots' contents."""
    base = draws()
    n = len(CASES)
    junk = [("junk", _logits(50 + i, 3.0), 0.6 + 0.1 * i, i % 4, 0.95, 0.0) for i in range(n)]
    kept = [i for i in range(n) if i % 2 == 1]
    cases = [CASES[i] if i % 2 == 1 else junk[i] for i in range(n)][::-1]
    seeds = np.array([SEEDS[i] if i % 2 == 1 else 99 + i for i in range(n)], np.uint32)[::-1]
    other = np.asarray(_draw_many(**_batch(cases, seeds)))[:, ::-1]
    for i in kept:
        np.testing.assert_array_equal(other[:, i], base[:, i], err_msg=CASES[i][0])
    # The junk slots really changed (so the test compares different batches).
    assert not np.array_equal(other[:, 0], base[:, 0])


def test_seed_and_token_index_drive_the_draw():
    """Same seed + index -> same token (checked above); a different seed gives a different
    sequence, and the token index varies the draw (not one token repeated)."""
    cases = list(CASES)
    seeds = SEEDS.copy()
    seeds[0] += 1
    other = np.asarray(_draw_many(**_batch(cases, seeds)))
    base = draws()
    # Two independent streams over case 0's distribution agree at a position with probability
    # sum(q^2) ~= 0.21; a seed that were ignored would make them agree everywhere.
    assert np.mean(other[:, 0] == base[:, 0]) < 0.5
    np.testing.assert_array_equal(other[:, 1:], base[:, 1:])
    assert len(np.unique(base[:100, 0])) > 5


# --------------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("temperature", dict(temperature=-0.1)),
        ("temperature", dict(temperature=float("nan"))),
        ("temperature", dict(temperature=float("inf"))),
        ("top_p", dict(top_p=0.0)),
        ("top_p", dict(top_p=1.01)),
        ("top_p", dict(top_p=float("nan"))),
        ("min_p", dict(min_p=-0.01)),
        ("min_p", dict(min_p=1.5)),
        ("max_tokens", dict(max_tokens=0)),
        ("max_tokens", dict(max_tokens=-3)),
        ("seed", dict(seed=-1)),
        ("seed", dict(seed=2**32)),
        ("stop_token_ids", dict(stop_token_ids=(-1,))),
    ],
)
def test_sampling_params_rejects(field, kwargs):
    with pytest.raises(InvalidRequestError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", 2.0), ("max_tokens", True), ("top_k", 2.5), ("top_k", "3"), ("top_k", True),
     ("seed", 1.0), ("seed", True), ("stop_token_ids", (3, 1.5)), ("temperature", "0.5"),
     ("ignore_eos", 1)],
)
def test_sampling_params_rejects_wrong_types(field, value):
    # Set the field behind __init__'s back: under the test suite's runtime type checking
    # (jaxtyping + beartype on jaxinfer), SamplingParams(top_k=2.5) is already refused by the
    # type checker with a TypeCheckError; this checks validate()'s own answer, which is what a
    # user without runtime checks gets.
    sp = SamplingParams()
    object.__setattr__(sp, field, value)
    with pytest.raises(InvalidRequestError, match=rf"SamplingParams\.{field}\b"):
        sp.validate()


def test_sampling_params_stop_ids_checked_against_vocab():
    sp = SamplingParams(stop_token_ids=(5, 258))
    sp.validate(vocab_size=259)
    with pytest.raises(InvalidRequestError, match=r"SamplingParams\.stop_token_ids"):
        sp.validate(vocab_size=258)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=0.0), dict(top_p=1.0), dict(top_p=1e-9), dict(min_p=0.0), dict(min_p=1.0),
     dict(top_k=0), dict(top_k=-1), dict(seed=0), dict(seed=2**32 - 1), dict(max_tokens=1),
     dict(stop_token_ids=[0, 7])],
)
def test_sampling_params_accepts_boundaries(kwargs):
    SamplingParams(**kwargs).validate(vocab_size=8)


# --------------------------------------------------------------------------- host-side keys
def test_make_requests_key_matches_jax_random_key():
    seeds = [0, 1, 42, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
    cfg = EngineConfig(max_slots=2, page_size=4, num_pages=8, max_seq_len=16)
    req = make_requests(cfg, [[1, 2]] * len(seeds), [SamplingParams(seed=s) for s in seeds],
                        list(range(len(seeds))), batch=len(seeds) + 1, seq=16)
    assert req.rng.dtype == np.uint32
    for row, s in enumerate(seeds):
        want = np.asarray(jax.random.key_data(jax.random.key(s, impl="threefry2x32")))
        np.testing.assert_array_equal(req.rng[row], want, err_msg=f"seed {s}")
        np.testing.assert_array_equal(np.asarray(sample_key(s)), want, err_msg=f"seed {s}")
    np.testing.assert_array_equal(req.rng[len(seeds)], [0, 0])  # padding row
