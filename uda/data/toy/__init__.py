"""Built-in toy data: a procedural 3-D street-scene ray caster writing SYNTHIA, Cityscapes and VKITTI2 on disk.

Every labelled frame is a ray-cast view of a street built from primitives (ground plane split into road,
grass verge, sidewalk and terrain; axis-aligned boxes, vertical elliptic cylinders, axis-aligned
ellipsoids). One ray per pixel, nearest hit wins, so class, depth and normals are exact; only the image
gets the camera's effects (tone curve; for the Cityscapes-like target also blur, vignetting and noise).
Modules: scene (tables, looks, street generation, camera paths), render (ray casting, shading, camera
effects, render_frame), write (the on-disk formats, make_toy_data).

    make_toy_data("datasets/toy")                   # 240 frames per domain, 256x512 target
    f = render_frame("cityscapes", 7, offset=-1)    # the exact render of one (neighbouring) frame

Conventions (all lengths in metres):

- World frame: X right, Y down, Z along the street; the ground is the plane Y = 0, so heights are -Y.
- Camera frame: x right, y down, z forward; ``pose`` is camera-to-world; pixel (u, v) = column, row with
  pixel centres on integers, ray = K^-1 [u, v, 1].
- ``depth`` is the z of the hit in the camera frame; sky (no hit) is ``SKY_DEPTH`` = 655.35 m, the largest
  value the 16-bit centimetre PNGs of SYNTHIA and VKITTI2 hold, so those files round-trip exactly. Nothing
  is nearer than ``NEAR``. Cityscapes disparity marks sky, far (> ``CS_MAX_DEPTH``) and unmatched pixels 0.
- ``normals`` are unit vectors in the camera frame facing the camera; sky normals are 0 (unknown).
- ``K`` is the real dataset's intrinsics scaled by (w / W_real, h / H_real) to the written size.
- ``image`` is exactly what a reader decodes; for VKITTI2's JPEGs that is OpenCV's decoding.

Sizes: Cityscapes is written at the target (height, width); SYNTHIA keeps its 1280x760 aspect at the same
height, (H, 2*round(H*640/760)); VKITTI2 keeps its 1242x375 aspect at the same width,
(2*round(W*375/2484), W). At the default 256x512 that is 256x432 and 154x512.

Streets: Cityscapes and SYNTHIA get a new street per labelled frame (SYNTHIA views are random, Cityscapes
ones drive along the ego lane); VKITTI2 drives along one street per scene of ``VK_FRAMES_PER_SCENE`` frames.
The world is static; only the Cityscapes ego-vehicle bonnet moves with the camera, as in the real data.
"""

from uda.data.toy.render import render_frame
from uda.data.toy.scene import (
    CITYSCAPES_IDS,
    CLASS_NAMES,
    DOMAINS,
    SKY_DEPTH,
    SYNTHIA_IDS,
    VK_FRAMES_PER_SCENE,
    VKITTI2_CATEGORIES,
    VKITTI2_IDS,
    domain_size,
    intrinsics,
)
from uda.data.toy.write import (
    TOY_DATASETS,
    cityscapes_disparity,
    cityscapes_name,
    make_toy_data,
    nyudv2_size,
    vkitti2_name,
)

__all__ = [
    "CITYSCAPES_IDS",
    "CLASS_NAMES",
    "DOMAINS",
    "SKY_DEPTH",
    "SYNTHIA_IDS",
    "TOY_DATASETS",
    "VKITTI2_CATEGORIES",
    "VKITTI2_IDS",
    "VK_FRAMES_PER_SCENE",
    "cityscapes_disparity",
    "cityscapes_name",
    "domain_size",
    "intrinsics",
    "make_toy_data",
    "nyudv2_size",
    "render_frame",
    "vkitti2_name",
]
