"""The linear probe core: it finds an attribute planted in features and nothing in features without it."""

from __future__ import annotations

import torch

from dsvlm.analysis.probe import ATTRIBUTES, chance_level, fit_probe, label_tensors, probe_scenes


def planted(n: int, classes: int, dim: int, signal: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise features; with `signal` > 0, a random direction per class is added to its samples."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    directions = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, dim, generator=generator) + signal * directions[labels], labels


def test_probe_recovers_a_planted_attribute():
    train_x, train_y = planted(400, 4, 64, signal=2.0, seed=0)
    test_x, test_y = planted(200, 4, 64, signal=2.0, seed=1)
    assert fit_probe(train_x, train_y, test_x, test_y) > 0.97


def test_probe_scores_chance_without_the_attribute():
    train_x, train_y = planted(400, 4, 64, signal=0.0, seed=0)
    test_x, test_y = planted(400, 4, 64, signal=0.0, seed=1)
    accuracy = fit_probe(train_x, train_y, test_x, test_y)
    assert abs(accuracy - chance_level(test_y)) < 0.1, accuracy
    assert abs(accuracy - 0.25) < 0.1


def test_probe_images_are_fixed_held_out_and_labelled():
    train, again = probe_scenes("train", 50, "single"), probe_scenes("train", 50, "single")
    test = probe_scenes("test", 50, "single")
    assert train == again and train != test
    assert all(len(scene.objects) == 1 for scene in train)
    multi = probe_scenes("train", 200, "multi")
    assert {len(scene.objects) for scene in multi} == {1, 2, 3, 4}
    labels = label_tensors({"train": {"single": train, "multi": multi}, "test": {"single": test, "multi": multi}})
    assert set(labels) == set(ATTRIBUTES)
    assert labels["count"]["train"].tolist() == [len(s.objects) - 1 for s in multi]
