"""``ttc_lightning.ops.seeding``: the generators draw what ``torch.Generator().manual_seed(seed [+ rank])`` draws."""

import torch

from ttc_lightning.ops import seeding
from ttc_lightning.ops.seeding import process_rank, seeded_generator


def draws(generator: torch.Generator) -> torch.Tensor:
    return torch.cat([torch.rand(5, generator=generator), torch.randint(2**62, (3,), generator=generator).double()])


def test_outside_a_process_group_the_rank_is_zero():
    assert not torch.distributed.is_initialized()
    assert process_rank() == 0


def test_seeded_generator_draws_the_numbers_of_a_generator_seeded_by_hand():
    for seed in (0, 1, 12345):
        assert torch.equal(draws(seeded_generator(seed)), draws(torch.Generator().manual_seed(seed)))
        assert torch.equal(draws(seeded_generator(seed, per_rank=True)), draws(torch.Generator().manual_seed(seed)))
    assert seeded_generator(0).device == torch.device("cpu")


def test_per_rank_adds_the_rank_to_the_seed_and_shared_ignores_it(monkeypatch):
    monkeypatch.setattr(seeding, "process_rank", lambda: 3)
    assert torch.equal(draws(seeded_generator(4, per_rank=True)), draws(torch.Generator().manual_seed(7)))
    assert torch.equal(draws(seeded_generator(4)), draws(torch.Generator().manual_seed(4)))
    assert not torch.equal(draws(seeded_generator(4, per_rank=True)), draws(seeded_generator(4)))
