"""diffusion/conditioning.py: the frames a training clip is given and the labels dropped for
classifier-free guidance. A model that never saw the null label, or never saw given frames,
would otherwise pass every other test."""

from __future__ import annotations

import pytest
import torch

from diffusion.conditioning import drop_labels, training_frame_masks


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_label_dropout_happens_at_its_rate_and_uses_the_null_label():
    labels = torch.randint(0, 5, (20000,), generator=_g(1))
    out = drop_labels(labels, num_classes=5, p=0.1, generator=_g(2))
    dropped = out == 5
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # 20000 draws: standard error 0.002
    assert torch.equal(out[~dropped], labels[~dropped])  # the others untouched
    assert torch.equal(labels, torch.randint(0, 5, (20000,), generator=_g(1)))  # input not modified
    assert torch.equal(drop_labels(labels, 5, 0.0, _g(2)), labels)
    assert (drop_labels(labels, 5, 1.0, _g(2)) == 5).all()


def test_unlabelled_samples_get_the_null_label_and_unconditional_models_get_none():
    labels = torch.tensor([0, -1, 2, -1])
    assert drop_labels(labels, 3, 0.0).tolist() == [0, 3, 2, 3]
    assert drop_labels(labels, 0, 0.5) is None


def test_label_dropout_is_a_function_of_the_generator():
    labels = torch.arange(64) % 4
    assert torch.equal(drop_labels(labels, 4, 0.3, _g(7)), drop_labels(labels, 4, 0.3, _g(7)))
    assert not torch.equal(drop_labels(labels, 4, 0.3, _g(7)), drop_labels(labels, 4, 0.3, _g(8)))


def test_frame_masks_give_prefixes_and_subsets_never_every_frame():
    x0 = torch.zeros(4000, 4, 8, 2, 2)
    cond, loss = training_frame_masks(x0, cond_prob=0.5, prefix_prob=0.7, generator=_g(3))
    m = cond[:, 0, :, 0, 0]
    assert cond.shape == (4000, 1, 8, 1, 1) and loss.shape == (4000, 8) and cond.dtype == x0.dtype
    assert torch.equal(loss, 1 - m)  # no loss exactly on the given frames
    given = m.sum(1)
    used = given > 0
    assert abs(used.float().mean().item() - 0.5) < 0.03
    assert (given[used] >= 1).all() and (given <= 7).all()  # at least one frame is always generated
    is_prefix = torch.tensor([torch.equal(r, (torch.arange(8) < r.sum()).float()) for r in m[used]])
    # prefixes: 70% of the conditioned clips, plus the random subsets that happen to be prefixes
    assert 0.7 <= is_prefix.float().mean().item() < 0.8
    assert set(given[used].long().tolist()) == set(range(1, 8))  # every K in 1..T-1 occurs


def test_interpolation_masks_give_every_kth_frame_exactly_and_leave_old_draws_alone():
    x0 = torch.zeros(3000, 4, 9, 2, 2)  # odd length: the last frame is known for k = 2 and 4
    cond, loss = training_frame_masks(x0, cond_prob=0.6, prefix_prob=0.5, generator=_g(5), interp_prob=0.5,
                                      interp_strides=(2, 4))  # fmt: skip
    m = cond[:, 0, :, 0, 0]
    assert torch.equal(loss, 1 - m)
    every = {k: (torch.arange(9) % k == 0).float() for k in (2, 3, 4)}
    kinds = [next((k for k, e in every.items() if torch.equal(r, e)), None) for r in m[m.sum(1) > 0]]
    share = {k: kinds.count(k) / len(kinds) for k in (2, 3, 4)}
    assert share[3] == 0 and 0.2 < share[2] < 0.3 and 0.2 < share[4] < 0.3  # half of the clips, k split evenly
    # off (the default): the masks the code made before the option existed, draw for draw (the
    # earlier algorithm, written out here), so runs and resumes from before it repeat exactly
    g, b, t = _g(5), 300, 9
    use, prefix, k = torch.rand(b, generator=g) < 0.6, torch.rand(b, generator=g) < 0.5, torch.randint(1, t, (b,), generator=g)
    before = torch.zeros(b, t)
    for i in torch.nonzero(use).flatten().tolist():
        if prefix[i]:
            before[i, : k[i]] = 1
        else:
            before[i, torch.randperm(t, generator=g)[: k[i]]] = 1
    now, _ = training_frame_masks(x0[:b], cond_prob=0.6, prefix_prob=0.5, generator=_g(5))
    assert torch.equal(now[:, 0, :, 0, 0], before) and before.sum() > 0


@pytest.mark.parametrize("t", [1, 8])
def test_no_frames_given_to_images_or_when_off(t):
    x0 = torch.zeros(16, 4, t, 2, 2)
    p = 1.0 if t == 1 else 0.0
    cond, loss = training_frame_masks(x0, cond_prob=p, prefix_prob=0.5, generator=_g())
    assert cond.sum() == 0 and (loss == 1).all()
