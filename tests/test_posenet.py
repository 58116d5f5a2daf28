"""Pose net: shapes, small initial motion, pretrained first-conv duplication, relative_pose convention."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from uda.geometry import pose_vec_to_mat
from uda.models.backbone import PretrainedWeightsError
from uda.models.posenet import PoseNet, relative_pose


@pytest.fixture(scope="module")
def posenet() -> PoseNet:
    torch.manual_seed(0)
    return PoseNet("resnet18").eval()


def test_output_shapes_small_initial_motion_and_order_matters(posenet):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 64, 128, generator=g)
    b = torch.rand(2, 3, 64, 128, generator=g)
    with torch.no_grad():
        axis_angle, translation = posenet(a, b)
        axis_angle_ba, _ = posenet(b, a)
    assert axis_angle.shape == (2, 3) and translation.shape == (2, 3)
    # The 0.01 output scale keeps an untrained prediction near the identity motion.
    assert axis_angle.abs().max() < 0.05 and translation.abs().max() < 0.05
    assert axis_angle.abs().max() > 0
    # The frames are stacked, not pooled: swapping them changes the prediction.
    assert (axis_angle - axis_angle_ba).abs().max() > 1e-6


def test_gradients_reach_first_conv():
    net = PoseNet("resnet18")
    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    axis_angle, translation = net(a, b)
    (axis_angle.sum() + translation.sum()).backward()
    first = net.encoder[0]
    assert first.weight.shape == (64, 6, 7, 7)
    assert first.weight.grad is not None and first.weight.grad[:, 3:].abs().sum() > 0


def test_pretrained_conv1_is_duplicated_and_halved(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    net = PoseNet("resnet18", weights_path=str(path)).eval()
    w = reference.conv1.weight
    first = net.encoder[0].weight
    assert torch.equal(first[:, :3], w / 2) and torch.equal(first[:, 3:], w / 2)
    # Other layers load unchanged.
    assert torch.equal(net.encoder[4][0].conv1.weight, reference.layer1[0].conv1.weight)
    # A pair of identical frames gives the pretrained net's first-layer response on one frame.
    image = torch.rand(1, 3, 32, 32)
    normalised = (image - net.mean) / net.std
    single = F.conv2d(normalised, w, stride=2, padding=3)
    pair = net.encoder[0](torch.cat([normalised, normalised], dim=1))
    torch.testing.assert_close(pair, single, rtol=1e-5, atol=1e-5)


def test_bad_weights_file_raises(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(PretrainedWeightsError):
        PoseNet("resnet18", weights_path=str(path))


class StubPoseNet:
    """Returns a fixed motion and records the order in which frames were fed."""

    def __init__(self, axis_angle: torch.Tensor, translation: torch.Tensor):
        self.axis_angle, self.translation = axis_angle, translation
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((a, b))
        return self.axis_angle, self.translation


def test_relative_pose_feeds_temporal_order_and_inverts_for_past_frames():
    axis_angle = torch.tensor([[0.02, -0.05, 0.01]])
    translation = torch.tensor([[0.1, -0.2, 1.5]])
    stub = StubPoseNet(axis_angle, translation)
    target, past, future = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4), torch.full((1, 3, 4, 4), 2.0)
    T = pose_vec_to_mat(axis_angle, translation)

    T_future = relative_pose(stub, target, future, offset=1)
    assert stub.calls[-1][0] is target and stub.calls[-1][1] is future
    torch.testing.assert_close(T_future, T)

    T_past = relative_pose(stub, target, past, offset=-1)
    assert stub.calls[-1][0] is past and stub.calls[-1][1] is target
    torch.testing.assert_close(T_past, torch.linalg.inv(T), rtol=1e-6, atol=1e-6)
    # The same predicted motion read in the two orders gives inverse transforms.
    torch.testing.assert_close(T_past @ T_future, torch.eye(4)[None], rtol=1e-6, atol=1e-6)
    assert len(stub.calls) == 2  # one pass per source frame

    with pytest.raises(ValueError):
        relative_pose(stub, target, past, offset=0)


def test_forward_motion_start_moves_the_camera_forward_in_both_orders():
    torch.manual_seed(0)
    net = PoseNet("resnet18", forward_motion=0.015).eval()
    g = torch.Generator().manual_seed(1)
    target, future, past = (torch.rand(3, 3, 48, 96, generator=g) for _ in range(3))
    with torch.no_grad():
        axis_angle, translation = net(target, future)
        T_future = relative_pose(net, target, future, offset=1)
        T_past = relative_pose(net, target, past, offset=-1)
    # Scene points come 0.015 units closer to the next camera and lie 0.015 further from the previous one;
    # the random part of an untrained net is a small fraction of that.
    torch.testing.assert_close(translation[:, 2], torch.full((3,), -0.015), rtol=0, atol=0.003)
    assert translation[:, :2].abs().max() < 0.003 and axis_angle.abs().max() < 0.003
    torch.testing.assert_close(T_future[:, 2, 3], torch.full((3,), -0.015), rtol=0, atol=0.003)
    torch.testing.assert_close(T_past[:, 2, 3], torch.full((3,), 0.015), rtol=0, atol=0.003)
    # Without it the start is Monodepth2's near-identity motion.
    torch.manual_seed(0)
    plain = PoseNet("resnet18").eval()
    with torch.no_grad():
        assert plain(target, future)[1].abs().max() < 0.003
    with pytest.raises(ValueError, match="forward_motion"):
        PoseNet("resnet18", forward_motion=-0.01)
