"""Self-supervised depth from video (Monodepth2-style, DenseMTL §4.4): a pose network and view synthesis between
neighbouring frames train the depth task where it has no labels (the source video of Cityscapes SDE, or the
target video in adaptation)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from uda.config import PhotometricConfig
from uda.losses.photometric import PhotometricLoss
from uda.models.posenet import PoseNet, relative_pose
from uda.objectives.base import DOMAINS, Objective, ObjectiveError, RunContext, Step, StreamNeeds, Terms


def check_photometric(run: RunContext, ph: PhotometricConfig) -> None:
    """Self-supervised depth needs a depth task with a sigmoid-disparity head and a video stream."""
    cfg = run.cfg
    if "depth" not in run.tasks:
        raise ObjectiveError("photometric depth needs the depth task; add it to tasks (e.g. --tasks SD)")
    if cfg.model.depth_output != "disparity":
        raise ObjectiveError(
            "photometric depth needs model.depth_output=disparity (a sigmoid disparity head)"
        )
    if ph.domain == "target" and cfg.target is None:
        raise ObjectiveError("photometric.domain=target needs a target dataset (an adaptation recipe)")
    if not set(ph.scales) <= set(cfg.model.output_scales or ()) | {0}:
        raise ObjectiveError(
            f"photometric.scales={ph.scales} needs those depth outputs: set model.output_scales={ph.scales}"
        )
    if ph.pose_init_forward < 0:
        raise ObjectiveError(
            f"photometric.pose_init_forward={ph.pose_init_forward}: must be >= 0 (0 = near-identity start)"
        )


class Photometric(Objective):
    """Warp the neighbouring frames onto the current one with the predicted depth and pose; the minimum
    reprojection error (SSIM + L1), auto-masking and edge-aware smoothness train depth and pose together.
    The pose net is trained with the model, at its own learning rate (photometric.lr_pose)."""

    section = "photometric"

    def __init__(self, run: RunContext, cfg: PhotometricConfig) -> None:
        super().__init__(run, cfg)
        check_photometric(run, cfg)
        model = run.cfg.model
        self.posenet = PoseNet(cfg.pose_backbone, model.pretrained, model.weights_path, cfg.pose_init_forward)
        self.photometric_loss = PhotometricLoss(
            cfg.scales, cfg.smoothness_weight, cfg.min_depth, cfg.max_depth, cfg.automask
        )
        self.domain = DOMAINS.index(cfg.domain)

    def needs(self, domain: int) -> StreamNeeds | None:
        if domain != self.domain:
            return None
        return StreamNeeds(frames=self.cfg.frames, unlabelled=frozenset({"depth"}))

    def joint_networks(self) -> dict[str, nn.Module]:
        return {"posenet": self.posenet}

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.posenet.parameters()), "lr": self.cfg.lr_pose}]

    def photometric_objective(self, video, outputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Self-supervised depth: warp the neighbouring frames with predicted depth and pose (Monodepth2)."""
        target = video["image"]
        poses = {o: relative_pose(self.posenet, target, video["frames"][o], o) for o in self.cfg.frames}
        disparities = {s: outputs["depth"][s] for s in self.cfg.scales}
        # With colour jitter the networks saw jittered frames; the loss compares the originals (Monodepth2).
        clean = video.get("unjittered", video)
        loss, logs = self.photometric_loss(disparities, clean["image"], clean["frames"], poses, video["K"])
        return loss, {k: torch.as_tensor(v) for k, v in logs.items()}

    def loss(self, step: Step) -> Terms:
        loss, logs = self.photometric_objective(step.batch[self.cfg.domain], step.outputs[self.cfg.domain])
        return Terms(total=self.cfg.weight * loss, logs=logs)
