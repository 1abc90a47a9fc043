"""Background candidates: which are left out, and how the rest are renumbered (worked by hand)."""
import torch

from splitmatch.pseudo.background import background_candidates, drop_candidates


def test_a_candidate_nearer_the_background_than_every_seen_text_is_marked():
    seen_text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    background = torch.tensor([0.0, 0.0, 2.0])  # normalised inside
    embeds = torch.tensor([[0.1, 0.0, 1.0],    # background-like: cos 0.995 vs 0.0995
                           [1.0, 0.2, 0.1],    # like seen class 0
                           [0.0, 0.6, 0.5],    # nearer seen class 1 (0.768) than background (0.640)
                           [0.5, 0.5, 0.8]])   # background 0.749 > each seen 0.468
    assert background_candidates(embeds, seen_text, background).tolist() == [True, False, False, True]
    assert background_candidates(torch.zeros(0, 3), seen_text, background).shape == (0,)


def test_dropped_candidates_leave_the_map_and_the_rest_keep_their_order():
    cmap = torch.tensor([[0, 1, 1], [2, 3, 3], [0, 2, 4]], dtype=torch.uint8)
    embeds = torch.arange(8.0).view(4, 2)
    new_map, new_embeds = drop_candidates(cmap, embeds, torch.tensor([False, True, False, True]))
    assert new_map.tolist() == [[0, 1, 1], [0, 2, 2], [0, 0, 0]]
    assert new_map.dtype == torch.uint8
    assert new_embeds.tolist() == [[0.0, 1.0], [4.0, 5.0]]
    same_map, same = drop_candidates(cmap, embeds, torch.zeros(4, dtype=torch.bool))
    assert torch.equal(same_map, cmap) and torch.equal(same, embeds)
