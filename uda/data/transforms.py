"""Training and evaluation transforms on the sample dict of DESIGN.md (resize, crop, flip, colour jitter).

Every geometric step updates K (see uda/geometry.py for the pixel-centre convention), so back-projecting
the transformed depth with the transformed K gives the same 3-D points as before (mirrored in x after a
flip). Images and frames are resized bilinearly with antialiasing; semseg, depth, normals and edges by
nearest neighbour, so a depth value is always a real measurement and never a blend across an object edge.

Normals are unit vectors of the surface in the camera frame, a property of the 3-D scene: a resize or
crop changes K but not the scene, so normals keep their values, even when the aspect ratio changes (fx
and fy then scale differently, and back-projection with the new K still yields the same 3-D surface).
Only the flip, which mirrors the scene (x -> -x), changes them: their x component is negated.

`resize_to` (DataConfig.resize_to) fixes the size every sample is resized to before the random zoom and the
crop, e.g. VKITTI2 1242x375 -> 1696x512 (aspect ratio kept) then a 1024x512 crop, as the DenseMTL code does
for VKITTI2 -> Cityscapes. Without it a sample is resized straight to the (zoomed) output size, which
changes the aspect ratio when the two differ. Evaluation then runs on the whole image at resize_to.

Randomness comes from torch's global RNG only (also for albumentations, which gets a seed drawn from it),
so torch.manual_seed and DataLoader worker seeding make runs reproducible.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import torch
import torch.nn.functional as F

from uda.geometry import crop_intrinsics, hflip_intrinsics, resize_intrinsics

IGNORE_INDEX = 255

# Label-like maps: resized by nearest neighbour, padded with their "unknown" value.
# Edges, parts and saliency pad with 255 (ignored by their losses and metrics; the boundary benchmark crops
# it away), as ATRC's PadImage.
_LABEL_FILL: dict[str, float] = {
    "semseg": IGNORE_INDEX,
    "depth": 0.0,
    "normals": 0.0,
    "edges": float(IGNORE_INDEX),
    "parts": IGNORE_INDEX,
    "saliency": float(IGNORE_INDEX),
}
FITS = ("resize", "pad")
CROPS = ("random", "center")
_IMAGE_FILL = 0.0

Sample = dict[str, Any]


def _nearest_indices(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """Index of the source pixel nearest to each destination pixel centre, in exact integer arithmetic."""
    # Destination centre v sits at source coordinate (v + 0.5) * src / dst - 0.5; rounding it to the nearest
    # integer is floor((2v + 1) * src / (2 dst)). Integers avoid float ties, so this agrees with
    # resize_intrinsics exactly.
    v = torch.arange(dst, device=device)
    return ((2 * v + 1) * src) // (2 * dst)


def resize_nearest(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a map [..., H, W] of any dtype to hw (pixel-centre aligned)."""
    H, W = x.shape[-2:]
    if (H, W) == tuple(hw):
        return x
    iy = _nearest_indices(H, hw[0], x.device)
    ix = _nearest_indices(W, hw[1], x.device)
    return x[..., iy[:, None], ix[None, :]]


def resize_bilinear(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of an image [C, H, W] to hw (pixel-centre aligned)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    # align_corners=False is the pixel-centre convention of resize_intrinsics; the triangle filter has
    # non-negative weights, so values stay within the input's range.
    return F.interpolate(x[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]


def crop_pad(x: torch.Tensor, top: int, left: int, hw: tuple[int, int], fill: float) -> torch.Tensor:
    """Window [..., h, w] of x starting at (top, left); parts outside x (negative offsets too) are `fill`."""
    H, W = x.shape[-2:]
    h, w = hw
    out = x.new_full((*x.shape[:-2], h, w), fill)
    y0, y1 = max(top, 0), min(top + h, H)
    x0, x1 = max(left, 0), min(left + w, W)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top : y1 - top, x0 - left : x1 - left] = x[..., y0:y1, x0:x1]
    return out


def _copy(sample: Sample) -> Sample:
    """Shallow copy that also copies the frames dict, so transforms never mutate the caller's sample."""
    out = dict(sample)
    if "frames" in out:
        out["frames"] = dict(out["frames"])
    if "K" in out:
        out["K"] = torch.as_tensor(out["K"], dtype=torch.float32)
    return out


def _resize(sample: Sample, hw: tuple[int, int], labels: bool = True) -> Sample:
    """Resize image, frames and K to hw, and the label maps too when `labels` (in place on a copy)."""
    src_hw = tuple(sample["image"].shape[-2:])
    if src_hw == tuple(hw):
        return sample
    sample["image"] = resize_bilinear(sample["image"], hw)
    if "frames" in sample:
        sample["frames"] = {k: resize_bilinear(f, hw) for k, f in sample["frames"].items()}
    if "K" in sample:
        sample["K"] = resize_intrinsics(sample["K"], src_hw, hw)
    if labels:
        for key in _LABEL_FILL:
            if key in sample:
                sample[key] = resize_nearest(sample[key], hw)
    return sample


def _crop(sample: Sample, top: int, left: int, hw: tuple[int, int]) -> Sample:
    """Crop (or pad) every map to the window at (top, left) of size hw, and shift K."""
    sample["image"] = crop_pad(sample["image"], top, left, hw, _IMAGE_FILL)
    if "frames" in sample:
        sample["frames"] = {k: crop_pad(f, top, left, hw, _IMAGE_FILL) for k, f in sample["frames"].items()}
    for key, fill in _LABEL_FILL.items():
        if key in sample:
            sample[key] = crop_pad(sample[key], top, left, hw, fill)
    if "K" in sample:
        sample["K"] = crop_intrinsics(sample["K"], top, left)
    return sample


def _hflip(sample: Sample) -> Sample:
    """Mirror every map horizontally, negate the normals' x and move cx (never cy)."""
    width = sample["image"].shape[-1]
    sample["image"] = sample["image"].flip(-1)
    if "frames" in sample:
        sample["frames"] = {k: f.flip(-1) for k, f in sample["frames"].items()}
    for key in _LABEL_FILL:
        if key in sample:
            sample[key] = sample[key].flip(-1)
    if "normals" in sample:
        # The flipped image shows the mirrored scene (x -> -x), whose surfaces have mirrored normals.
        sample["normals"] = sample["normals"] * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    if "K" in sample:
        sample["K"] = hflip_intrinsics(sample["K"], width)
    return sample


def _check_hw(hw: tuple[int, int] | None, name: str) -> tuple[int, int] | None:
    """hw as a pair of positive ints (None passes through), or ValueError naming the argument."""
    if hw is None:
        return None
    if len(hw) != 2 or any(int(v) != v or v < 1 for v in hw):
        raise ValueError(f"{name} must be (height, width) in whole pixels >= 1, got {hw}")
    return int(hw[0]), int(hw[1])


def _window(scaled: int, size: int, crop: str) -> int:
    """Offset of a `size` window along an axis of length `scaled`: random or centred where the image is larger,
    centred (negative: padding, the extra pixel after) where it is smaller, as ATRC's PadImage."""
    if scaled < size:
        return -((size - scaled) // 2)
    if crop == "center":
        return (scaled - size) // 2
    return int(torch.randint(0, scaled - size + 1, ()).item())


class TrainTransform:
    """Resize (to resize_to if given), random scale, crop (padding if needed), horizontal flip and colour
    jitter for training samples.

    fit="resize" (default): the image is resized to resize_to (or size) times the random scale, then a window
    of size is cropped (randomly placed, padding if smaller). fit="pad" (PASCAL-Context, ATRC / InvPT): the
    image keeps its own size times the random scale (no aspect change), then a window of size is cropped
    where it is larger and the image is padded, centred, where it is smaller (labels with their ignore value).
    scale_choices: draw the scale from these values (MTI-Net's NYUDv2 {1, 1.2, 1.5}) instead of scale_range.
    crop="center": the window sits in the middle (MTI-Net's zoom about the image centre).
    """

    def __init__(
        self,
        size: tuple[int, int],
        scale_range: tuple[float, float] = (1.0, 1.0),
        hflip: bool = True,
        color_jitter: float = 0.0,
        resize_to: tuple[int, int] | None = None,
        scale_choices: tuple[float, ...] = (),
        fit: str = "resize",
        crop: str = "random",
    ) -> None:
        """size (h, w) in pixels of the output; scale_range of the random zoom, relative to resize_to (h, w)
        when given, else to size (fit="resize") or to the image (fit="pad"); jitter strength in [0, 1]."""
        if scale_range[0] <= 0 or scale_range[1] < scale_range[0]:
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range}")
        if any(s <= 0 for s in scale_choices):
            raise ValueError(f"scale_choices must be > 0, got {scale_choices}")
        if fit not in FITS or crop not in CROPS:
            raise ValueError(f"fit must be one of {FITS} and crop one of {CROPS}, got {fit!r}, {crop!r}")
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
        self.size = _check_hw(size, "size")
        self.resize_to = _check_hw(resize_to, "resize_to")
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.scale_choices = tuple(float(s) for s in scale_choices)
        self.fit = fit
        self.crop = crop
        self.hflip = hflip
        self.color_jitter = float(color_jitter)
        self._jitter: A.Compose | None = None
        if color_jitter > 0:
            # Hue is additive (in turns, at most 0.5), so it takes half the strength, as in Monodepth2's
            # (0.2, 0.2, 0.2, 0.1); brightness, contrast and saturation are factors in [1-s, 1+s].
            cj = self.color_jitter
            self._jitter = A.Compose([A.ColorJitter(cj, cj, cj, min(cj / 2, 0.5), p=1.0)])

    def __call__(self, sample: Sample) -> Sample:
        """The transformed copy of `sample`; keys other than the maps, K and frames pass through."""
        out = _copy(sample)
        h, w = self.size
        if self.fit == "pad":
            base_h, base_w = out["image"].shape[-2:]
        else:
            base_h, base_w = self.resize_to or self.size
        if self.scale_choices:
            s = self.scale_choices[int(torch.randint(0, len(self.scale_choices), ()).item())]
        else:
            lo, hi = self.scale_range
            s = lo + (hi - lo) * torch.rand(()).item()
        # Resizing to resize_to and then zooming by s is one resize to the product: a single interpolation,
        # and K follows the same (src -> scaled) map.
        scaled = (max(1, round(base_h * s)), max(1, round(base_w * s)))
        out = _resize(out, scaled)

        if self.fit == "pad" or self.crop == "center":
            top, left = _window(scaled[0], h, self.crop), _window(scaled[1], w, self.crop)
        else:
            # Offsets range over every window that overlaps the scaled image; negative ones pad it when smaller.
            top = int(torch.randint(min(0, scaled[0] - h), max(0, scaled[0] - h) + 1, ()).item())
            left = int(torch.randint(min(0, scaled[1] - w), max(0, scaled[1] - w) + 1, ()).item())
        out = _crop(out, top, left, self.size)

        if self.hflip and torch.rand(()).item() < 0.5:
            out = _hflip(out)
        if self._jitter is not None:
            out = self._color_jitter(out)
        return out

    def _color_jitter(self, sample: Sample) -> Sample:
        """Jitter the image and every frame with one set of parameters (photometric consistency). A video sample
        keeps its frames as they were under "unjittered" ({"image", "frames"}): as in Monodepth2, the networks
        see the jittered frames and the photometric loss compares the originals."""
        assert self._jitter is not None
        frames = sample.get("frames", {})
        if frames:
            sample["unjittered"] = {"image": sample["image"], "frames": dict(frames)}
        names = {"image": None, **{f"frame_{i}": k for i, k in enumerate(frames)}}
        new_targets = {n: "image" for n in names if n != "image" and n not in self._jitter.additional_targets}
        if new_targets:
            self._jitter.add_targets(new_targets)
        # Copies: albumentations gets contiguous HWC arrays and can never write into the caller's tensors.
        arrays = {
            n: (sample["image"] if k is None else frames[k]).permute(1, 2, 0).numpy().copy()
            for n, k in names.items()
        }
        # albumentations keeps its own RNG: reseed it from torch's, so one torch seed fixes everything.
        self._jitter.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        result = self._jitter(**arrays)

        def back(a: Any) -> torch.Tensor:
            return torch.from_numpy(a).permute(2, 0, 1).clamp(0.0, 1.0).contiguous()

        sample["image"] = back(result["image"])
        if frames:
            sample["frames"] = {k: back(result[n]) for n, k in names.items() if k is not None}
        return sample


class EvalTransform:
    """Deterministic resize for evaluation; labels optionally stay at their native resolution.

    With resize_to the whole image is evaluated at resize_to, the scale it was trained at, and not cropped
    to size (as the DenseMTL code validates: resize, no crop): no part of the image is left out and no
    aspect ratio changes. Without it, images are resized to size as before.
    """

    def __init__(
        self,
        size: tuple[int, int] | None,
        keep_label_resolution: bool = False,
        resize_to: tuple[int, int] | None = None,
        fit: str = "resize",
    ) -> None:
        """size (h, w) in pixels of the network input (None: keep); keep_label_resolution: labels not resized;
        resize_to (h, w): the network input size instead of size (the training transform's resize_to);
        fit="pad": no resize, the image is padded (centred) to size, as ATRC evaluates PASCAL-Context at
        512x512 (its images are at most 500 px a side); an image larger than size is first shrunk to fit it."""
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        self.size = _check_hw(resize_to, "resize_to") or (None if size is None else _check_hw(size, "size"))
        self.keep_label_resolution = keep_label_resolution
        self.fit = fit

    def __call__(self, sample: Sample) -> Sample:
        """The resized (or padded) copy of `sample`. K always describes the image (network input) grid."""
        out = _copy(sample)
        if self.size is None:
            return out
        if self.fit == "pad":
            H, W = out["image"].shape[-2:]
            h, w = self.size
            if H > h or W > w:
                # Only when size is below the dataset's largest image (never at PASCAL-Context's 512): shrink it,
                # aspect kept, so that every sample of a batch has the same size.
                f = min(h / H, w / W)
                out = _resize(out, (max(1, round(H * f)), max(1, round(W * f))))
                H, W = out["image"].shape[-2:]
            return _crop(out, -((h - H) // 2), -((w - W) // 2), (h, w))
        # With keep_label_resolution the evaluator upsamples predictions to the label size; geometry at label
        # resolution then needs resize_intrinsics(K, image_hw, label_hw).
        return _resize(out, self.size, labels=not self.keep_label_resolution)
