"""Token-level divergences: hand-computed values, mathematical properties, and
``masked_divergence`` (masking, temperature, chunking + checkpointing) checked
against a naive float64 reference written here from the definitions: KL, the
generalised JSD(beta) of the GKD paper (Agarwal et al. 2024, Eq. 1, with TRL's
beta = 0 / 1 endpoints, ``generalized_jsd_loss``), DistiLLM's skew KLs and
the total variation distance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distillkit.builtins.divergences import BUILTIN_DIVERGENCES
from distillkit.engine.losses import masked_cross_entropy, masked_divergence, masked_token_divergences

DIVS = {d.name: d for d in BUILTIN_DIVERGENCES}
DEFAULTS = {"jsd": {"beta": 0.5}, "skew_forward_kl": {"alpha": 0.1}, "skew_reverse_kl": {"alpha": 0.1}}
CASES = [
    ("forward_kl", {}), ("reverse_kl", {}), ("tvd", {}),
    ("jsd", {}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.9}), ("jsd", {"beta": 1.0}),
    ("skew_forward_kl", {}), ("skew_forward_kl", {"alpha": 0.5}),
    ("skew_reverse_kl", {}), ("skew_reverse_kl", {"alpha": 0.3}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in p.items()) for name, p in CASES]
PROPS = settings(max_examples=30, deadline=None)


# --- naive float64 reference ---------------------------------------------------

def ref_kl(logp, logq):
    """KL(p||q) per row: a term with p = 0 is 0, one with p > 0 = q is +inf (double-where, so grads stay finite)."""
    ok = logp != -math.inf
    lp, lq = torch.where(ok, logp, 0.0), torch.where(ok, logq, 0.0)
    return torch.where(ok, lp.exp() * (lp - lq), 0.0).sum(-1)


def ref_per_row(name, trainable, target, temperature=1.0, **params):
    """Divergence per row of (N, V) logits, straight from the definitions."""
    params = {**DEFAULTS.get(name, {}), **params}
    lq = torch.log_softmax(trainable.double() / temperature, -1)
    lp = torch.log_softmax(target.double() / temperature, -1)
    p, q = lp.exp(), lq.exp()
    if name == "forward_kl" or (name == "jsd" and params["beta"] == 0.0):
        return ref_kl(lp, lq)
    if name == "reverse_kl" or (name == "jsd" and params["beta"] == 1.0):
        return ref_kl(lq, lp)
    if name == "jsd":
        b = params["beta"]
        log_m = torch.log(b * p + (1 - b) * q)
        return b * ref_kl(lp, log_m) + (1 - b) * ref_kl(lq, log_m)
    if name == "skew_forward_kl":
        a = params["alpha"]
        return ref_kl(lp, torch.log(a * p + (1 - a) * q))
    if name == "skew_reverse_kl":
        a = params["alpha"]
        return ref_kl(lq, torch.log((1 - a) * p + a * q))
    assert name == "tvd"
    return 0.5 * (p - q).abs().sum(-1)


def ref_masked(name, trainable, target, mask, temperature=1.0, **params):
    return ref_per_row(name, trainable[mask], target[mask], temperature, **params).mean()


def logits_and_mask(seed, shape=(2, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    b = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(shape[:2], generator=g) < 0.7
    mask[0, 1], mask[1, 3] = True, False  # at least one position in, one out
    return a.float(), b.float(), mask


def value_and_grads(fn, trainable, target):
    x, y = trainable.clone().requires_grad_(), target.clone().requires_grad_()
    value = fn(x, y)
    return (value, *torch.autograd.grad(value, (x, y)))


# --- hand-computed values --------------------------------------------------------

P, Q = [0.5, 0.5], [0.9, 0.1]  # target P, trainable Q


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


HAND = [
    ("forward_kl", {}, 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)),
    ("reverse_kl", {}, 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)),
    ("jsd", {}, 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3))
     + 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))),  # M = [0.7, 0.3]
    ("jsd", {"beta": 0.2}, 0.2 * kl(P, [0.82, 0.18]) + 0.8 * kl(Q, [0.82, 0.18])),
    ("jsd", {"beta": 0.0}, kl(P, Q)),
    ("jsd", {"beta": 1.0}, kl(Q, P)),
    ("skew_forward_kl", {}, kl(P, [0.86, 0.14])),  # 0.1 P + 0.9 Q
    ("skew_forward_kl", {"alpha": 0.5}, kl(P, [0.7, 0.3])),
    ("skew_reverse_kl", {}, kl(Q, [0.54, 0.46])),  # 0.9 P + 0.1 Q
    ("tvd", {}, 0.4),
]


@pytest.mark.parametrize("name,params,expected", HAND, ids=[f"{n}{p}" for n, p, _ in HAND])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_hand_computed_two_token_values(name, params, expected, temperature):
    """Logits tau*log(p) + c recover p after the temperature and the softmax."""
    trainable = (temperature * torch.tensor(Q).log() + 3.0).view(1, 1, 2)
    target = (temperature * torch.tensor(P).log() - 1.0).view(1, 1, 2)
    mask = torch.ones(1, 1, dtype=torch.bool)
    value = masked_divergence(DIVS[name], trainable, target, mask, temperature=temperature, **params)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("beta", [0.5, 0.2, 0.9])
def test_jsd_of_disjoint_supports_is_the_binary_entropy(beta):
    """P = [1, 0], Q = [0, 1]: JSD_beta = H(beta) (ln 2 at beta = 0.5), TVD = 1."""
    p = torch.tensor([[0.0, -math.inf]])
    q = torch.tensor([[-math.inf, 0.0]])
    h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert DIVS["jsd"].per_token(q, p, beta=beta).item() == pytest.approx(h, rel=1e-6)
    assert DIVS["tvd"].per_token(q, p).item() == pytest.approx(1.0)


def test_default_parameters_match_the_spec():
    assert DIVS["jsd"].params == {"beta": 0.5}
    assert DIVS["skew_forward_kl"].params == {"alpha": 0.1} == DIVS["skew_reverse_kl"].params
    assert DIVS["ab"].params == {"alpha": 0.2, "beta": 0.7}
    assert set(DIVS) == {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "ab"}


# --- properties (hypothesis, per_token on float64 log-probs) ----------------------

@st.composite
def logp_pairs(draw):
    n, v = draw(st.integers(1, 3)), draw(st.integers(2, 8))
    floats = st.floats(-15, 15, allow_nan=False)
    a = torch.tensor(draw(st.lists(floats, min_size=n * v, max_size=n * v)), dtype=torch.float64)
    b = torch.tensor(draw(st.lists(floats, min_size=n * v, max_size=n * v)), dtype=torch.float64)
    return torch.log_softmax(a.view(n, v), -1), torch.log_softmax(b.view(n, v), -1)


def per_token(name, a, b, **params):
    return DIVS[name].per_token(a, b, **{**DIVS[name].params, **params})


@PROPS
@given(logp_pairs())
def test_zero_for_identical_and_non_negative(pair):
    a, b = pair
    for name, params in CASES:
        assert per_token(name, a, a, **params).abs().max().item() < 1e-12, name
        assert per_token(name, a, b, **params).min().item() >= -1e-12, name


@PROPS
@given(logp_pairs())
def test_symmetries(pair):
    a, b = pair
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_token("jsd", a, b), per_token("jsd", b, a), **close)
    torch.testing.assert_close(per_token("tvd", a, b), per_token("tvd", b, a), **close)
    torch.testing.assert_close(per_token("forward_kl", a, b), per_token("reverse_kl", b, a), **close)
    for alpha in (0.1, 0.6):  # KL(A || aA + (1-a)B) both ways round
        torch.testing.assert_close(per_token("skew_reverse_kl", a, b, alpha=alpha),
                                   per_token("skew_forward_kl", b, a, alpha=alpha), **close)


@PROPS
@given(logp_pairs())
def test_jsd_endpoints_are_exactly_the_kls(pair):
    a, b = pair
    assert torch.equal(per_token("jsd", a, b, beta=0.0), per_token("forward_kl", a, b))
    assert torch.equal(per_token("jsd", a, b, beta=1.0), per_token("reverse_kl", a, b))


@PROPS
@given(logp_pairs(), st.sampled_from([0.1, 0.3, 0.5, 0.8]))
def test_bounds(pair, w):
    """JSD_beta <= H(beta) (<= ln 2); skew KLs <= -ln(alpha); TVD in [0, 1]."""
    a, b = pair
    h = -w * math.log(w) - (1 - w) * math.log(1 - w)
    assert per_token("jsd", a, b, beta=w).max().item() <= h + 1e-12
    assert per_token("jsd", a, b).max().item() <= math.log(2) + 1e-12
    assert per_token("skew_forward_kl", a, b, alpha=w).max().item() <= -math.log(w) + 1e-12
    assert per_token("skew_reverse_kl", a, b, alpha=w).max().item() <= -math.log(w) + 1e-12
    tvd = per_token("tvd", a, b)
    assert tvd.min().item() >= 0.0 and tvd.max().item() <= 1.0 + 1e-12


# --- masked_divergence against the reference ------------------------------------

@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_values_and_gradients_match_reference(name, params, temperature, chunk_size):
    a, b, mask = logits_and_mask(seed=chunk_size)
    assert mask.sum() > chunk_size or chunk_size == 1024  # several chunks when chunk_size = 3
    got = value_and_grads(lambda x, y: masked_divergence(
        DIVS[name], x, y, mask, temperature=temperature, chunk_size=chunk_size, **params), a, b)
    want = value_and_grads(lambda x, y: ref_masked(name, x, y, mask, temperature, **params), a.double(), b.double())
    for g, w, what in zip(got, want, ("value", "d/trainable", "d/target")):
        assert g.dtype == torch.float32, what
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7, msg=f"{what} differs")
    assert want[1].abs().sum() > 0 and want[2].abs().sum() > 0


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_bf16_inputs_give_fp32_result(name):
    a, b, mask = logits_and_mask(seed=7)
    a, b = a.bfloat16(), b.bfloat16()
    value = masked_divergence(DIVS[name], a, b, mask, chunk_size=3)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(ref_masked(name, a.double(), b.double(), mask).item(), rel=1e-5)


def test_masked_positions_do_not_influence_the_result():
    a, b, mask = logits_and_mask(seed=3)
    for name, params in CASES:
        run = lambda x, y, name=name, params=params: masked_divergence(  # noqa: E731
            DIVS[name], x, y, mask, chunk_size=3, **params)
        v1, ga1, gb1 = value_and_grads(run, a, b)
        noise = torch.randn(a.shape) * 5 * (~mask).unsqueeze(-1)
        v2, ga2, gb2 = value_and_grads(run, a + noise, b - noise)
        assert torch.equal(v1, v2), name
        for g1, g2 in ((ga1, ga2), (gb1, gb2)):
            assert torch.equal(g1[mask], g2[mask]), name
            assert not g2[~mask].any(), name


@pytest.mark.parametrize("name", sorted(DIVS))
def test_empty_mask_gives_zero(name):
    a, b, _ = logits_and_mask(seed=4)
    mask = torch.zeros(a.shape[:2], dtype=torch.bool)
    assert masked_divergence(DIVS[name], a, b, mask).item() == 0.0


# --- -inf logits -----------------------------------------------------------------

SHARED_CASES = [("forward_kl", {}), ("reverse_kl", {}), ("skew_forward_kl", {}), ("skew_reverse_kl", {}), ("tvd", {})]
SHARED_CASES += [("jsd", {"beta": beta}) for beta in (0.0, 0.3, 0.5, 1.0)]


def reduced_vocab_reference(name, trainable, target, mask, temperature=1.0, **params):
    """Mean over the masked rows of ``ref_per_row`` on each row's vocabulary with its
    -inf columns (shared by both sides) removed; the removed columns get gradient 0."""
    rows = []
    for x, y in zip(trainable[mask], target[mask]):
        keep = torch.isfinite(x)
        rows.append(ref_per_row(name, x[keep][None], y[keep][None], temperature, **params))
    return torch.cat(rows).mean()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), chunk_size=st.sampled_from([2, 1024]), temperature=st.sampled_from([1.0, 1.7]))
@pytest.mark.parametrize("name,params", SHARED_CASES, ids=[f"{n}{p}" for n, p in SHARED_CASES])
def test_shared_inf_columns_match_the_reduced_vocabulary(name, params, seed, chunk_size, temperature):
    """Regression: logaddexp(-inf, -inf) and 0 * inf in backward made jsd and the skew KLs all-NaN in such rows."""
    a, b, mask = logits_and_mask(seed)
    g = torch.Generator().manual_seed(seed)
    shared = (torch.rand(mask.shape, generator=g) < 0.6).unsqueeze(-1) & (torch.rand(a.shape, generator=g) < 0.4)
    shared[..., :2] = False  # at least two live columns in every row
    shared[0, 1, 5] = True  # and at least one masked column in a scored row
    a, b = a.masked_fill(shared, -math.inf), b.masked_fill(shared, -math.inf)
    got = value_and_grads(lambda x, y: masked_divergence(
        DIVS[name], x, y, mask, temperature=temperature, chunk_size=chunk_size, **params), a, b)
    want = value_and_grads(lambda x, y: reduced_vocab_reference(name, x, y, mask, temperature, **params),
                           a.double(), b.double())
    for g_, w, what in zip(got, want, ("value", "d/trainable", "d/target")):
        assert torch.isfinite(g_).all(), f"non-finite {what}"
        torch.testing.assert_close(g_.double(), w, rtol=1e-5, atol=1e-7, msg=f"{what} differs")
    assert not got[1][shared].any() and not got[2][shared].any()


def one_sided_inf_case(side):
    """-inf columns on one side only: q = 0 there (side 'trainable') or p = 0 ('target'), in some rows."""
    a, b, mask = logits_and_mask(seed=11)
    x = a if side == "trainable" else b
    x[0, :, :3] = -math.inf
    x[1, 0, 7] = -math.inf
    return a, b, mask


def infinite_kl(name, params, side):
    """KL(A||B) is +inf where A > 0 = B: forward KL with q = 0, reverse KL with p = 0."""
    beta = params.get("beta", 0.5)
    forward = name == "forward_kl" or (name == "jsd" and beta == 0.0)
    reverse = name == "reverse_kl" or (name == "jsd" and beta == 1.0)
    return (forward and side == "trainable") or (reverse and side == "target")


@pytest.mark.parametrize("side", ["trainable", "target"])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_one_sided_inf_columns_give_inf_kl_and_finite_mixtures(name, params, side):
    """Forward/reverse KL are +inf in exactly the rows with a zero where the other side has mass (never a
    silently dropped term); jsd (0 < beta < 1), the skew KLs and tvd stay finite and match the reference."""
    a, b, mask = one_sided_inf_case(side)
    got = masked_token_divergences(DIVS[name], a, b, mask, temperature=1.5, chunk_size=3, **params)
    want = ref_per_row(name, a[mask].double(), b[mask].double(), 1.5, **params)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    inf_rows = torch.isinf(a[mask] if side == "trainable" else b[mask]).any(-1)
    if infinite_kl(name, params, side):
        assert (got[inf_rows] == math.inf).all() and torch.isfinite(got[~inf_rows]).all()
    else:
        assert torch.isfinite(got).all()


ONE_SIDED_FINITE = [(n, p, s) for s in ("trainable", "target") for n, p in CASES if not infinite_kl(n, p, s)]


@pytest.mark.parametrize("name,params,side", ONE_SIDED_FINITE, ids=[f"{n}{p}-{s}" for n, p, s in ONE_SIDED_FINITE])
def test_one_sided_inf_columns_give_finite_gradients(name, params, side):
    """Regression: 0 * (-inf) in the unselected branch of torch.where used to leak NaN into backward."""
    a, b, mask = one_sided_inf_case(side)
    got = value_and_grads(lambda x, y: masked_divergence(
        DIVS[name], x, y, mask, temperature=1.5, chunk_size=3, **params), a, b)
    want = value_and_grads(lambda x, y: ref_masked(name, x, y, mask, 1.5, **params), a.double(), b.double())
    for g, w, what in zip(got, want, ("value", "d/trainable", "d/target")):
        assert torch.isfinite(g).all(), f"non-finite {what}"
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7, msg=f"{what} differs")


@pytest.mark.parametrize("side", ["trainable", "target"])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_nan_logit_gives_nan_value(name, params, side):
    """Regression: _kl dropped non-finite terms, so a NaN loss read as a finite number."""
    a, b, mask = logits_and_mask(seed=12)
    (a if side == "trainable" else b)[0, 1, 4] = math.nan  # mask[0, 1] is set
    assert torch.isnan(masked_divergence(DIVS[name], a, b, mask, chunk_size=3, **params))


# --- cross-entropy ---------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_masked_cross_entropy_matches_torch(chunk_size):
    logits, _, mask = logits_and_mask(seed=5)
    labels = torch.randint(0, logits.shape[-1], mask.shape, generator=torch.Generator().manual_seed(0))
    labels[~mask] = -100  # only masked rows are read
    x, x64 = logits.clone().requires_grad_(), logits.double().requires_grad_()
    got = masked_cross_entropy(x, labels, mask, chunk_size=chunk_size)
    want = F.cross_entropy(x64[mask], labels[mask])
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0].double(), torch.autograd.grad(want, x64)[0],
                               rtol=1e-5, atol=1e-7)
    assert masked_cross_entropy(logits, labels, torch.zeros_like(mask)).item() == 0.0


# --- memory-boundedness (what autograd saves), not timing -------------------------

class SavedTensors:
    """Record what autograd saves (outside checkpointed regions): element
    counts, and the bytes of the distinct storages behind them."""

    def __init__(self, *ignore):
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self.numels, self.storages = [], {}

    def __enter__(self):
        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.ignore:
                self.numels.append(t.numel())
                self.storages[storage.data_ptr()] = storage.nbytes()
            return t
        self.ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def test_chunked_backward_saves_no_full_size_intermediates():
    """jsd (the divergence with the most intermediates) on GPT-2-sized logits:
    autograd keeps the gathered fp32 rows (the chunk inputs), nothing per chunk."""
    B, T, V, chunk = 2, 64, 50257, 16
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, T, V, generator=g).requires_grad_()
    b = torch.randn(B, T, V, generator=g).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    limit = chunk * V * 2

    with SavedTensors(a, b) as control:  # the hooks do see an unchunked computation of 3 chunks' rows
        rows = torch.log_softmax(a[:, : 3 * chunk].reshape(-1, V), -1)
        DIVS["jsd"].per_token(rows, rows.detach(), beta=0.5)
    assert max(control.numels) > limit

    with SavedTensors(a, b) as saved:
        value = masked_divergence(DIVS["jsd"], a, b, mask, chunk_size=chunk)
    assert max(saved.numels, default=0) <= limit, sorted(saved.numels)[-3:]
    gathered = 2 * B * T * V * 4  # trainable[mask] and target[mask] in fp32
    assert sum(saved.storages.values()) <= gathered + limit * 4, sorted(saved.storages.values())[-3:]
    ga, gb = torch.autograd.grad(value, (a, b))
    assert ga.shape == gb.shape == (B, T, V)
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all() and ga.abs().sum() > 0


# --- errors ----------------------------------------------------------------------

def test_errors():
    a, b, mask = logits_and_mask(seed=6)
    with pytest.raises(ValueError, match="no parameter"):
        masked_divergence(DIVS["forward_kl"], a, b, mask, beta=0.5)
    with pytest.raises(ValueError, match="no parameter"):
        masked_divergence(DIVS["jsd"], a, b, mask, alpha=0.5)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            masked_divergence(DIVS["jsd"], a, b, mask, beta=beta)
    with pytest.raises(ValueError, match="shape"):
        masked_divergence(DIVS["forward_kl"], a, b[..., :-1], mask)


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "tvd"])
def test_inf_trainable_column_gives_finite_value(name):
    """Regression: the chunk accumulator started as rows.sum() * 0, which is NaN when a row holds -inf."""
    a, b, mask = logits_and_mask(seed=5)
    a = a.clone()
    a[..., 0] = float("-inf")
    value = masked_divergence(DIVS[name], a, b, mask, chunk_size=3)
    assert torch.isfinite(value)
