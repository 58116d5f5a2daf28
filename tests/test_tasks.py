"""Task definitions: each task's maps (predictions, discriminator inputs, transfer representations) and the output
space of a run, which takes the depth parametrisation and range from the run's own config."""

from dataclasses import replace

import pytest
import torch

from uda.config import ExperimentConfig, ModelConfig, PhotometricConfig
from uda.geometry import depth_to_disparity
from uda.tasks import TASK_DEFS, OutputSpace, output_space, task_channels, to_predictions


def test_channels_per_task():
    assert task_channels(("semseg", "depth", "normals", "edges"), 7) == {
        "semseg": 7,
        "depth": 1,
        "normals": 3,
        "edges": 1,
    }


def test_output_space_takes_the_runs_disparity_range():
    cfg = ExperimentConfig(model=ModelConfig(depth_output="disparity"))
    assert output_space(cfg, 16).disparity_range == (0.1, 100.0)
    ph = PhotometricConfig(min_depth=0.5, max_depth=40.0)
    space = output_space(replace(cfg, photometric=ph), 16)
    assert space.disparity_range == (0.5, 40.0) and space.num_classes == 16
    # A prediction is read in the run's range: sigmoid 0 is its max depth, 1 its min depth.
    out = {"depth": {0: torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)}}
    metres = to_predictions(out, 0, space)["depth"].flatten()
    assert torch.allclose(metres, torch.tensor([40.0, 0.5]))


def test_missing_scale_names_the_scales_of_a_model_with_aux_outputs():
    # ATRC's label contexts add outputs[task]["aux"] next to the scales; the message lists the scales only.
    out = {t: {0: torch.zeros(1, 2, 4, 4), "aux": torch.zeros(1, 3, 1, 1)} for t in ("semseg", "depth")}
    with pytest.raises(ValueError, match=r"no output at scale 2 \(it has 0\); pass --scale 0"):
        to_predictions(out, 2, OutputSpace(num_classes=2), ("semseg", "depth"))


@pytest.mark.parametrize("depth_output", ["inverse", "disparity"])
def test_depth_parametrisations_round_trip(depth_output):
    space = OutputSpace(depth_output=depth_output, d_far=655.36, disparity_range=(0.1, 100.0))
    depth = torch.tensor([0.5, 3.0, 20.0, 80.0]).view(4, 1, 1, 1)
    raw = 655.36 / depth if depth_output == "inverse" else depth_to_disparity(depth, 0.1, 100.0)
    assert torch.allclose(space.depth_metres(raw), depth, rtol=1e-5)
    assert torch.allclose(space.depth_to_inverse_normalised(raw), 655.36 / depth, rtol=1e-5)


def test_normalised_depth_of_a_prediction_and_of_a_label_agree():
    space = OutputSpace(depth_range=(1.0, 100.0))
    depth = torch.tensor([1.0, 2.0, 10.0, 100.0]).view(4, 1, 1, 1)
    from_prediction = space.normalised_depth(655.36 / depth)
    from_label = space.normalised_depth_label(depth)
    assert torch.allclose(from_prediction, from_label, atol=1e-6)
    assert from_label.flatten()[0] == pytest.approx(1.0) and from_label.flatten()[-1] == pytest.approx(0.0)
    assert space.normalised_depth_label(torch.zeros(1, 1, 1, 1)).item() == 0.0  # no measurement stays 0


def test_domain_maps():
    space = OutputSpace()
    uniform = torch.zeros(1, 4, 2, 2)
    assert torch.allclose(TASK_DEFS["semseg"].domain_map(uniform, space).sum(1), torch.ones(1, 2, 2))
    normals = torch.randn(1, 3, 2, 2)
    assert torch.allclose(TASK_DEFS["normals"].domain_map(normals, space).norm(dim=1), torch.ones(1, 2, 2))
    assert TASK_DEFS["edges"].domain_map(torch.zeros(1, 1, 2, 2), space).eq(0.5).all()


def test_consistency_losses_vanish_when_the_transfer_matches_the_prediction():
    space = OutputSpace()
    logits = torch.randn(2, 5, 4, 4)
    seg = TASK_DEFS["semseg"]
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    assert seg.consistency_loss(logits, logits, space) == pytest.approx(float(entropy), rel=1e-5)
    assert seg.consistency_loss(torch.zeros_like(logits), logits, space) > entropy
    g = torch.full((2, 1, 4, 4), 655.36 / 10.0)
    depth = TASK_DEFS["depth"]
    assert depth.consistency_loss(depth.transfer_input(g, space), g, space) == 0.0


def test_unknown_loss_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown loss 'l2'; choose one of berhu, l1"):
        TASK_DEFS["depth"].loss("l2")
