"""ClassMix and depth-aware mixing (uda/mixing.py): what is pasted follows the mask pixel for pixel, whole
classes are pasted, no source pixel lands behind a nearer target surface, the camera stays the target's."""

from __future__ import annotations

import torch

from uda.mixing import IGNORE_INDEX, class_mix_mask, depth_mix_mask, mix, mix_samples


def batch(seed: int, b: int = 3, h: int = 16, w: int = 24, classes: int = 7) -> dict[str, torch.Tensor]:
    """A random sample batch in the sample-dict units (labels with some ignore pixels, depth in metres with
    some unmeasured pixels)."""
    g = torch.Generator().manual_seed(seed)
    semseg = torch.randint(0, classes, (b, h, w), generator=g)
    semseg[torch.rand(b, h, w, generator=g) < 0.1] = IGNORE_INDEX
    depth = torch.rand(b, 1, h, w, generator=g) * 80 + 0.5
    depth[torch.rand(b, 1, h, w, generator=g) < 0.1] = 0.0
    return {
        "image": torch.rand(b, 3, h, w, generator=g),
        "semseg": semseg,
        "depth": depth,
        "normals": torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1),
        "K": torch.eye(3).repeat(b, 1, 1) * (seed + 2),
    }


def test_classmix_pastes_half_of_the_classes_whole():
    source = batch(0)
    torch.manual_seed(1)
    mask = class_mix_mask(source["semseg"])
    assert mask.shape == (3, 1, 16, 24) and mask.dtype == torch.bool
    for label, m in zip(source["semseg"], mask[:, 0]):
        present = set(torch.unique(label).tolist()) - {IGNORE_INDEX}
        chosen = set(torch.unique(label[m]).tolist())
        assert len(chosen) == (len(present) + 1) // 2 and chosen <= present
        # Every pixel of a chosen class is pasted, no pixel of another class (nor ignore) is.
        assert torch.equal(m, torch.isin(label, torch.tensor(sorted(chosen))))
    # The draw follows the global RNG: same seed, same mask; another seed, another one.
    torch.manual_seed(1)
    assert torch.equal(class_mix_mask(source["semseg"]), mask)
    torch.manual_seed(2)
    assert not torch.equal(class_mix_mask(source["semseg"]), mask)


def test_mixed_fields_follow_the_mask_pixel_for_pixel_and_keep_the_target_camera():
    source, target = batch(0), batch(1)
    torch.manual_seed(0)
    mask = class_mix_mask(source["semseg"])
    assert 0 < mask.float().mean() < 1
    keys = ("image", "semseg", "depth", "normals")
    mixed = mix_samples(mask, source, target, keys)
    m = mask[:, 0]
    for key in keys:
        a, s, t = mixed[key], source[key], target[key]
        a, s, t = (x if x.dim() == 4 else x[:, None] for x in (a, s, t))
        for b in range(a.shape[0]):
            for c in range(a.shape[1]):
                assert torch.equal(a[b, c][m[b]], s[b, c][m[b]]), key
                assert torch.equal(a[b, c][~m[b]], t[b, c][~m[b]]), key
    assert torch.equal(mixed["K"], target["K"]) and not torch.equal(mixed["K"], source["K"])
    # Pseudo-labels (any per-pixel tensor, here int ids and a per-pixel weight) follow the same rule.
    pseudo = torch.randint(0, 7, (3, 16, 24))
    weight = torch.rand(3, 16, 24)
    assert torch.equal(mix(mask, source["semseg"], pseudo), torch.where(m, source["semseg"], pseudo))
    assert torch.equal(mix(mask, torch.ones_like(weight), weight)[m], torch.ones(int(m.sum())))


def test_depth_aware_mask_never_pastes_behind_a_nearer_target_surface():
    source, target = batch(3), batch(4)
    torch.manual_seed(0)
    classes = class_mix_mask(source["semseg"])
    target_depth = target["depth"].clamp_min(0.5)  # the teacher's depth: a prediction everywhere
    mask = depth_mix_mask(classes, source["depth"], target_depth)
    pasted_source, pasted_target = source["depth"][mask], target_depth[mask]
    assert pasted_source.numel() > 0
    assert bool((pasted_source > 0).all()) and bool((pasted_source < pasted_target).all())
    # It only removes pixels from the ClassMix mask: exactly those behind the target (or without depth).
    assert bool((mask <= classes).all())
    dropped = classes & ~mask
    assert bool(((source["depth"][dropped] >= target_depth[dropped]) | (source["depth"][dropped] == 0)).all())
    assert dropped.any()
    mixed = mix_samples(mask, source, {**target, "depth": target_depth}, ("depth",))
    # The mixed depth is nowhere farther than the target surface it covers: occlusions stay plausible.
    assert bool((mixed["depth"] <= target_depth).all())
    assert torch.equal(mixed["K"], target["K"])
