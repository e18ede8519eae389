"""EpipolarAttention: the geometry against points of a synthetic 3D scene, the attention against a materialised
extended-attention reference, the pipelines (SD3 CFG, SD3.5, FLUX), the schedule's off state, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnctl
from attnctl import Camera, EpipolarAttention
from attnctl.controls.base import RunState
from attnctl.epipolar import TokenGeometry, fundamental, line_distance, token_centres
from attnctl.errors import ConfigError, LayoutError
from attnctl.layout import TokenLayout
from attnctl.pipelines import AttnCtlFluxPipeline, AttnCtlSD3Pipeline
from attnctl.processors.attend import attend
from attnctl.processors.base import SiteCall
from attnctl.sites import Site

KW = dict(num_inference_steps=2, height=32, width=48, max_sequence_length=24)
PROMPT = "a red circle and a blue square"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rig(size=(64.0, 48.0)) -> list[Camera]:
    """Three views of a scene around the origin: an orbit with height and a rolled camera."""
    return [Camera.look_at([0.0, 0.0, -4.0], [0.0, 0.0, 0.0], fov=60, size=size),
            Camera.look_at([2.0, -1.0, -3.5], [0.0, 0.0, 0.0], fov=60, size=size),
            Camera.look_at([-1.5, 0.5, -3.8], [0.2, 0.0, 0.0], fov=60, size=size, up=[0.5, -0.87, 0.0])]


def scene(n: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * 2.0  # a cube of side 2 at the origin


# ------------------------------------------------------------------------------------------------ the geometry


def test_look_at_points_the_camera_at_its_target():
    cam = Camera.look_at([1.0, -2.0, -3.0], [0.5, 0.0, 0.0], fov=90, size=(40, 30))
    R = torch.tensor(cam.R, dtype=torch.float64)
    assert torch.allclose(R @ R.T, torch.eye(3, dtype=R.dtype), atol=1e-9)
    assert torch.allclose(cam.project(torch.tensor([[0.5, 0.0, 0.0]])), torch.tensor([[20.0, 15.0]],
                                                                                    dtype=torch.float64))
    assert math.isclose(cam.K[0][0], 20.0)  # 90° across 40 pixels: f = 20
    below = cam.project(torch.tensor([[0.5, 1.0, 0.0]]))  # world y points down the image
    assert float(below[0, 1]) > 15.0


def test_every_point_of_a_3d_scene_lies_on_its_epipolar_line():
    cams, X = rig(), scene()
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            F = fundamental(cams[i], cams[j])
            xi, xj = cams[i].project(X), cams[j].project(X)
            d = line_distance(F, xi, xj).diagonal()
            assert float(d.max()) < 1e-6  # pixels
            other = line_distance(F, xi, xj.roll(1, 0)).diagonal()  # a wrong match is far off its line
            assert float(other.median()) > 1.0


def test_the_token_of_each_projected_point_falls_inside_the_band():
    """The token holding a point in view i and the token holding it in view j: the token distance from the band's
    line is below one token plus the half-diagonal shifts of both token centres, whatever the rig."""
    cams, X = rig(), scene(400)
    grid = (12, 16)  # 48 × 64 pixels in tokens of 4
    for i, j in [(0, 1), (1, 2), (2, 0)]:
        geo = TokenGeometry(cams[i], cams[j], grid)
        xi, xj = cams[i].project(X), cams[j].project(X)
        inside = ((xi[:, 0] >= 0) & (xi[:, 0] < 64) & (xi[:, 1] >= 0) & (xi[:, 1] < 48)
                  & (xj[:, 0] >= 0) & (xj[:, 0] < 64) & (xj[:, 1] >= 0) & (xj[:, 1] < 48))
        ti = (xi[inside, 1] // 4).long() * 16 + (xi[inside, 0] // 4).long()
        tj = (xj[inside, 1] // 4).long() * 16 + (xj[inside, 0] // 4).long()
        assert inside.sum() > 50
        d = geo.distances(0, grid[0] * grid[1])[ti, tj]
        assert float(d.max()) < 2.0, float(d.max())
        ctl = EpipolarAttention(cameras=cams, band=2.0)
        assert bool((ctl.bias(d, 0.0) == 0).all())  # every true correspondence keeps its key


def _seen_distances(view_i: Camera, view_j: Camera, grid: tuple[int, int]) -> torch.Tensor:
    """By brute force: token distances of view j's token centres from the projections, into view j, of dense points
    of each view-i token's ray that lie in front of both cameras (none seen: far away)."""
    h, w = grid
    W, H = view_i.size
    token = math.sqrt((W / w) * (H / h))
    Ki, Ri, ti = view_i.tensors()
    Kj, Rj, tj = view_j.tensors()
    ys, xs = torch.meshgrid((torch.arange(h, dtype=torch.float64) + 0.5) * H / h,
                            (torch.arange(w, dtype=torch.float64) + 0.5) * W / w, indexing="ij")
    pix = torch.stack([xs.flatten(), ys.flatten()], 1)
    rays = torch.cat([pix, torch.ones(h * w, 1, dtype=torch.float64)], 1) @ torch.linalg.inv(Ki).T @ Ri
    s = torch.logspace(-4, 4, 8001, dtype=torch.float64)  # depths along each ray, in front of camera i
    cam_j = (-Ri.T @ ti + s[None, :, None] * rays[:, None, :]) @ Rj.T + tj  # (tokens, samples, 3)
    seen = cam_j @ Kj.T
    seen = torch.where(cam_j[..., 2:] > 0, seen[..., :2] / seen[..., 2:], 1e9)  # behind camera j: far away
    return torch.cdist(pix.expand(h * w, -1, -1), seen).min(2).values / token


@pytest.mark.parametrize("pose", ["orbit", "facing", "behind", "rectified"])
def test_the_visible_part_of_each_line_matches_projected_rays_in_front_of_both_cameras(pose):
    """The distance from a line's visible part equals the distance from densely projected points of the ray that
    lie in front of both cameras: for an orbit pair, cameras facing each other (epipole inside the image), the
    second camera behind the first, and a rectified pair (epipole at infinity)."""
    size = (48.0, 32.0)
    poses = {"orbit": ([0, 0, -4], [0, 0, 0], [2.5, -0.5, -3], [0, 0, 0]),
             "facing": ([0, 0, -3], [0, 0, 0], [0.6, 0.3, 3], [0, 0, 0]),
             "behind": ([0, 0, 0], [0, 0, 1], [0.5, 0.2, -2], [0.5, 0.2, -1]),
             "rectified": ([0, 0, 0], [0, 0, 1], [0.3, 0, 0], [0.3, 0, 1])}[pose]
    cams = [Camera.look_at(poses[0], poses[1], fov=70, size=size),
            Camera.look_at(poses[2], poses[3], fov=70, size=size)]
    for i, j in [(0, 1), (1, 0)]:
        got = TokenGeometry(cams[i], cams[j], (4, 6), in_front=True).distances(0, 24).double()
        want = _seen_distances(cams[i], cams[j], (4, 6))
        near = want < 3
        assert bool(near.any()) and bool(((got < 3) == near).float().mean() > 0.98)
        assert torch.allclose(got[near], want[near], atol=1e-2), (got[near] - want[near]).abs().max()
        assert bool((got[~near] > 2.99).all())
        full = TokenGeometry(cams[i], cams[j], (4, 6), in_front=False).distances(0, 24)
        assert bool((got >= full - 1e-4).all())  # the visible part of a line is a part of it
        if pose in ("facing", "behind"):
            assert bool((got > full + 0.5).any())  # and there the rest of the line is in view


def dolly(size: tuple[float, float]) -> list[Camera]:
    """The second camera straight behind the first, on its optical axis: each view's epipole is its image centre."""
    return [Camera.look_at([0, 0, -4], [0, 0, 0], size=size), Camera.look_at([0, 0, -3], [0, 0, 0], size=size)]


@pytest.mark.parametrize("in_front", [False, True])
def test_a_token_on_the_epipole_is_measured_from_the_one_point_its_ray_is_in_the_other_view(in_front):
    """On a 5 × 7 grid the middle token sits on the epipole, where F·u = 0. Its ray is one point of the other view,
    that view's epipole (here its centre): the distances are from that point, as densely projected rays give them,
    not 0 from every key (the whole other view in its band) nor NaN (``in_front``)."""
    size, grid, mid = (56.0, 40.0), (5, 7), 2 * 7 + 3  # tokens of 8 pixels; token (2, 3) is centred at (28, 20)
    cams = dolly(size)
    from_centre = (token_centres(grid, size) - torch.tensor([28.0, 20.0], dtype=torch.float64)).norm(dim=1) / 8
    for i, j in [(0, 1), (1, 0)]:
        got = TokenGeometry(cams[i], cams[j], grid, in_front=in_front).distances(0, 35).double()
        assert not bool(got.isnan().any())
        assert torch.allclose(got[mid], from_centre, atol=1e-5)
        assert int((got[mid] <= 1.0).sum()) == 5  # the centre and its four neighbours, not all 35
        if in_front:
            want = _seen_distances(cams[i], cams[j], grid)
            near = (want < 3) | (got < 3)  # far ones are sampled coarsely
            assert torch.allclose(got[near], want[near], atol=1e-2)


@pytest.mark.parametrize("case", ["dolly", "alpha 0"])
def test_the_soft_falloff_in_front_makes_no_nan(case, sd3_pipe):
    """Two ways the soft falloff with ``in_front`` turned every view to NaN: a token on the epipole (its distances
    were NaN), and ``alpha=0`` with keys at an infinite distance (−0·∞). Such keys get −∞ whatever alpha."""
    if case == "dolly":  # 44 × 44 pixels: an 11 × 11 grid, whose middle token is on the epipole
        cams, alpha, size = dolly((44.0, 44.0)), 3.0, dict(height=44, width=44)
    else:  # the second camera behind the first, looking off to the side: some of its rays the first cannot see
        cams = [Camera.look_at([0, 0, 0], [0, 0, 1], fov=60, size=(48, 32)),
                Camera.look_at([0, 0, -2], [3, 0, -1.2], fov=90, size=(48, 32))]
        alpha, size = 0.0, dict(height=32, width=48)
        ctl = EpipolarAttention(cameras=cams, falloff="soft", alpha=0.0, in_front=True)
        d = ctl.geometry((2, 3), "cpu")[(1, 0)].distances(0, 6)
        assert bool(d.isinf().any())
        b = ctl.bias(d, 0.0)
        assert bool((b[d.isinf()] == float("-inf")).all()) and bool((b[d.isfinite()] == 0).all())
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    ctl = EpipolarAttention(cameras=cams, falloff="soft", alpha=alpha, in_front=True)
    out = pipe(PROMPT, generator=gen(), output_type="latent", controls=[ctl],
               **{**KW, **size}).images
    assert ctl.calls > 0 and bool(torch.isfinite(out).all())


def test_cameras_that_see_nothing_in_common_are_warned_and_couple_nothing_in_front():
    """Back to back, every line of one view is the image of points behind the other camera. The whole lines (the
    default) still cross the views, and a warning says they mean nothing; with ``in_front=True`` no key is in a band
    (the "couples nothing" warning)."""
    cams = [Camera.look_at([0, 0, 0], [0, 0, 1], size=(48, 32)), Camera.look_at([0.5, 0, 0], [0.5, 0, -1],
                                                                                  size=(48, 32))]
    whole = EpipolarAttention(cameras=cams)
    with pytest.warns(UserWarning, match="no two of the cameras see a point in common"):
        assert any(whole.band_plan((4, 6), "cpu").values())
    front = EpipolarAttention(cameras=cams, in_front=True)
    with pytest.warns(UserWarning) as said:
        assert not any(front.band_plan((4, 6), "cpu").values())
    assert any("couples nothing" in str(w.message) for w in said)
    assert any("with in_front=True no key of another view" in str(w.message) for w in said)
    soft = EpipolarAttention(cameras=cams, in_front=True, falloff="soft")  # no band plan: said all the same
    with pytest.warns(UserWarning, match="with in_front=True no key of another view is near a line"):
        assert bool(torch.isinf(soft.geometry((4, 6), "cpu")[(0, 1)].distances(0, 24)).all())
    assert EpipolarAttention.from_json(front.to_json()).config.in_front is True
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cameras that face one scene: no warning
        EpipolarAttention(rig={"kind": "orbit", "views": 3}).band_plan((4, 6), "cpu")


# ------------------------------------------------------------------------------------------------ the attention


def _reference(q, k, v, groups, img, geo_of, bias_of, own_bias=None):
    """Extended attention by hand: each image query of view i over its own keys (with ``own_bias[row]``, if given,
    on them) and the other views' image keys, the bias on the latter; the text queries and rows outside the groups
    over their own keys."""
    B, S, H, d = q.shape
    out = torch.softmax(torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(d), -1)
    out = torch.einsum("bhst,bthd->bshd", out, v)
    for g in groups:
        for i, r in enumerate(g):
            own = torch.zeros(img.stop - img.start, S) if own_bias is None else own_bias[r]
            keys, vals, bias = [k[r]], [v[r]], [own]
            for j, o in enumerate(g):
                if j != i:
                    keys.append(k[o, img])
                    vals.append(v[o, img])
                    bias.append(bias_of(geo_of[(i, j)].distances(0, img.stop - img.start)))
            K, V, Bs = torch.cat(keys), torch.cat(vals), torch.cat(bias, 1)
            s = torch.einsum("shd,thd->hst", q[r, img], K) / math.sqrt(d) + Bs[None]
            out[r, img] = torch.einsum("hst,thd->shd", torch.softmax(s, -1), V)
    return out


@pytest.mark.parametrize("falloff,scale", [("hard", 1.0), ("soft", 0.5), ("none", 2.0)])
@pytest.mark.parametrize("image_first", [True, False])
def test_attention_equals_materialised_extended_attention(falloff, scale, image_first):
    torch.manual_seed(0)
    grid, n_txt, H, d = (3, 4), 5, 2, 8
    n_img = grid[0] * grid[1]
    cams = rig((64.0, 48.0))[:2]
    ctl = EpipolarAttention(cameras=cams, falloff=falloff, scale=scale, band=1.0)
    roles = ["uncond", "uncond", "cond", "cond"]  # CFG with two views: uncond views together, cond views together
    B, S = len(roles), n_img + n_txt
    q, k, v = (torch.randn(B, S, H, d) for _ in range(3))
    state = RunState(step=0, num_steps=2, roles=roles, layout=TokenLayout("sd3", n_txt, grid))
    site = Site("transformer_blocks.0.attn", 0, "sd3_joint", H, d)
    call = SiteCall(site, B, S, n_txt, image_first, q.device, q.dtype)
    got = attend(q, k, v, ctl.contribute(call, q, k, v, state), max_chunk_elems=40)  # several row chunks
    img = call.image_slice()
    ref = _reference(q, k, v, [[0, 1], [2, 3]], img, ctl.geometry(grid, q.device),
                     lambda dist: ctl.bias(dist, math.log(scale)))
    assert torch.allclose(got, ref, atol=1e-5)
    plain = attend(q, k, v, [])
    txt = call.text_slice()
    assert torch.allclose(got[:, txt], plain[:, txt], atol=1e-6)  # text queries keep their own attention
    if falloff == "hard":
        assert (ctl.geometry(grid, q.device)[(0, 1)].distances(0, n_img) > 1.0).any()  # the band removes keys


def test_the_band_blocks_hold_exactly_the_band_and_read_a_narrow_strip():
    """The hard band as blocks along the pencil of lines: every query in one block, and the keys each keeps are
    exactly those within the band; on a 64 × 64 grid the blocks read a few per cent of the other view's keys."""
    for cams, grid in [(rig((64.0, 48.0)), (12, 16)), (attnctl.OrbitRig(views=3).cameras(size=(64.0, 64.0)), (64, 64))]:
        n = grid[0] * grid[1]
        for i, j in [(0, 1), (2, 0)]:
            geo = TokenGeometry(cams[i], cams[j], grid)
            chunks = geo.band_chunks(1.0, size=32)
            mask = torch.zeros(n, n, dtype=torch.bool)
            seen = torch.zeros(n, dtype=torch.long)
            for c in chunks:
                keys = torch.arange(n) if c.keys is None else c.keys
                mask[c.queries[:, None], keys[None, :]] = c.inside
                seen[c.queries] += 1
            want = geo.distances(0, n) <= 1.0
            assert torch.equal(mask, want)
            assert int(seen.max()) == 1 and bool((seen[want.any(1)] == 1).all())  # no query twice, none missing
            if n == 4096:
                read = sum(len(c.queries) * (n if c.keys is None else len(c.keys)) for c in chunks) / n / n
                assert read < 0.06, read  # against 1.0 for the dense form


@pytest.mark.parametrize("falloff", ["hard", "soft"])
def test_three_views_in_many_blocks_equal_materialised_extended_attention(falloff, monkeypatch):
    """The block path for real: a 12 × 16 grid in blocks of 16 queries (some reading a strip of keys, some none),
    three views, bf16-free float32 against the reference by hand."""
    from attnctl.controls import epipolar as control_module

    monkeypatch.setattr(control_module, "CHUNK_QUERIES", 16)
    torch.manual_seed(1)
    grid, n_txt, H, d = (12, 16), 3, 2, 8
    n_img = grid[0] * grid[1]
    ctl = EpipolarAttention(cameras=rig((64.0, 48.0)), falloff=falloff, band=0.75, scale=0.7)
    roles = ["cond"] * 3
    B, S = len(roles), n_txt + n_img
    q, k, v = (torch.randn(B, S, H, d) for _ in range(3))
    state = RunState(step=0, num_steps=2, roles=roles, layout=TokenLayout("flux", n_txt, grid))
    site = Site("transformer_blocks.0.attn", 0, "flux_double", H, d)
    call = SiteCall(site, B, S, n_txt, False, q.device, q.dtype)
    got = attend(q, k, v, ctl.contribute(call, q, k, v, state), max_chunk_elems=500)
    ref = _reference(q, k, v, [[0, 1, 2]], call.image_slice(), ctl.geometry(grid, q.device),
                     lambda dist: ctl.bias(dist, math.log(0.7)))
    assert torch.allclose(got, ref, atol=1e-5)
    if falloff == "hard":
        chunks = [c for plan in ctl.band_plan(grid, q.device).values() for c in plan]
        assert any(c.keys is not None for c in chunks) and len(chunks) > 3 * 2
        geo = ctl.geometry(grid, q.device)
        reads = [(geo[(2, j)].distances(0, n_img) <= 0.75).any(1) for j in (0, 1)]
        assert bool((~reads[0] & ~reads[1]).any())  # some query of view 2 reads no other view: its own keys only


@pytest.mark.parametrize("image_first", [True, False])
def test_adaptive_falloff_removes_only_the_weak_keys_off_the_band(image_first):
    """falloff="adaptive" (AnimateAnywhere): a key of another view beyond the band is removed only where the
    unconstrained extended attention (own keys and every other view's keys, the scale included) gives it less than
    ``strong`` times an even share; against a materialised reference written out here, three views."""
    torch.manual_seed(3)
    grid, n_txt, H, d = (3, 4), 5, 2, 8
    n_img = grid[0] * grid[1]
    scale, band, strong = 0.7, 0.75, 1.5
    ctl = EpipolarAttention(cameras=rig((64.0, 48.0)), falloff="adaptive", band=band, strong=strong, scale=scale)
    B, S = 3, n_img + n_txt
    q, k, v = (torch.randn(B, S, H, d) * 1.5 for _ in range(3))  # sharp enough that some keys are strong
    state = RunState(step=0, num_steps=2, roles=["cond"] * B, layout=TokenLayout("sd3", n_txt, grid))
    site = Site("transformer_blocks.0.attn", 0, "sd3_joint", H, d)
    call = SiteCall(site, B, S, n_txt, image_first, q.device, q.dtype)
    parts = ctl.contribute(call, q, k, v, state)
    assert all(p.reads_lse for p in parts)
    got = attend(q, k, v, parts, max_chunk_elems=40)

    img, geo = call.image_slice(), ctl.geometry(grid, q.device)
    ref = attend(q, k, v, [])
    kept_off_band = dropped = 0
    for i in range(B):
        others = [j for j in range(B) if j != i]
        keys = torch.cat([k[i]] + [k[j, img] for j in others])  # (S + 2·n_img, H, d)
        vals = torch.cat([v[i]] + [v[j, img] for j in others])
        s_ = torch.einsum("shd,thd->hst", q[i, img], keys) / math.sqrt(d)
        s_[..., S:] += math.log(scale)
        a = torch.softmax(s_, -1)  # the unconstrained extended attention
        off = torch.cat([torch.zeros(n_img, S, dtype=torch.bool)] + [geo[(i, j)].distances(0, n_img) > band
                                                                      for j in others], 1)
        drop = off[None] & (a < strong / keys.shape[0])
        kept_off_band += int((off[None] & ~drop).sum())
        dropped += int(drop.sum())
        ref[i, img] = torch.einsum("hst,thd->shd", torch.softmax(s_.masked_fill(drop, float("-inf")), -1), vals)
    assert kept_off_band > 0 and dropped > 0  # both sides of the rule are exercised
    assert torch.allclose(got, ref, atol=1e-5)
    hard = attend(q, k, v, EpipolarAttention(cameras=rig((64.0, 48.0)), band=band, scale=scale)
                  .contribute(call, q, k, v, state))
    assert (got - hard).abs().max() > 1e-3  # the strong keys off the band do reach the output


def test_with_isolation_at_the_same_call_each_view_is_isolated_within_itself_and_reads_the_others_band():
    """IsolationAttention and EpipolarAttention at one call compose: a view's image queries read their own keys
    under the isolation bias (no subject reads another subject's tokens of its own view) and the other view's
    keys under the band, one softmax over both; the other view's keys are not masked by subject."""
    from attnctl import IsolationAttention

    torch.manual_seed(2)
    grid, n_txt, H, d = (4, 6), 3, 2, 8
    n_img = grid[0] * grid[1]
    B, S = 2, n_img + n_txt
    q, k, v = (torch.randn(B, S, H, d) for _ in range(3))
    state = RunState(step=1, num_steps=3, roles=["cond"] * B, layout=TokenLayout("sd3", n_txt, grid))
    site = Site("transformer_blocks.0.attn", 0, "sd3_joint", H, d)
    call = SiteCall(site, B, S, n_txt, True, q.device, q.dtype)
    epi = EpipolarAttention(cameras=rig((48.0, 32.0))[:2], band=1.5)
    iso = IsolationAttention(subjects=["red circle", "blue square"])
    iso._sets = [([], 0), ([], 1)]  # every row a target (no references), as a run with two views sets them
    masks = torch.zeros(B, 2, *grid, dtype=torch.bool)
    masks[:, 0, 0:3, 0:3] = True
    masks[:, 1, 1:4, 3:6] = True
    masks[1, 1, 2, 2] = True  # view 1: one token in both masks
    iso._masks = masks.flatten(2)
    iso._keep = torch.ones(B, 2, n_img, dtype=torch.bool)
    contributions = iso._steer(call, k, v, state, grid) + epi.contribute(call, q, k, v, state)
    got = attend(q, k, v, contributions, max_chunk_elems=60)
    own = {}
    for r in range(B):  # the isolation rule by hand: query in mask i, key in another mask j and not in i → −∞
        m = iso._masks[r]
        bias = torch.zeros(n_img, S)
        for a in range(n_img):
            for c in range(n_img):
                if any(m[i, a] and not m[i, c] and any(m[j, c] for j in range(2) if j != i) for i in range(2)):
                    bias[a, c] = -math.inf  # the image keys come first in an SD3 joint call
        own[r] = bias
    ref = _reference(q, k, v, [[0, 1]], call.image_slice(), epi.geometry(grid, q.device),
                     lambda dist: epi.bias(dist, 0.0), own_bias=own)
    assert torch.allclose(got, ref, atol=1e-5)
    alone = attend(q, k, v, epi.contribute(call, q, k, v, state))
    assert (got - alone).abs().max() > 1e-2  # the isolation did act


def test_a_stereo_rig_at_roll_zero_is_rectified_and_its_roll_tilts_the_lines():
    rectified = EpipolarAttention(rig={"kind": "stereo"})
    geo = TokenGeometry(*rectified.cameras((4, 6)), (4, 6), in_front=False)
    d = geo.distances(0, 24).reshape(4, 6, 4, 6)  # query (row, col) of view 1 × key (row, col) of view 2
    same_row = torch.eye(4, dtype=torch.bool)[:, None, :, None].expand(4, 6, 4, 6)
    assert d[same_row].abs().max() < 1e-5 and d[~same_row].min() > 0.99  # each line is its query's token row
    # in front of both cameras: the second camera is to the right, so a point moves left in its view (disparity
    # ≥ 0, none at infinity); a key k tokens right of the query's column is k tokens from the visible half-row
    front = TokenGeometry(*rectified.cameras((4, 6)), (4, 6), in_front=True).distances(0, 24).reshape(4, 6, 4, 6)
    right = (torch.arange(6)[None, :] - torch.arange(6)[:, None]).clamp_min(0).float()  # (query col, key col)
    want = torch.where(same_row, right[None, :, None, :].expand(4, 6, 4, 6), d)
    assert torch.allclose(front[same_row], want[same_row], atol=1e-4)
    assert bool((front[~same_row] >= d[~same_row] - 1e-5).all())
    rolled = EpipolarAttention(rig={"kind": "stereo", "roll": 30}).cameras((6, 6))
    F = fundamental(*rolled)
    line = F @ torch.tensor([3.0, 3.0, 1.0], dtype=torch.float64)  # the line of the centre pixel, in view 2
    assert math.isclose(abs(math.degrees(math.atan2(-line[0], line[1]))), 30.0, abs_tol=1e-6)


def test_an_orbit_rig_looks_at_the_centre_from_the_requested_angles_at_the_run_s_aspect():
    ctl = EpipolarAttention(rig={"kind": "orbit", "views": 3, "degrees": 25, "radius": 5})
    cams = ctl.cameras((4, 8))  # a wide grid: the cameras are made for it
    assert ctl.views == 3 and all(tuple(c.size) == (8.0, 4.0) for c in cams)
    for cam in cams:
        assert torch.allclose(cam.project(torch.zeros(1, 3)), torch.tensor([[4.0, 2.0]], dtype=torch.float64))
    centres = [-torch.tensor(c.R, dtype=torch.float64).T @ torch.tensor(c.t, dtype=torch.float64) for c in cams]
    assert all(math.isclose(float(c.norm()), 5.0) for c in centres)
    angles = [math.degrees(math.atan2(float(c[0]), -float(c[2]))) for c in centres]
    assert np.allclose(angles, [-25.0, 0.0, 25.0])


def test_cameras_for_another_aspect_are_refused_and_a_rig_round_trips():
    square = [Camera.look_at([0, 0, 0], [0, 0, 1], size=(64, 64)), Camera.look_at([1, 0, 0], [1, 0, 1], size=(64, 64))]
    ctl = EpipolarAttention(cameras=square)
    assert ctl.cameras((8, 8)) == square
    with pytest.raises(LayoutError, match="64×64 images .* 16×8 tokens"):
        ctl.cameras((8, 16))
    with pytest.raises(ConfigError, match="not neither"):
        EpipolarAttention()
    with pytest.raises(ConfigError, match="not both"):
        EpipolarAttention(cameras=square, rig={"kind": "stereo"})
    with pytest.raises(ConfigError, match="go round the circle"):
        EpipolarAttention(rig={"kind": "orbit", "views": 4, "degrees": 120})
    with pytest.raises(ConfigError, match="a stereo rig has two cameras, not 3; for more views use an orbit"):
        EpipolarAttention(rig={"kind": "stereo", "views": 3})
    assert EpipolarAttention(rig={"kind": "stereo", "views": 2}).views == 2
    ctl = EpipolarAttention(rig={"kind": "orbit", "views": 4, "degrees": 15}, falloff="soft")
    again = attnctl.control_from_json(ctl.to_json())
    assert again.to_json() == ctl.to_json() and again.views == 4


def test_views_group_by_role_and_prompt():
    ctl = EpipolarAttention(cameras=rig()[:2])
    assert ctl.view_groups(["uncond"] * 4 + ["cond"] * 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ctl.view_groups(["cond", "cond", "perturbed", "perturbed"]) == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError, match="num_images_per_prompt=2"):
        ctl.view_groups(["uncond", "cond", "cond"])


# ------------------------------------------------------------------------------------------------ pipelines


def test_sd3_views_couple_and_scale_zero_is_the_plain_run(sd3_pipe):
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    cams = rig((48.0, 32.0))[:2]
    plain = pipe(PROMPT, num_images_per_prompt=2, generator=gen(), output_type="np", **KW).images
    off = pipe(PROMPT, num_images_per_prompt=2, generator=gen(), output_type="np",
               controls=[EpipolarAttention(cameras=cams, scale=0.0)], **KW).images
    assert np.array_equal(off, plain)
    ctl = EpipolarAttention(cameras=cams)
    with attnctl.attach(sd3_pipe, [ctl]):
        on = sd3_pipe(PROMPT, num_images_per_prompt=2, generator=gen(), output_type="np", **KW).images
    assert abs(on - plain).max() > 1e-3 and ctl.calls > 0
    assert "epipolar attention across 2 views" in ctl.summary()
    made = pipe(PROMPT, generator=gen(), output_type="np", controls=[EpipolarAttention(cameras=cams)], **KW).images
    assert made.shape[0] == 2 and np.allclose(made, on, atol=1e-6)  # the cameras are the images of the prompt
    with pytest.raises(ConfigError, match="num_images_per_prompt 3 with an epipolar control of 2 cameras"):
        pipe(PROMPT, num_images_per_prompt=3, controls=[EpipolarAttention(cameras=cams)], **KW)
    by_rig = pipe(PROMPT, num_images_per_prompt=2, generator=gen(), output_type="np",  # the rig at the run's aspect
                  controls=[EpipolarAttention(rig={"kind": "stereo", "roll": 40, "baseline": 0.5})], **KW).images
    given = attnctl.StereoRig(roll=40, baseline=0.5).cameras(size=(48.0, 32.0))
    by_cameras = pipe(PROMPT, num_images_per_prompt=2, generator=gen(), output_type="np",
                      controls=[EpipolarAttention(cameras=given)], **KW).images
    assert np.allclose(by_rig, by_cameras, atol=1e-5) and abs(by_rig - plain).max() > 1e-3
    with pytest.raises(LayoutError, match="another aspect"):
        pipe(PROMPT, num_images_per_prompt=2, controls=[EpipolarAttention(cameras=rig((32.0, 32.0))[:2])], **KW)


def test_flux_and_sd35_sites_run(flux_pipe, sd35_pipe):
    cams = rig((48.0, 32.0))[:3]
    flux = AttnCtlFluxPipeline(**flux_pipe.components)
    flux.set_progress_bar_config(disable=True)
    ctl = EpipolarAttention(cameras=cams, falloff="soft")
    out = flux(PROMPT, num_images_per_prompt=3, generator=gen(), output_type="np", controls=[ctl], **KW).images
    n_sites = len(attnctl.list_sites(flux_pipe.transformer))
    assert np.isfinite(out).all() and ctl.calls == n_sites * KW["num_inference_steps"]
    adaptive = EpipolarAttention(cameras=cams[:2], falloff="adaptive")  # the site's LSE reaches it in every block
    out = flux(PROMPT, generator=gen(), output_type="np", controls=[adaptive], **KW).images
    assert out.shape[0] == 2 and np.isfinite(out).all() and adaptive.calls == n_sites * KW["num_inference_steps"]
    sd35 = AttnCtlSD3Pipeline(**sd35_pipe.components)
    sd35.set_progress_bar_config(disable=True)
    only_attn2 = EpipolarAttention(cameras=cams[:2], sites="kind:sd3_image")
    out = sd35(PROMPT, num_images_per_prompt=2, generator=gen(), output_type="np", controls=[only_attn2],
               **KW).images
    assert np.isfinite(out).all() and only_attn2.calls > 0


@pytest.mark.parametrize("falloff", ["hard", "adaptive"])
def test_bf16_on_cpu(falloff):
    from attnctl.testing import tiny_sd3_pipeline

    pipe = AttnCtlSD3Pipeline(**tiny_sd3_pipeline("sd3", dtype=torch.bfloat16).components)
    pipe.set_progress_bar_config(disable=True)
    ctl = EpipolarAttention(cameras=rig((48.0, 32.0))[:2], falloff=falloff)
    out = pipe(PROMPT, num_images_per_prompt=2, generator=gen(), output_type="latent", controls=[ctl], **KW).images
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all() and ctl.calls > 0


def test_bad_input_and_json_round_trip():
    cams = rig()
    with pytest.raises(ConfigError, match="at least two views"):
        EpipolarAttention(cameras=cams[:1])
    with pytest.raises(ConfigError, match="sizes differ"):
        EpipolarAttention(cameras=[cams[0], Camera.look_at([1, 0, -4], [0, 0, 0], size=(32, 32))])
    with pytest.raises(ConfigError, match="share a camera centre"):
        fundamental(cams[0], Camera.look_at([0.0, 0.0, -4.0], [1.0, 0.0, 0.0], size=(64.0, 48.0)))
    with pytest.raises(ConfigError, match="K is singular"):
        Camera(K=[[0, 0, 0], [0, 1, 0], [0, 0, 1]], size=(8, 8))
    with pytest.raises(ConfigError, match="not a rotation"):
        Camera(K=[[1, 0, 0], [0, 1, 0], [0, 0, 1]], R=[[2, 0, 0], [0, 1, 0], [0, 0, 1]], size=(8, 8))
    with pytest.raises(ConfigError, match="3×3"):
        Camera(K=[[1, 0], [0, 1]], size=(8, 8))
    with pytest.raises(ConfigError, match="band"):
        EpipolarAttention(cameras=cams, band=0)
    with pytest.raises(ConfigError, match="strong"):
        EpipolarAttention(cameras=cams, falloff="adaptive", strong=0)
    ctl = EpipolarAttention(cameras=cams, falloff="soft", alpha=2.0, scale="window(1, 0, 0.5)")
    again = attnctl.control_from_json(ctl.to_json())
    assert isinstance(again, EpipolarAttention) and again.to_json() == ctl.to_json()
    for size in ((float("nan"), 8.0), (float("inf"), 8.0)):  # NaN crashed deep in torch or made black images
        with pytest.raises(ConfigError, match="need a finite, positive"):
            Camera(K=[[1, 0, 0], [0, 1, 0], [0, 0, 1]], size=size)
    with pytest.raises(ConfigError, match="eye=.* is not a point of 3 finite numbers"):
        Camera.look_at([0, 0], [0, 0, 1])


def test_cameras_that_share_a_centre_are_refused_when_the_control_is_made_and_the_views_named():
    a, b = rig()[:2]
    turned = Camera.look_at([0.0, 0.0, -4.0], [0.5, 0.0, 0.0], fov=60, size=(64.0, 48.0))  # at a's centre
    with pytest.raises(ConfigError, match="views 0 and 1 share a camera centre"):
        EpipolarAttention(cameras=[a, a])
    with pytest.raises(ConfigError, match="views 0 and 2 share a camera centre.*move camera 2"):
        EpipolarAttention(cameras=[a, b, turned])
    ctl = EpipolarAttention(cameras=[a, b])
    with pytest.raises(ConfigError, match="views 1 and 2 share a camera centre"):
        ctl.config.cameras = [a, b, b]
    ctl.config.cameras.append(turned)  # changed in place, past the config's check: refused at the run, named too
    with pytest.raises(ConfigError, match="views 0 and 2 share a camera centre"):
        ctl.geometry((3, 4), "cpu")
    with pytest.raises(ConfigError, match=r"look_at: size=\[nan, 8\] is not a finite, positive"):
        Camera.look_at([0, 0, 0], [0, 0, 1], size=(float("nan"), 8))


def test_cameras_assigned_after_a_run_are_used_and_lines_that_miss_every_view_are_warned(sd3_pipe):
    """A rig assigned to the config after a run was ignored (the lines were cached by grid); cameras whose lines all
    miss the other view coupled nothing, without a word."""
    pipe = AttnCtlSD3Pipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    ctl = EpipolarAttention(rig={"kind": "stereo", "roll": 0})
    pipe(PROMPT, generator=gen(), output_type="np", controls=[ctl], **KW)
    ctl.config.rig = attnctl.StereoRig(roll=90)
    again = pipe(PROMPT, generator=gen(), output_type="np", controls=[ctl], **KW).images
    fresh = pipe(PROMPT, generator=gen(), output_type="np",
                 controls=[EpipolarAttention(rig={"kind": "stereo", "roll": 90})], **KW).images
    assert np.allclose(again, fresh, atol=1e-6)
    up = math.radians(60)
    apart = [Camera.look_at([0, 0, 0], [0, 0, 1], fov=20, size=(48, 32)),
             Camera.look_at([10, 0, 0], [10, -math.sin(up), math.cos(up)], fov=20, size=(48, 32))]
    with pytest.warns(UserWarning, match="couples nothing .* no image token's epipolar band"):
        pipe(PROMPT, generator=gen(), output_type="np", controls=[EpipolarAttention(cameras=apart)], **KW)


# ------------------------------------------------------------------------------------------------ toy world


def test_on_toy_flux_the_band_puts_objects_nearer_their_epipolar_lines_than_plain_extended_attention():
    """A rolled stereo rig (the second camera rolled by 90°): plain extended attention copies the first view, which
    breaks the geometry; with the band the matched objects sit nearer the epipolar lines of their matches."""
    from attnctl.toyworld.evaluate import detect_objects
    from attnctl.toyworld.models import default_call_kwargs, load_pipeline
    from attnctl.toyworld.world import prompt_set

    pipe = load_pipeline("toy-flux")
    pipe.set_progress_bar_config(disable=True)
    call = {**default_call_kwargs(pipe), "output_type": "np"}
    cams = [Camera.look_at([0, 0, 0], [0, 0, 1], size=(32, 32)),
            Camera.look_at([0.3, 0, 0], [0.3, 0, 1], size=(32, 32), up=[1.0, 0.0, 0.0])]
    F = fundamental(cams[0], cams[1])
    errors = {}
    for name, cfg in {"extended": {"falloff": "none"}, "epipolar": {}}.items():
        errs = []
        for i, item in enumerate(prompt_set("pair")[:6]):
            for s in range(2):
                views = pipe(item["prompt"], num_images_per_prompt=2, generator=gen(s + 1000003 * i),
                             controls=[EpipolarAttention(cameras=cams, **cfg)], **call).images
                found = []
                for im in views:
                    best = {}
                    for o in detect_objects((np.clip(im, 0, 1) * 255).round().astype(np.uint8)):
                        if o.colour not in best or o.area > best[o.colour].area:
                            best[o.colour] = o
                    found.append(best)
                for c in set(found[0]) & set(found[1]):
                    u = torch.tensor([found[0][c].centroid], dtype=torch.float64) * 32
                    w = torch.tensor([found[1][c].centroid], dtype=torch.float64) * 32
                    errs.append(float(line_distance(F, u, w)) / 4)  # tokens of 4 pixels
        errors[name] = float(np.mean(errs))
    assert errors["epipolar"] < errors["extended"] - 0.5, errors
