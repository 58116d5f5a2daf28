"""Streaming evaluation metrics whose state is a dict of float64 SUMS, so it reduces exactly across processes.

Every metric accumulates counts and sums only; `sync(reduce_fn)` with e.g.
`lambda s: accelerator.reduce(s, "sum")` turns a per-process state into the global one. Ratios
(IoU, accuracy, F1, delta thresholds, % of normals under an angle) are fractions in [0, 1], depth
errors are in metres, angles in degrees. An undefined value (nothing measured) is NaN.
The state lives on `device` (default CPU) and follows the device of the updates; for an NCCL reduce
create the metrics with `device=accelerator.device`, so a process that saw no batch is on it too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from uda.losses.tasks import IGNORE_INDEX, resize_to

State = dict[str, Tensor]
ReduceFn = Callable[[State], State]


def _div(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _shape(dims: Sequence[int | str]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def _check_maps(metric: str, pred: Tensor, target: Tensor, channels: int, what: str) -> None:
    """Refuse a prediction other than [B,channels,h,w] or a target other than [B,channels,H,W] (same B): a
    broadcast or a misread channel axis would give a wrong number instead of an error."""
    if target.dim() != 4 or target.shape[1] != channels:
        raise ValueError(
            f"{metric}: expected a target {_shape(['B', channels, 'H', 'W'])}, got {_shape(target.shape)}"
        )
    if pred.dim() != 4 or tuple(pred.shape[:2]) != (target.shape[0], channels):
        raise ValueError(
            f"{metric}: expected {what} {_shape([target.shape[0], channels, 'h', 'w'])} for a target "
            f"{_shape(target.shape)}, got {_shape(pred.shape)}"
        )


class StreamingMetric:
    """Base class: a named set of float64 sum tensors with update / state / load_state / sync / reset."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device if device is not None else "cpu")
        self._state: State = {}
        self.reset()

    def _empty_state(self) -> State:
        raise NotImplementedError

    def _add(self, key: str, value: Tensor | float) -> None:
        # The state follows the device of the updates, so a collective reduce (NCCL) can run on it as is.
        current = self._state[key]
        if isinstance(value, Tensor):
            current = current.to(value.device)
            value = value.to(torch.float64)
        self._state[key] = current + value

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._state = {k: v.to(self.device) for k, v in self._empty_state().items()}

    def state(self) -> State:
        """The accumulated sums (float64 tensors); summing states of disjoint data gives the joint state."""
        return {k: v.clone() for k, v in self._state.items()}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Replace the accumulated sums by `state` (same keys and shapes as `state()`)."""
        expected = self._empty_state()
        if set(state) != set(expected):
            raise KeyError(f"state keys {sorted(state)} != expected {sorted(expected)}")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"state {key!r}: shape {tuple(value.shape)} != {tuple(expected[key].shape)}")
        self._state = {k: v.detach().to(torch.float64).clone() for k, v in state.items()}

    def merge(self, other_state: Mapping[str, Tensor]) -> None:
        """Add another accumulator's state (e.g. gathered from another process) to this one."""
        for key, value in other_state.items():
            self._add(key, value)

    def sync(self, reduce_fn: ReduceFn) -> None:
        """Replace the state by reduce_fn(state), e.g. a cross-process sum. Call once per evaluation."""
        self.load_state(reduce_fn(self.state()))

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class SegmentationMetric(StreamingMetric):
    """Confusion-matrix segmentation metrics: mIoU over classes in GT or prediction, pixel accuracy."""

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        super().__init__(device)

    def _empty_state(self) -> State:
        # Rows: ground truth class, columns: predicted class.
        return {"confusion": torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)}

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add predicted labels [B,h,w] (nearest resize) or logits [B,C,h,w] (bilinear resize, argmax) vs target
        [B,H,W]; any other shape is a ValueError (a label map [B,1,H,W] would be read as 1-channel logits)."""
        if target.dim() != 3:
            raise ValueError(f"SegmentationMetric: expected a target [B,H,W], got {_shape(target.shape)}")
        batch, c = target.shape[0], self.num_classes
        if not (pred.dim() in (3, 4) and pred.shape[0] == batch and (pred.dim() == 3 or pred.shape[1] == c)):
            raise ValueError(
                f"SegmentationMetric: expected logits [{batch},{c},h,w] or labels [{batch},h,w] for a target "
                f"{_shape(target.shape)}, got {_shape(pred.shape)}"
            )
        size = target.shape[-2:]
        if pred.dim() == 4:
            pred = resize_to(pred.float(), size).argmax(dim=1)
        elif tuple(pred.shape[-2:]) != tuple(size):
            pred = F.interpolate(pred[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
        pred = pred.long()
        target = target.long()
        valid = target != self.ignore_index
        # A GT id outside [0, C) other than the ignore id is a label-set mismatch (e.g. 19-class labels for a
        # 16-class model, or another ignore id such as 250): dropping those pixels would change mIoU silently.
        bad = valid & ((target < 0) | (target >= self.num_classes))
        if bool(bad.any()):
            ids = sorted({int(v) for v in target[bad].unique()[:8].tolist()})
            raise ValueError(
                f"ground-truth ids {ids} outside [0, {self.num_classes}) and not the ignore id "
                f"{self.ignore_index}; evaluate with the label set the model was trained on"
            )
        pred, target = pred[valid], target[valid]
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= self.num_classes):
            raise ValueError(f"predicted labels outside [0, {self.num_classes})")
        counts = torch.bincount(target * self.num_classes + pred, minlength=self.num_classes**2)
        self._add("confusion", counts.reshape(self.num_classes, self.num_classes))

    def iou_per_class(self) -> Tensor:
        """IoU per class [C] (float64); NaN for classes absent from both ground truth and prediction."""
        cm = self._state["confusion"].cpu()
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))

    def miou_subset(self, class_indices: Iterable[int]) -> float:
        """Mean IoU over the given classes (e.g. 13 of 16), skipping those absent from GT and prediction."""
        iou = self.iou_per_class()[list(class_indices)]
        return float(iou.nanmean()) if bool((~iou.isnan()).any()) else math.nan

    def compute(self) -> dict[str, float]:
        """miou, pixel_acc and iou/<class index> for the classes present in GT or prediction."""
        cm = self._state["confusion"].cpu()
        iou = self.iou_per_class()
        out = {
            "miou": self.miou_subset(range(self.num_classes)),
            "pixel_acc": _div(float(cm.diagonal().sum()), float(cm.sum())),
        }
        out.update({f"iou/{c}": float(v) for c, v in enumerate(iou.tolist()) if not math.isnan(v)})
        return out


def _median(x: Tensor) -> Tensor:
    # numpy's median (mean of the two middle values for an even count); torch.median takes the lower one.
    s = x.sort().values
    n = s.numel()
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


_DEPTH_TERMS = ("abs_rel", "abs_err", "sq_rel", "sq_err", "log_sq_err", "a1", "a2", "a3")


class DepthMetric(StreamingMetric):
    """Depth errors in metres (abs_rel, abs_err, sq_rel, rmse, rmse_log, a1-a3) on GT pixels in (min_depth, max_depth).

    per_image=True (the DenseMTL authors' protocol) computes every metric per image and averages over
    images; `rmse` is sqrt of the mean over images of the per-image MSE, `rmse_log` likewise from the
    per-image mean squared log error. per_image=False pools all valid pixels of the set: rmse and
    rmse_log are the root of the mean over every pixel. In both modes `rmse_per_image` and
    `rmse_log_per_image` are the mean over images of each image's RMSE (RMSE-log), the other common
    per-image convention. Images without a valid GT pixel are skipped.
    """

    def __init__(
        self,
        min_depth: float = 1e-3,
        max_depth: float = 80.0,
        median_scaling: bool = False,
        per_image: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.median_scaling = median_scaling
        self.per_image = per_image
        super().__init__(device)

    def _empty_state(self) -> State:
        keys = (*_DEPTH_TERMS, "rmse_per_image", "rmse_log_per_image", "median_scale", "count", "images")
        return {k: torch.zeros((), dtype=torch.float64) for k in keys}

    @torch.no_grad()
    def update(self, pred_m: Tensor, gt_m: Tensor) -> None:
        """Add predicted depth [B,1,h,w] (metres, resized bilinearly) vs GT [B,1,H,W] (metres, 0 = none)."""
        _check_maps("DepthMetric", pred_m, gt_m, 1, "depth")
        pred_m = resize_to(pred_m.double(), gt_m.shape[-2:])
        gt_m = gt_m.double()
        for pred, gt in zip(pred_m, gt_m, strict=True):
            valid = (gt > self.min_depth) & (gt < self.max_depth)
            if not bool(valid.any()):
                continue  # an image without valid GT says nothing about the prediction
            p, g = pred[valid], gt[valid]
            if self.median_scaling:
                # Guard against a degenerate all-non-positive prediction; real predictions are > 0.
                ratio = _median(g) / _median(p).clamp_min(self.min_depth)
                p = p * ratio
                self._add("median_scale", ratio)
            p = p.clamp(self.min_depth, self.max_depth)
            ratio_max = torch.maximum(p / g, g / p)
            terms = {
                "abs_rel": (p - g).abs() / g,
                "abs_err": (p - g).abs(),
                "sq_rel": (p - g).square() / g,
                "sq_err": (p - g).square(),
                "log_sq_err": (p.log() - g.log()).square(),
                "a1": (ratio_max < 1.25).double(),
                "a2": (ratio_max < 1.25**2).double(),
                "a3": (ratio_max < 1.25**3).double(),
            }
            # Sums of per-image means (per image) or of per-pixel values (pooled).
            for key, term in terms.items():
                self._add(key, term.mean() if self.per_image else term.sum())
            self._add("rmse_per_image", terms["sq_err"].mean().sqrt())
            self._add("rmse_log_per_image", terms["log_sq_err"].mean().sqrt())
            self._add("count", valid.sum())
            self._add("images", 1.0)

    def compute(self) -> dict[str, float]:
        """Depth metrics; `median_scale` (mean GT/prediction median ratio) only with median scaling."""
        s = {k: float(v) for k, v in self._state.items()}
        n = s["images"] if self.per_image else s["count"]
        out = {k: _div(s[k], n) for k in ("abs_rel", "abs_err", "sq_rel", "a1", "a2", "a3")}
        # sqrt of the mean squared error: over images of per-image MSE, or over pooled pixels.
        out["rmse"] = math.sqrt(_div(s["sq_err"], n))
        out["rmse_log"] = math.sqrt(_div(s["log_sq_err"], n))
        out["rmse_per_image"] = _div(s["rmse_per_image"], s["images"])
        out["rmse_log_per_image"] = _div(s["rmse_log_per_image"], s["images"])
        if self.median_scaling:
            out["median_scale"] = _div(s["median_scale"], s["images"])
        return out


class NormalsMetric(StreamingMetric):
    """Angular error (degrees) of normals over pixels with known GT, per image and pooled.

    Per image (the DenseMTL authors' protocol, the unsuffixed keys): each image's mean and median angle
    and its fraction of pixels under 11.25/22.5/30 degrees are averaged over images; `rmse` is sqrt of
    the mean over images of the per-image mean squared angle. Images without a known GT normal are
    skipped. The per-image median is exact (numpy's: the mean of the two middle values for an even
    count; the released code's torch.median takes the lower one).
    Pooled (`*_pooled`): the same quantities over all valid pixels of the set. The pooled median comes
    from a histogram with 0.01 degree bins over [0, 180] (bin centre), so it is exact to within 0.01
    degrees and still reduces by summation across processes.
    """

    BIN_DEG = 0.01
    NUM_BINS = 18000
    THRESHOLDS = (11.25, 22.5, 30.0)

    def _empty_state(self) -> State:
        # Pooled: sums over pixels. Per image: sums over images of per-image values.
        keys = ["sum", "sum_sq", "count", "image_mean", "image_median", "image_mse", "images"]
        keys += [f"within_{t}" for t in self.THRESHOLDS] + [f"image_within_{t}" for t in self.THRESHOLDS]
        state = {k: torch.zeros((), dtype=torch.float64) for k in keys}
        state["hist"] = torch.zeros(self.NUM_BINS, dtype=torch.float64)
        return state

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add raw predicted normals [B,3,h,w] (resized bilinearly) vs GT [B,3,H,W] (0 = unknown)."""
        _check_maps("NormalsMetric", pred, target, 3, "normals")
        pred = resize_to(pred.float(), target.shape[-2:])
        valid = target.norm(dim=1) > 0.5
        p = F.normalize(pred, dim=1, eps=1e-8).movedim(1, -1).double()
        g = F.normalize(target.float(), dim=1, eps=1e-8).movedim(1, -1).double()
        # 2 atan2(|p-g|, |p+g|) is accurate near 0 and 180 degrees, where arccos(p.g) loses precision.
        angles = torch.rad2deg(2.0 * torch.atan2((p - g).norm(dim=-1), (p + g).norm(dim=-1)))
        for image_angles, image_valid in zip(angles, valid, strict=True):
            angle = image_angles[image_valid]
            if angle.numel() == 0:
                continue  # an image without known GT normals says nothing about the prediction
            self._add("sum", angle.sum())
            self._add("sum_sq", angle.square().sum())
            self._add("count", float(angle.numel()))
            self._add("image_mean", angle.mean())
            self._add("image_median", _median(angle))
            self._add("image_mse", angle.square().mean())
            self._add("images", 1.0)
            for t in self.THRESHOLDS:
                below = (angle < t).double()
                self._add(f"within_{t}", below.sum())
                self._add(f"image_within_{t}", below.mean())
            bins = (angle / self.BIN_DEG).long().clamp(0, self.NUM_BINS - 1)
            self._add("hist", torch.bincount(bins, minlength=self.NUM_BINS))

    def _pooled_median(self) -> float:
        n = float(self._state["count"])
        if n <= 0:
            return math.nan
        # Like numpy: the middle value, or the mean of the two middle values for an even count.
        count = round(n)
        ranks = [(count + 1) // 2] if count % 2 else [count // 2, count // 2 + 1]
        cumulative = self._state["hist"].cpu().cumsum(0)
        bins = torch.searchsorted(cumulative, torch.tensor(ranks, dtype=torch.float64))
        return float((bins.double() + 0.5).mean()) * self.BIN_DEG

    def compute(self) -> dict[str, float]:
        """mean, median, rmse (degrees) and within_<t> (fraction under t degrees): per image averaged over
        images, and the same keys with the suffix `_pooled` over all valid pixels."""
        s = {k: float(v) for k, v in self._state.items() if k != "hist"}
        images, n = s["images"], s["count"]
        out = {
            "mean": _div(s["image_mean"], images),
            "median": _div(s["image_median"], images),
            "rmse": math.sqrt(_div(s["image_mse"], images)),
        }
        out.update({f"within_{t}": _div(s[f"image_within_{t}"], images) for t in self.THRESHOLDS})
        out["mean_pooled"] = _div(s["sum"], n)
        out["median_pooled"] = self._pooled_median()
        out["rmse_pooled"] = math.sqrt(_div(s["sum_sq"], n))
        out.update({f"within_{t}_pooled": _div(s[f"within_{t}"], n) for t in self.THRESHOLDS})
        return out


class EdgesMetric(StreamingMetric):
    """Edge metrics at a fixed threshold on the edge probability, from a summed 2-class confusion (TP/FP/FN/TN).

    `f1` is the DenseMTL authors' headline: the mean of the background and edge F1, skipping a class
    absent from both GT and prediction (its F1 is 0/0); not ODS-F. `f1_edge`, `precision_edge` and
    `recall_edge` are those of the edge class, `f1_bg` that of the background. GT pixels other than 0
    and 1 are ignored.
    """

    def __init__(self, threshold: float = 0.5, device: torch.device | str | None = None) -> None:
        self.threshold = threshold
        super().__init__(device)

    def _empty_state(self) -> State:
        return {k: torch.zeros((), dtype=torch.float64) for k in ("tp", "fp", "fn", "tn")}

    @torch.no_grad()
    def update(self, prob: Tensor, target: Tensor) -> None:
        """Add edge probabilities [B,1,h,w] (TaskDef.predict: sigmoid of the logit; bilinearly resized) vs GT
        {0,1} [B,1,H,W]."""
        _check_maps("EdgesMetric", prob, target, 1, "edge probabilities")
        prob = resize_to(prob.float(), target.shape[-2:])
        valid = (target == 0) | (target == 1)
        pred = (prob > self.threshold)[valid]
        gt = (target == 1)[valid]
        self._add("tp", (pred & gt).sum())
        self._add("fp", (pred & ~gt).sum())
        self._add("fn", (~pred & gt).sum())
        self._add("tn", (~pred & ~gt).sum())

    def compute(self) -> dict[str, float]:
        """f1 (mean of background and edge F1), f1_edge, f1_bg, precision_edge, recall_edge (fractions)."""
        tp, fp, fn, tn = (float(self._state[k]) for k in ("tp", "fp", "fn", "tn"))
        f1_edge = _div(2 * tp, 2 * tp + fp + fn)
        f1_bg = _div(2 * tn, 2 * tn + fn + fp)
        defined = [f for f in (f1_bg, f1_edge) if not math.isnan(f)]
        return {
            "f1": sum(defined) / len(defined) if defined else math.nan,
            "f1_edge": f1_edge,
            "f1_bg": f1_bg,
            "precision_edge": _div(tp, tp + fp),
            "recall_edge": _div(tp, tp + fn),
        }


class BoundaryOdsF(StreamingMetric):
    """Boundary odsF / oisF / AP of the BSDS and SEISM benchmarks (uda.boundary), streaming.

    The state is, per threshold, the sums over images of cntR, sumR, cntP, sumP, plus the sums of each image's
    counts at its own best threshold (oisF), so states of disjoint images add up. `max_dist` is the tolerance as a
    fraction of the image diagonal (0.0075 PASCAL-Context, 0.011 NYUD-v2). Evaluated at the label resolution;
    GT 255 marks padding (see uda.boundary). Costs about a second of CPU per 480x640 image.
    """

    def __init__(
        self,
        max_dist: float = 0.011,
        thin: bool = True,
        num_thresholds: int = 99,
        device: torch.device | str | None = None,
    ) -> None:
        from uda.boundary import BSDS_THRESHOLDS

        self.max_dist = max_dist
        self.thin = thin
        self.thresholds = (
            BSDS_THRESHOLDS
            if num_thresholds == 99
            else np.linspace(1, num_thresholds, num_thresholds) / (num_thresholds + 1)
        )
        super().__init__(device)

    def _empty_state(self) -> State:
        k = len(self.thresholds)
        return {
            "counts": torch.zeros(k, 4, dtype=torch.float64),
            "ois_counts": torch.zeros(4, dtype=torch.float64),
        }

    @torch.no_grad()
    def update(self, prob: Tensor, target: Tensor) -> None:
        """Add edge probabilities [B,1,h,w] (bilinearly resized) vs GT [B,1,H,W]: 1 boundary, 0 not, 255 ignored."""
        from uda.boundary import boundary_counts, f_measure

        _check_maps("BoundaryOdsF", prob, target, 1, "edge probabilities")
        prob = resize_to(prob.float(), target.shape[-2:])
        total = np.zeros((len(self.thresholds), 4))
        ois = np.zeros(4)
        for p, t in zip(prob[:, 0].cpu().numpy(), target[:, 0].cpu().numpy(), strict=True):
            counts = boundary_counts(p, np.rint(t), self.max_dist, self.thresholds, self.thin)
            total += counts
            ois += counts[int(np.argmax(f_measure(counts)))]
        self._add("counts", torch.from_numpy(total).to(self._state["counts"].device))
        self._add("ois_counts", torch.from_numpy(ois).to(self._state["ois_counts"].device))

    def compute(self) -> dict[str, float]:
        """odsf, ods_precision, ods_recall, ods_threshold, oisf, ap (fractions); NaN before any image."""
        from uda.boundary import ods_ois_ap

        counts = self._state["counts"].cpu().numpy()
        if counts[:, 1].sum() == 0 and counts[:, 3].sum() == 0:
            return {
                k: math.nan for k in ("odsf", "ods_precision", "ods_recall", "ods_threshold", "oisf", "ap")
            }
        return ods_ois_ap(counts, self._state["ois_counts"].cpu().numpy(), self.thresholds)


class SaliencyMetric(StreamingMetric):
    """Saliency max-F and mIoU of the multi-task literature, from sigmoid probabilities vs binary GT.

    `maxf` (ATRC's MaxF, the headline of ATRC and CTAL): at thresholds 0.05, 0.10, ..., 0.95 (`prob >= t`), TP,
    predicted and actual positives are summed over all valid pixels of the split, F_beta = (1 + b2) P R /
    (b2 P + R) with beta^2 = 0.3 (undefined F counts 0), maximised over thresholds.
    `miou` (MTI-Net's / ASTMT's saliency mIoU, the column MTI-Net reports): at 15 thresholds linspace(0.2, 0.9)
    (`prob > t`), the IoU of each image (1 when GT and prediction are both empty) averaged over images, then the
    maximum over thresholds. `maxf_per_image` is MTI-Net's maxF: per-image precision and recall (tp / (tp + fp),
    0 when nothing is predicted) averaged over images at those 15 thresholds, F = 2PR / (P + R), the maximum.
    GT pixels labelled 255 are ignored in all three.
    """

    ATRC_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
    MTINET_THRESHOLDS = tuple(float(t) for t in np.linspace(0.2, 0.9, 15))

    def __init__(
        self,
        beta_squared: float = 0.3,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str | None = None,
    ) -> None:
        self.beta_squared = beta_squared
        self.ignore_index = ignore_index
        super().__init__(device)

    def _empty_state(self) -> State:
        a, m = len(self.ATRC_THRESHOLDS), len(self.MTINET_THRESHOLDS)
        zeros = {k: torch.zeros(a, dtype=torch.float64) for k in ("tp", "predicted", "actual")}
        zeros.update(
            {k: torch.zeros(m, dtype=torch.float64) for k in ("image_iou", "image_precision", "image_recall")}
        )
        zeros["images"] = torch.zeros((), dtype=torch.float64)
        return zeros

    @torch.no_grad()
    def update(self, prob: Tensor, target: Tensor) -> None:
        """Add saliency probabilities [B,1,h,w] (bilinearly resized) vs GT {0,1} [B,1,H,W] (255 ignored)."""
        _check_maps("SaliencyMetric", prob, target, 1, "saliency probabilities")
        prob = resize_to(prob.float(), target.shape[-2:])[:, 0].flatten(1)
        target = target[:, 0].flatten(1)
        valid = target != self.ignore_index
        gt = (target == 1) & valid
        atrc = torch.tensor(self.ATRC_THRESHOLDS, device=prob.device, dtype=prob.dtype)
        pred = (prob[:, None] >= atrc[None, :, None]) & valid[:, None]  # [B,T,N]
        self._add("tp", (pred & gt[:, None]).sum((0, 2)))
        self._add("predicted", pred.sum((0, 2)))
        self._add("actual", gt.sum().expand(len(self.ATRC_THRESHOLDS)))
        mti = torch.tensor(self.MTINET_THRESHOLDS, device=prob.device, dtype=prob.dtype)
        pred = (prob[:, None] > mti[None, :, None]) & valid[:, None]
        tp = (pred & gt[:, None]).sum(2).double()
        fp = (pred & ~gt[:, None]).sum(2).double()
        fn = (~pred & gt[:, None] & valid[:, None]).sum(2).double()
        union = tp + fp + fn
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.ones_like(tp))
        self._add("image_iou", iou.sum(0))
        self._add("image_precision", (tp / (tp + fp).clamp_min(1)).sum(0))
        self._add("image_recall", (tp / (tp + fn).clamp_min(1)).sum(0))
        self._add("images", float(prob.shape[0]))

    def compute(self) -> dict[str, float]:
        """maxf, maxf_threshold, miou, maxf_per_image (fractions); NaN before any image."""
        s = {k: v.cpu() for k, v in self._state.items()}
        images = float(s["images"])
        if images == 0:
            return {k: math.nan for k in ("maxf", "maxf_threshold", "miou", "maxf_per_image")}
        precision = s["tp"] / s["predicted"]
        recall = s["tp"] / s["actual"]
        f = (1 + self.beta_squared) * precision * recall / (self.beta_squared * precision + recall)
        f = torch.nan_to_num(f, nan=0.0)
        best = int(f.argmax())
        mean_p, mean_r = s["image_precision"] / images, s["image_recall"] / images
        f_image = 2 * mean_p * mean_r / (mean_p + mean_r + 1e-12)
        return {
            "maxf": float(f[best]),
            "maxf_threshold": self.ATRC_THRESHOLDS[best],
            "miou": float((s["image_iou"] / images).max()),
            "maxf_per_image": float(f_image.max()),
        }


# +1: higher is better, -1: lower is better. Per-class IoU keys ("semseg/iou/<c>") are +1 as well.
METRIC_DIRECTIONS: dict[str, int] = {
    "semseg/miou": +1,
    "semseg/pixel_acc": +1,
    "depth/abs_rel": -1,
    "depth/abs_err": -1,
    "depth/sq_rel": -1,
    "depth/rmse": -1,
    "depth/rmse_log": -1,
    "depth/rmse_per_image": -1,
    "depth/rmse_log_per_image": -1,
    "depth/a1": +1,
    "depth/a2": +1,
    "depth/a3": +1,
    "normals/mean": -1,
    "normals/median": -1,
    "normals/rmse": -1,
    "normals/within_11.25": +1,
    "normals/within_22.5": +1,
    "normals/within_30.0": +1,
    "normals/mean_pooled": -1,
    "normals/median_pooled": -1,
    "normals/rmse_pooled": -1,
    "normals/within_11.25_pooled": +1,
    "normals/within_22.5_pooled": +1,
    "normals/within_30.0_pooled": +1,
    "edges/f1": +1,
    "edges/f1_edge": +1,
    "edges/f1_bg": +1,
    "edges/precision_edge": +1,
    "edges/recall_edge": +1,
    "edges/odsf": +1,
    "edges/ods_precision": +1,
    "edges/ods_recall": +1,
    "edges/oisf": +1,
    "edges/ap": +1,
    "parts/miou": +1,
    "parts/pixel_acc": +1,
    "saliency/maxf": +1,
    "saliency/miou": +1,
    "saliency/maxf_per_image": +1,
}
# Diagnostics reported with the metrics that are neither better nor worse when higher.
NO_DIRECTION = ("depth/median_scale", "edges/ods_threshold", "saliency/maxf_threshold")

# One metric per task for the multi-task delta (paper §4.1), as the authors' released code defines them:
# mIoU; depth RMSE (per_image: sqrt of the mean per-image MSE); mean angle error per image averaged over
# images; F1 averaged over the background and edge classes.
# PASCAL-Context adds human parts (mIoU) and saliency (ATRC's max-F, beta^2 = 0.3). With odsF evaluated
# (MultiTaskMetrics(edge_metric="odsf")) the edges entry of a delta is edges/odsf instead (delta_keys).
PRIMARY_METRICS: dict[str, str] = {
    "semseg": "semseg/miou",
    "depth": "depth/rmse",
    "normals": "normals/mean",
    "edges": "edges/f1",
    "parts": "parts/miou",
    "saliency": "saliency/maxf",
}

# The metric sets of the Delta_m variants of the literature, per task (first present key wins for edges):
# "primary": one metric per task, as MTI-Net / ATRC / DenseMTL; "ctal": the same with depth relative error
# (CTAL); "all": every headline metric of each task, as XTasC (mIoU, pixel accuracy, abs err, rel err) and
# the MTAN / Nash-MTL NYUv2 convention (+ normals mean, median, within 11.25/22.5/30).
DELTA_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "primary": {
        "semseg": ("semseg/miou",),
        "parts": ("parts/miou",),
        "saliency": ("saliency/maxf",),
        "normals": ("normals/mean",),
        "edges": ("edges/odsf|edges/f1",),
        "depth": ("depth/rmse",),
    },
    "ctal": {
        "semseg": ("semseg/miou",),
        "parts": ("parts/miou",),
        "saliency": ("saliency/maxf",),
        "normals": ("normals/mean",),
        "edges": ("edges/odsf|edges/f1",),
        "depth": ("depth/abs_rel",),
    },
    "all": {
        "semseg": ("semseg/miou", "semseg/pixel_acc"),
        "parts": ("parts/miou",),
        "saliency": ("saliency/maxf", "saliency/miou"),
        "normals": (
            "normals/mean",
            "normals/median",
            "normals/within_11.25",
            "normals/within_22.5",
            "normals/within_30.0",
        ),
        "edges": ("edges/odsf|edges/f1",),
        "depth": ("depth/abs_err", "depth/abs_rel"),
    },
}


class MissingBaselineError(KeyError):
    """A Delta_m baseline lacks a metric; the message says which and how to produce it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def delta_keys(tasks: Iterable[str], metrics: Mapping[str, float], metric_set: str = "primary") -> list[str]:
    """The metric keys of a Delta_m variant for `tasks`: per task the keys of DELTA_SETS[metric_set]; an entry
    "a|b" takes the first alternative present in `metrics` (edges: odsF when evaluated, else F1)."""
    if metric_set not in DELTA_SETS:
        raise ValueError(f"unknown delta metric set {metric_set!r}; choose among {', '.join(DELTA_SETS)}")
    keys = []
    for task in tasks:
        if task not in DELTA_SETS[metric_set]:
            raise ValueError(f"no delta metric defined for task {task!r}")
        for entry in DELTA_SETS[metric_set][task]:
            options = entry.split("|")
            keys.append(next((k for k in options if k in metrics), options[0]))
    return keys


def metric_direction(key: str) -> int:
    """+1 if a higher value of metric `key` is better, -1 if lower is better."""
    if key in METRIC_DIRECTIONS:
        return METRIC_DIRECTIONS[key]
    if key.startswith(("semseg/iou/", "parts/iou/")):
        return +1
    raise KeyError(f"no direction known for metric {key!r}")


def multitask_delta(
    metrics: Mapping[str, float],
    baselines: Mapping[str, float],
    keys: Sequence[str] | None = None,
    metric_set: str = "primary",
    baseline_name: str | None = None,
) -> float:
    """Multi-task delta in percent: mean over keys of direction * (m - b) / b * 100.

    Default keys: `metric_set` ("primary", "ctal" or "all", see DELTA_SETS) for every task with a metric in
    `metrics`. Pass `keys` for a partial delta. Metric and baseline must be in the same units (both fractions
    or both percent). A metric missing from `baselines` raises MissingBaselineError naming it and how to
    produce it (`baseline_name` says which baseline run was used).
    """
    if keys is None:
        tasks = [t for t in DELTA_SETS.get(metric_set, {}) if any(k.startswith(f"{t}/") for k in metrics)]
        keys = delta_keys(tasks, metrics, metric_set)
    if not keys:
        raise ValueError("no metric to compare: pass keys or metrics containing primary metrics")
    terms = []
    for key in keys:
        if key not in metrics:
            raise KeyError(f"metric {key!r} missing from the evaluated metrics")
        if key not in baselines:
            source = f"the baseline {baseline_name!r}" if baseline_name else "the single-task baseline"
            raise MissingBaselineError(
                f"no baseline for metric {key!r}: {source} has {len(baselines)} metrics but not this one; "
                "train and evaluate the single-task (STL) run of the same recipe with the same evaluation "
                "options (e.g. the same edge metric), then pass it to uda-compare (or name it with --baseline)"
            )
        b = float(baselines[key])
        if b == 0:
            raise ValueError(f"baseline for {key!r} is 0; the relative delta is undefined")
        terms.append(metric_direction(key) * (float(metrics[key]) - b) / b)
    return 100.0 * sum(terms) / len(terms)


class MultiTaskMetrics:
    """One streaming metric per task; flat state and flat results ("semseg/miou", "depth/rmse", ...)."""

    def __init__(
        self,
        tasks: Sequence[str],
        num_classes: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        min_depth: float = 1e-3,
        max_depth: float = 80.0,
        median_scaling: bool = False,
        per_image: bool = True,
        edge_threshold: float = 0.5,
        device: torch.device | str | None = None,
        num_parts: int = 7,
        edge_metric: str = "f1",
        edge_max_dist: float = 0.011,
    ) -> None:
        """`edge_metric`: "f1" (EdgesMetric at `edge_threshold`, DenseMTL's) or "odsf" (BoundaryOdsF at
        tolerance `edge_max_dist`: 0.011 NYUD-v2, 0.0075 PASCAL-Context). `num_parts`: human-part classes
        (7 = background + 6 PASCAL parts). Predictions are TaskDef.predict outputs: semseg/parts logits, depth
        in metres, normals, edge and saliency probabilities."""
        if edge_metric not in ("f1", "odsf"):
            raise ValueError(f"edge_metric {edge_metric!r}: choose f1 or odsf")
        self.metrics: dict[str, StreamingMetric] = {}
        for task in tasks:
            if task == "semseg":
                if num_classes is None:
                    raise ValueError("semseg metrics need num_classes")
                self.metrics[task] = SegmentationMetric(num_classes, ignore_index, device=device)
            elif task == "depth":
                self.metrics[task] = DepthMetric(
                    min_depth, max_depth, median_scaling, per_image, device=device
                )
            elif task == "normals":
                self.metrics[task] = NormalsMetric(device=device)
            elif task == "edges" and edge_metric == "odsf":
                self.metrics[task] = BoundaryOdsF(edge_max_dist, device=device)
            elif task == "edges":
                self.metrics[task] = EdgesMetric(edge_threshold, device=device)
            elif task == "parts":
                self.metrics[task] = SegmentationMetric(num_parts, ignore_index, device=device)
            elif task == "saliency":
                self.metrics[task] = SaliencyMetric(ignore_index=ignore_index, device=device)
            else:
                raise ValueError(f"unknown task {task!r}")

    @property
    def segmentation(self) -> SegmentationMetric:
        """The semseg metric (for per-class IoU and mIoU over class subsets)."""
        metric = self.metrics["semseg"]
        assert isinstance(metric, SegmentationMetric)
        return metric

    def update(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        """Add final predictions {task: tensor} (depth in METRES) for tasks whose label is in `batch`."""
        for task, metric in self.metrics.items():
            if task in outputs and task in batch:
                try:
                    metric.update(outputs[task], batch[task])
                except ValueError as err:  # semseg and parts share a metric class: say which task it was
                    raise ValueError(f"{task}: {err}") from None

    def reset(self) -> None:
        """Forget everything accumulated."""
        for metric in self.metrics.values():
            metric.reset()

    def state(self) -> State:
        """Flat state {"<task>/<key>": float64 tensor} of sums."""
        return {f"{t}/{k}": v for t, m in self.metrics.items() for k, v in m.state().items()}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Replace the state by a flat state as returned by `state()`."""
        for task, metric in self.metrics.items():
            prefix = f"{task}/"
            metric.load_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    def sync(self, reduce_fn: ReduceFn) -> None:
        """Replace the state by reduce_fn(state), e.g. `lambda s: accelerator.reduce(s, "sum")`."""
        self.load_state(reduce_fn(self.state()))

    def compute(self) -> dict[str, float]:
        """Flat results {"<task>/<metric>": value}."""
        return {f"{t}/{k}": v for t, m in self.metrics.items() for k, v in m.compute().items()}
