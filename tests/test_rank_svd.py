import math

import pytest
import torch

from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.lowrank import LowRank
from lib_ortholora.rank import RankPolicy, parse_policy
from lib_ortholora.svd import exact_svd, factor_svd, randomized_svd, truncated_svd

S = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.25])
SHAPE = (6, 40)


@pytest.mark.parametrize("policy,expected", [
    ("fixed=3", 3), ("fixed=99", 6),
    ("sv_ratio=4", 2),          # σ ≥ 10/4 = 2.5 → 10, 5
    ("sv_ratio=5", 3),          # σ ≥ 2 (ties kept)
    ("threshold=1", 3),         # σ > 1 → 10, 5, 2
    ("fro=0.99", 4),            # (100+25+4)/130.3125 = 0.98993 < 0.99; +1 → 0.99760
    ("fro=0.95", 2),            # 125/130.3125 = 0.9592
    ("cumulative=0.9", 3),      # 17/18.75 = 0.9067
    ("cumulative=1", 6),        # every singular value can be kept
    ("sv_ratio=100,max=2", 2), ("threshold=100,min=2", 2),
])
def test_policies_on_handmade_spectrum(policy, expected):
    assert parse_policy(policy).choose(S, SHAPE, float(S.square().sum())) == expected


def test_fraction_policy():
    p = RankPolicy("fraction", 0.08, 8, 96)
    assert p.cap((320, 320)) == math.ceil(0.08 * 320)
    assert p.cap((1280, 1280, 3, 3)) == 96
    assert p.cap((40, 20)) == 8
    assert p.cap((4, 20)) == 4  # never above full rank


def test_fro_with_partial_spectrum_uses_energy():
    full = float(S.square().sum())
    assert parse_policy("fro=0.95,max=3").choose(S[:3], SHAPE, full) == 2
    assert parse_policy("fro=0.999,max=3").choose(S[:3], SHAPE, full) == 3


@pytest.mark.parametrize("bad", ["", "foo=1", "fro=1.5", "sv_ratio=0.5", "fixed=-1", "fro", "fro=x",
                                 "fro=0.9,max=0", "fro=0.9,cumulative=0.5"])
def test_bad_policies(bad):
    with pytest.raises(OrthoLoraError):
        parse_policy(bad)


def test_randomized_svd_matches_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 30, generator=g) @ torch.randn(30, 300, generator=g) + 0.05 * torch.randn(200, 300, generator=g)
    u, s, vh = randomized_svd(a, 20)
    ue, se, vhe = exact_svd(a)
    assert torch.allclose(s, se[:20], rtol=1e-3)
    best = (a - (ue[:, :20] * se[:20]) @ vhe[:20]).norm()
    assert (a - (u * s) @ vh).norm() <= 1.01 * best
    u2, s2, _ = truncated_svd(a, 150)  # large k → exact path
    assert torch.allclose(s2, se[:150], rtol=1e-4)


@pytest.mark.parametrize("scale", [1.0, -0.3])
@pytest.mark.parametrize("shape", [(50, 70), (30, 4, 3, 3), (5, 100)])
def test_factor_svd_equals_dense_svd(scale, shape):
    g = torch.Generator().manual_seed(1)
    inner = math.prod(shape[1:])
    lr = LowRank(torch.randn(shape[0], 8, generator=g), torch.randn(8, inner, generator=g), scale, shape)
    dense = lr.delta().reshape(shape[0], -1)
    f = factor_svd(lr)
    u, s, vh = f.u(), f.s.float(), f.vh()
    se = torch.linalg.svdvals(dense)
    n = min(len(s), len(se))  # directions past the layer's rank are exact zeros
    assert torch.allclose(s[:n], se[:n], rtol=1e-4, atol=1e-4 * float(se[0])) and not s[n:].any()
    assert torch.allclose((u * s) @ vh, dense, atol=1e-4 * float(dense.abs().max()))
    assert lr.norm() == pytest.approx(float(dense.norm()), rel=1e-5)
