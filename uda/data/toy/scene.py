"""Toy street scenes: constants, label tables, domain looks and layouts, street generation, camera paths."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

VERSION = 1
DOMAINS = ("synthia", "cityscapes", "vkitti2")
SKY_DEPTH = 655.35  # metres: 65535 cm, the 16-bit PNG maximum of SYNTHIA and VKITTI2
NEAR = 0.05  # metres: the nearest hit a ray accepts
CS_BASELINE = 0.209313  # metres, the Cityscapes stereo baseline
CS_MAX_DEPTH = 200.0  # metres: farther Cityscapes disparities are written invalid, like SGM's range
CS_MIN_DISPARITY = 0.25  # pixels: smaller disparities cannot be quantised to 1 % in /256 steps
CS_TRAIN_CITIES = ("aachen", "bochum", "bremen")
CS_VAL_CITY = "frankfurt"
CS_LABELLED_FRAME = 19  # the annotated frame of each 30-frame Cityscapes snippet
VK_FRAMES_PER_SCENE = 120
VK_BASELINE = 0.532725  # metres, between VKITTI2 Camera_0 and Camera_1
JPEG_QUALITY = 92

# Internal classes; each domain maps them to its own ids below.
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TREE, TERRAIN, SKY = range(12)
PERSON, RIDER, CAR, VAN, TRUCK, BUS, MOTORCYCLE, BICYCLE, MISC, EGO = range(12, 22)
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "tree", "terrain", "sky", "person", "rider", "car", "van", "truck", "bus", "motorcycle", "bicycle", "misc",
    "ego vehicle",
)  # fmt: skip

# Dataset ids per internal class, in the order of CLASS_NAMES.
SYNTHIA_IDS = np.array([3, 4, 2, 21, 5, 7, 15, 9, 6, 6, 16, 1, 10, 17, 8, 8, 18, 19, 12, 11, 0, 0])
CITYSCAPES_IDS = np.array(
    [7, 8, 11, 12, 13, 17, 19, 20, 21, 21, 22, 23, 24, 25, 26, 26, 27, 28, 32, 33, 4, 1]
)
# VKITTI2 has no sidewalk, wall or people: sidewalk is Road, wall Building, people and bikes Misc, bus Truck.
VKITTI2_IDS = np.array([5, 5, 4, 4, 6, 9, 8, 7, 3, 2, 0, 1, 10, 10, 12, 13, 11, 11, 10, 10, 10, 10])
VKITTI2_CATEGORIES = (
    ("Terrain", (210, 0, 200)), ("Sky", (90, 200, 255)), ("Tree", (0, 199, 0)), ("Vegetation", (90, 240, 0)),
    ("Building", (140, 140, 140)), ("Road", (100, 60, 100)), ("GuardRail", (250, 100, 255)),
    ("TrafficSign", (255, 255, 0)), ("TrafficLight", (200, 200, 0)), ("Pole", (255, 130, 0)),
    ("Misc", (80, 80, 80)), ("Truck", (160, 60, 60)), ("Car", (255, 127, 80)), ("Van", (0, 139, 139)),
)  # fmt: skip
LABEL_IDS = {"synthia": SYNTHIA_IDS, "cityscapes": CITYSCAPES_IDS, "vkitti2": VKITTI2_IDS}

# Real intrinsics (fx, fy, cx, cy) at the real sizes (width, height); scaled to the written size.
REAL_INTRINSICS = {
    "synthia": ((532.740352, 532.740352, 640.0, 380.0), (1280, 760)),
    "cityscapes": ((2262.52, 2265.3017905988554, 1096.98, 513.137), (2048, 1024)),
    "vkitti2": ((725.0087, 725.0087, 620.5, 187.0), (1242, 375)),
}

# Primitive kinds and materials.
BOX, CYLINDER, ELLIPSOID = 0, 1, 2
(M_PLAIN, M_ROAD, M_SIDEWALK, M_TERRAIN, M_FACADE, M_BRICK, M_FENCE, M_SIGN, M_LIGHT, M_FOLIAGE, M_PERSON,
 M_CAR, M_CABIN, M_BUS, M_SKY, M_EGO) = range(16)  # fmt: skip


@dataclass(frozen=True)
class Style:
    """Look of a domain: albedos (linear RGB in [0, 1]), light and haze."""

    sky_horizon: tuple
    sky_zenith: tuple
    clouds: float  # cloud cover in [0, 1]
    sun_dir: tuple  # world direction towards the sun (Y down)
    sun: float
    sun_col: tuple
    ambient: float
    ambient_col: tuple
    fog: float  # metres: haze distance
    road: tuple
    marking: tuple
    sidewalk: tuple
    terrain: tuple
    foliage: tuple
    bark: tuple
    wall: tuple
    fence: tuple
    metal: tuple
    buildings: tuple
    glass: tuple
    cars: tuple
    buses: tuple
    signs: tuple
    cloth: tuple


@dataclass(frozen=True)
class Layout:
    """Camera and street layout of a domain: sizes in metres, rates as probabilities."""

    cam_height: tuple  # (min, max)
    pitch: tuple  # radians, positive looks down
    yaw: float  # radians of random yaw (SYNTHIA's random views)
    step: tuple  # metres the camera moves per video frame
    p_two_lanes: float
    p_parking: float
    sidewalk_w: tuple
    p_building: float
    building_len: tuple
    building_h: tuple
    p_brick: float
    gap_len: tuple
    gap_fill: tuple  # weights of (nothing, wall, fence, hedge)
    p_terrain: float
    furniture: tuple  # weights of (nothing, lamp, tree, sign, light, misc)
    person_gap: tuple  # metres between pedestrian groups along a sidewalk
    p_parked: float
    traffic_gap: tuple
    traffic: tuple  # weights of (car, van, bus, truck, motorcycle, bicycle)
    p_guardrail: float
    p_verge: float  # probability of a grass verge between curb and sidewalk
    verge_w: tuple


# fmt: off
STYLES = {
    "synthia": Style(  # clean CG under a high sun: saturated, bright, no haze
        sky_horizon=(0.78, 0.87, 0.97), sky_zenith=(0.25, 0.47, 0.88), clouds=0.25,
        sun_dir=(-0.45, -0.85, -0.3), sun=0.75, sun_col=(1.0, 0.97, 0.9), ambient=0.5,
        ambient_col=(0.85, 0.9, 1.0), fog=2500.0,
        road=(0.27, 0.27, 0.29), marking=(0.95, 0.95, 0.92), sidewalk=(0.66, 0.6, 0.52),
        terrain=(0.36, 0.58, 0.2), foliage=(0.18, 0.52, 0.12), bark=(0.38, 0.26, 0.15),
        wall=(0.74, 0.7, 0.62), fence=(0.5, 0.36, 0.22), metal=(0.55, 0.55, 0.58),
        buildings=((0.88, 0.76, 0.58), (0.78, 0.44, 0.33), (0.6, 0.66, 0.78), (0.92, 0.9, 0.82),
                   (0.58, 0.34, 0.28), (0.84, 0.72, 0.42), (0.7, 0.8, 0.7)),
        glass=(0.12, 0.2, 0.32),
        cars=((0.85, 0.08, 0.08), (0.1, 0.22, 0.75), (0.95, 0.85, 0.1), (0.95, 0.95, 0.95),
              (0.08, 0.08, 0.08), (0.2, 0.62, 0.3), (0.95, 0.45, 0.1)),
        buses=((0.95, 0.82, 0.1), (0.85, 0.2, 0.15), (0.2, 0.42, 0.85)),
        signs=((0.1, 0.3, 0.85), (0.85, 0.1, 0.1), (0.95, 0.82, 0.1)),
        cloth=((0.8, 0.1, 0.1), (0.1, 0.3, 0.8), (0.95, 0.9, 0.2), (0.1, 0.6, 0.2), (0.9, 0.9, 0.9),
               (0.6, 0.2, 0.7)),
    ),
    "cityscapes": Style(  # overcast German city: grey, desaturated, hazy
        sky_horizon=(0.84, 0.86, 0.87), sky_zenith=(0.64, 0.71, 0.8), clouds=0.65,
        sun_dir=(0.3, -0.9, 0.4), sun=0.35, sun_col=(1.0, 1.0, 0.97), ambient=0.78,
        ambient_col=(0.95, 0.97, 1.0), fog=380.0,
        road=(0.33, 0.33, 0.34), marking=(0.82, 0.82, 0.8), sidewalk=(0.5, 0.48, 0.46),
        terrain=(0.34, 0.4, 0.2), foliage=(0.2, 0.3, 0.12), bark=(0.3, 0.26, 0.22),
        wall=(0.6, 0.58, 0.55), fence=(0.35, 0.36, 0.34), metal=(0.42, 0.43, 0.45),
        buildings=((0.72, 0.69, 0.63), (0.6, 0.55, 0.5), (0.8, 0.77, 0.72), (0.5, 0.45, 0.4),
                   (0.64, 0.62, 0.6), (0.56, 0.42, 0.36)),
        glass=(0.16, 0.19, 0.22),
        cars=((0.56, 0.57, 0.59), (0.14, 0.14, 0.16), (0.86, 0.86, 0.87), (0.2, 0.25, 0.4),
              (0.36, 0.36, 0.38), (0.5, 0.15, 0.12), (0.1, 0.1, 0.1)),
        buses=((0.9, 0.88, 0.8), (0.85, 0.85, 0.85), (0.75, 0.15, 0.12)),
        signs=((0.12, 0.3, 0.65), (0.7, 0.12, 0.1), (0.9, 0.75, 0.15)),
        cloth=((0.15, 0.15, 0.18), (0.3, 0.3, 0.35), (0.45, 0.35, 0.25), (0.2, 0.25, 0.4),
               (0.6, 0.6, 0.6), (0.5, 0.15, 0.15)),
    ),
    "vkitti2": Style(  # rural road in a warm, low afternoon sun
        sky_horizon=(0.9, 0.82, 0.7), sky_zenith=(0.22, 0.42, 0.8), clouds=0.2,
        sun_dir=(-0.75, -0.45, 0.35), sun=0.9, sun_col=(1.0, 0.84, 0.64), ambient=0.38,
        ambient_col=(0.75, 0.82, 1.0), fog=700.0,
        road=(0.3, 0.29, 0.28), marking=(0.92, 0.92, 0.88), sidewalk=(0.46, 0.44, 0.4),
        terrain=(0.46, 0.5, 0.24), foliage=(0.22, 0.42, 0.1), bark=(0.3, 0.22, 0.14),
        wall=(0.66, 0.62, 0.56), fence=(0.72, 0.72, 0.74), metal=(0.6, 0.6, 0.62),
        buildings=((0.76, 0.7, 0.62), (0.66, 0.5, 0.4), (0.86, 0.82, 0.75), (0.6, 0.6, 0.58)),
        glass=(0.14, 0.18, 0.24),
        cars=((0.7, 0.1, 0.1), (0.2, 0.3, 0.6), (0.85, 0.85, 0.85), (0.1, 0.1, 0.1), (0.55, 0.55, 0.5),
              (0.3, 0.45, 0.3)),
        buses=((0.85, 0.85, 0.8), (0.6, 0.2, 0.15)),
        signs=((0.1, 0.3, 0.8), (0.8, 0.1, 0.1), (0.95, 0.8, 0.1)),
        cloth=((0.3, 0.3, 0.3), (0.5, 0.4, 0.3)),
    ),
}

LAYOUTS = {
    "synthia": Layout(  # random views, high cameras, many people and two-wheelers
        cam_height=(1.6, 2.5), pitch=(0.0, 0.14), yaw=0.35, step=(0.5, 0.5), p_two_lanes=0.6,
        p_parking=0.4, sidewalk_w=(2.5, 5.0), p_building=0.8, building_len=(8, 22), building_h=(6, 34),
        p_brick=0.4, gap_len=(3, 10), gap_fill=(1, 3, 3, 1), p_terrain=0.3, furniture=(2, 2, 2, 2, 1.5, 1),
        person_gap=(2, 9), p_parked=0.5, traffic_gap=(8, 30), traffic=(5, 1, 1.2, 0.5, 1.2, 1.2),
        p_guardrail=0.0, p_verge=0.2, verge_w=(0.8, 2.0),
    ),
    "cityscapes": Layout(  # a car-mounted camera at 1.22 m, parked cars, trees
        cam_height=(1.18, 1.26), pitch=(0.03, 0.046), yaw=0.0, step=(0.35, 0.65), p_two_lanes=0.5,
        p_parking=0.6, sidewalk_w=(2.5, 4.5), p_building=0.7, building_len=(10, 26), building_h=(9, 22),
        p_brick=0.15, gap_len=(4, 14), gap_fill=(1, 3, 3, 2), p_terrain=0.45, furniture=(3, 2, 3, 1.5, 1, 1),
        person_gap=(4, 16), p_parked=0.5, traffic_gap=(10, 35), traffic=(8, 1.5, 0.3, 0.2, 0.6, 1.0),
        p_guardrail=0.0, p_verge=0.35, verge_w=(0.8, 2.0),
    ),
    "vkitti2": Layout(  # countryside: few buildings, much terrain and trees, guard rails, no people
        cam_height=(1.6, 1.7), pitch=(0.0, 0.02), yaw=0.0, step=(0.6, 1.0), p_two_lanes=0.3,
        p_parking=0.2, sidewalk_w=(1.0, 2.5), p_building=0.2, building_len=(8, 18), building_h=(5, 12),
        p_brick=0.2, gap_len=(6, 20), gap_fill=(3, 1, 2, 4), p_terrain=0.85, furniture=(3, 1, 4, 1.5, 0.7, 0.5),
        person_gap=(1e9, 1e9), p_parked=0.5, traffic_gap=(10, 40), traffic=(6, 2.5, 0, 1.2, 0, 0),
        p_guardrail=0.6, p_verge=0.6, verge_w=(1.0, 3.0),
    ),
}
# fmt: on


# ----------------------------------------------------------------------------------------------- helpers


def rng_for(seed: int, domain: str, *keys: int) -> np.random.Generator:
    """Deterministic generator for (seed, domain, keys): independent of call order and process."""
    return np.random.default_rng([seed, DOMAINS.index(domain), *keys])


def domain_size(domain: str, height: int, width: int) -> tuple[int, int]:
    """(height, width) in pixels of a domain's images for a Cityscapes target size of (height, width)."""
    check_domain(domain)
    if domain == "synthia":
        return height, 2 * round(height * 640 / 760)
    if domain == "vkitti2":
        return 2 * round(width * 375 / 2484), width
    return height, width


def intrinsics(domain: str, h: int, w: int) -> np.ndarray:
    """Pixel intrinsics K [3,3] of a domain's images of size (h, w): the real K scaled to that size.

    The principal point scales as cx * w / real_w (toy data version 1, kept so that the README's toy tables
    reproduce). Cityscapes and VKITTI2 write this K to their camera files, read back as written; SYNTHIA stores
    none, and its reader derives K from the image size with the pixel-centre rule of resizing
    ((cx + 0.5) s - 0.5, right for a downscaled copy of the real data): on the toy SYNTHIA frames the reader's
    principal point is up to half a pixel from the rendered one (normals labels from depth tilt by < 0.5 deg).
    """
    (fx, fy, cx, cy), (rw, rh) = REAL_INTRINSICS[domain]
    sx, sy = w / rw, h / rh
    return np.array([[fx * sx, 0, cx * sx], [0, fy * sy, cy * sy], [0, 0, 1]], dtype=np.float32)


def check_domain(domain: str) -> None:
    """Raises a ValueError naming the valid domains for an unknown one."""
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r}: unknown toy domain; use one of {', '.join(DOMAINS)}")


def check_size(height: int, width: int) -> None:
    """Raises a ValueError for a target size (pixels) too small to show a street."""
    if height < 32 or width < 64:
        raise ValueError(f"height={height}, width={width}: the toy target size must be at least 32x64 pixels")


# --------------------------------------------------------------------------------------------- the world


class _Builder:
    """Collects primitives. Ranges are (min, max) tuples in metres; heights are positive up (-Y)."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.n_inst = 0

    def new_instance(self) -> int:
        """A fresh object id for the primitives of one thing (car, person, ...)."""
        self.n_inst += 1
        return self.n_inst

    def _add(self, kind, lo, hi, cls, mat, col, col2, par, inst) -> None:
        self.rows.append((kind, lo, hi, cls, mat, col, col2, par, inst))

    def box(self, cls, mat, col, x, h, z, col2=(0, 0, 0), par=(0, 0, 0, 0), inst=0) -> None:
        """Axis-aligned box over lateral range x, height range h and range z along the street."""
        lo = (min(x), -max(h), min(z))
        hi = (max(x), -min(h), max(z))
        self._add(BOX, lo, hi, cls, mat, col, col2, par, inst)

    def cyl(self, cls, mat, col, centre, radii, h, col2=(0, 0, 0), par=(0, 0, 0, 0), inst=0) -> None:
        """Vertical elliptic cylinder at centre (x, z) with radii (rx, rz) over height range h."""
        (x, z), (rx, rz) = centre, radii
        self._add(CYLINDER, (x - rx, -h[1], z - rz), (x + rx, -h[0], z + rz), cls, mat, col, col2, par, inst)

    def ell(self, cls, mat, col, centre, radii, col2=(0, 0, 0), par=(0, 0, 0, 0), inst=0) -> None:
        """Axis-aligned ellipsoid at centre (x, height, z) with radii (rx, ry, rz)."""
        (x, hc, z), (rx, ry, rz) = centre, radii
        lo, hi = (x - rx, -hc - ry, z - rz), (x + rx, -hc + ry, z + rz)
        self._add(ELLIPSOID, lo, hi, cls, mat, col, col2, par, inst)


@dataclass
class Street:
    """A static street: primitive arrays plus the ground layout (lateral strips and per-side zones)."""

    kind: np.ndarray  # [N] int
    lo: np.ndarray  # [N,3] float32 world AABB min
    hi: np.ndarray  # [N,3] float32 world AABB max
    cls: np.ndarray  # [N] internal class
    mat: np.ndarray  # [N] material
    col: np.ndarray  # [N,3] albedo
    col2: np.ndarray  # [N,3] second albedo
    par: np.ndarray  # [N,4] material parameters
    inst: np.ndarray  # [N] instance id, 0 for stuff
    lanes: int  # per direction
    lane_w: float
    parking: bool  # a parking strip along each curb
    road_half: float  # |x| of the curb
    verge: float  # width of the grass verge between curb and sidewalk (0 = none)
    sidewalk_w: float
    zone_z: np.ndarray  # [2, M] sorted zone starts along Z, for sides -1 (row 0) and +1 (row 1)
    zone_cls: np.ndarray  # [2, M] ground class beyond the sidewalk in each zone
    ego_x: float  # lateral centre of the ego lane, which no object ever enters
    sway: tuple  # (amplitude m, wavelength m, phase rad) of the camera path around ego_x
    length: float  # z of the row of buildings (or trees) that closes the street


def _pick(rng: np.random.Generator, weights: Sequence[float]) -> int:
    w = np.asarray(weights, dtype=float)
    return int(rng.choice(len(w), p=w / w.sum()))


def _jitter(rng: np.random.Generator, col: Sequence[float], amount: float = 0.06) -> tuple:
    return tuple(np.clip(np.asarray(col) * (1 + rng.uniform(-amount, amount, 3)), 0, 1))


def _colour(rng: np.random.Generator, palette: Sequence[tuple], amount: float = 0.06) -> tuple:
    return _jitter(rng, palette[int(rng.integers(len(palette)))], amount)


_SKIN = (0.85, 0.68, 0.55)
_DARK = (0.08, 0.08, 0.08)


def _vehicle(b: _Builder, rng, st: Style, kind: int, x: float, z: float) -> float:
    """Adds a vehicle (kind indexes Layout.traffic) centred on lateral x from z on; returns its length (m)."""
    inst = b.new_instance()
    if kind in (0, 1):  # car or van: a body box and a narrower cabin box
        van = kind == 1
        length, half = (
            (rng.uniform(4.6, 5.4), 1.0) if van else (rng.uniform(3.9, 4.7), rng.uniform(0.85, 0.95))
        )
        body, top = (1.0, rng.uniform(2.0, 2.3)) if van else (rng.uniform(0.85, 1.0), rng.uniform(1.4, 1.55))
        cabin = (z + 0.15 * length, z + 0.8 * length) if van else (z + 0.22 * length, z + 0.72 * length)
        col, cls = _colour(rng, st.cars), VAN if van else CAR
        b.box(cls, M_CAR, col, (x - half, x + half), (0, body), (z, z + length), inst=inst)
        b.box(cls, M_CABIN, st.glass, (x - half + 0.08, x + half - 0.08), (body, top), cabin, col, inst=inst)
        return length
    if kind == 2:  # bus: one tall box with a window band
        length = rng.uniform(11, 13)
        b.box(
            BUS,
            M_BUS,
            _colour(rng, st.buses),
            (x - 1.27, x + 1.27),
            (0, 3.1),
            (z, z + length),
            st.glass,
            inst=inst,
        )
        return length
    if kind == 3:  # truck: cargo box and cab
        cargo = _jitter(rng, (0.8, 0.8, 0.78), 0.15)
        b.box(TRUCK, M_PLAIN, cargo, (x - 1.25, x + 1.25), (0.3, 3.6), (z, z + 6.4), inst=inst)
        b.box(
            TRUCK,
            M_CABIN,
            st.glass,
            (x - 1.2, x + 1.2),
            (0, 2.9),
            (z + 6.5, z + 8.7),
            _colour(rng, st.cars),
            inst=inst,
        )
        return 8.7
    # a two-wheeler (a box, plus a handlebar for bicycles) with its rider (body cylinder and head)
    motor = kind == 4
    length, cls, col = (2.0 if motor else 1.7), (MOTORCYCLE if motor else BICYCLE), _colour(rng, st.cars)
    if motor:
        b.box(cls, M_PLAIN, col, (x - 0.25, x + 0.25), (0, 1.05), (z, z + length), inst=inst)
    else:
        b.box(cls, M_PLAIN, col, (x - 0.06, x + 0.06), (0, 0.95), (z, z + length), inst=inst)
        b.box(cls, M_PLAIN, st.metal, (x - 0.3, x + 0.3), (0.9, 1.0), (z + 1.45, z + 1.55), inst=inst)
    rider = b.new_instance()
    zc = z + length * 0.45
    shirt, legs = _colour(rng, st.cloth, 0.1), _colour(rng, st.cloth, 0.1)
    seat = 0.75 if motor else 0.85
    b.cyl(RIDER, M_PERSON, shirt, (x, zc), (0.22, 0.18), (seat, 1.5), legs, par=(1.0, 0, 0, 0), inst=rider)
    head = (0.2, 0.2, 0.22) if motor else _jitter(rng, _SKIN, 0.15)  # helmet or face
    b.ell(RIDER, M_PLAIN, head, (x, 1.64, zc + 0.05), (0.13, 0.14, 0.13), inst=rider)
    return length


def _person(b: _Builder, rng, st: Style, x: float, z: float) -> None:
    """A pedestrian: body cylinder (shirt above the legs) and head."""
    inst = b.new_instance()
    height = rng.uniform(1.42, 1.65)
    shirt, legs = _colour(rng, st.cloth, 0.1), _colour(rng, st.cloth, 0.1)
    radii = (rng.uniform(0.2, 0.25), 0.16)
    b.cyl(PERSON, M_PERSON, shirt, (x, z), radii, (0, height), legs, par=(0.85, 0, 0, 0), inst=inst)
    b.ell(PERSON, M_PLAIN, _jitter(rng, _SKIN, 0.2), (x, height + 0.12, z), (0.11, 0.13, 0.11), inst=inst)


def _tree(b: _Builder, rng, st: Style, x: float, z: float, big: float = 1.0) -> None:
    """A tree: trunk cylinder and an ellipsoid crown."""
    trunk = rng.uniform(3.2, 5.0)
    r = rng.uniform(1.4, 2.8) * big
    ry = r * rng.uniform(0.9, 1.3)
    b.cyl(TREE, M_PLAIN, _jitter(rng, st.bark), (x, z), (0.2 * big, 0.2 * big), (0, trunk + ry * 0.5))
    # the crown's bottom (trunk - 0.1 ry >= 2.85 m) stays above every camera (<= 2.5 m), so no camera is inside
    leaves = _jitter(rng, st.foliage, 0.15)
    b.ell(TREE, M_FOLIAGE, leaves, (x, trunk + 0.9 * ry, z), (r, ry, r), par=(rng.random() * 50,) * 4)


def _furniture(b: _Builder, rng, st: Style, kind: int, x: float, s: int, z: float) -> None:
    """Street furniture (kind indexes Layout.furniture) at lateral x on side s (-1 left, +1 right)."""
    if kind == 1:  # street lamp: pole, arm over the road, lamp head
        h = rng.uniform(6.5, 8.5)
        xa = x - s * 1.6
        b.cyl(POLE, M_PLAIN, st.metal, (x, z), (0.09, 0.09), (0, h))
        b.box(POLE, M_PLAIN, st.metal, (x, xa), (h - 0.12, h), (z - 0.05, z + 0.05))
        b.box(POLE, M_PLAIN, st.metal, (xa - 0.25, xa + 0.25), (h - 0.3, h - 0.12), (z - 0.15, z + 0.15))
    elif kind == 2:
        _tree(b, rng, st, x, z)
    elif kind == 3:  # traffic sign: thin pole and one or two plates facing the traffic (-Z)
        h = rng.uniform(2.4, 3.0)
        b.cyl(POLE, M_PLAIN, st.metal, (x, z), (0.04, 0.04), (0, h))
        for k in range(1 + int(rng.random() < 0.3)):
            size = rng.uniform(0.55, 0.8)
            top = h - k * (size + 0.1)
            shape = float(rng.integers(2))  # 0 square, 1 round with a symbol
            plate = _colour(rng, st.signs, 0.1)
            x_span, h_span = (x - size / 2, x + size / 2), (top - size, top)
            b.box(SIGN, M_SIGN, plate, x_span, h_span, (z - 0.07, z - 0.04), st.metal, (shape, 0, 0, 0))
    elif (
        kind == 4
    ):  # traffic light: pole with a housing; half of them also an arm over the road with one more
        lit = (float(rng.integers(3)), 0, 0, 0)
        b.cyl(POLE, M_PLAIN, st.metal, (x, z), (0.07, 0.07), (0, 3.4))
        b.box(LIGHT, M_LIGHT, _DARK, (x - 0.16, x + 0.16), (2.5, 3.4), (z - 0.34, z - 0.07), par=lit)
        if rng.random() < 0.5:
            xa = x - s * rng.uniform(3.0, 5.0)
            b.cyl(POLE, M_PLAIN, st.metal, (x, z + 0.3), (0.1, 0.1), (0, 5.8))
            b.box(POLE, M_PLAIN, st.metal, (x, xa), (5.65, 5.8), (z + 0.25, z + 0.35))
            b.box(LIGHT, M_LIGHT, _DARK, (xa - 0.16, xa + 0.16), (4.75, 5.65), (z, z + 0.27), par=lit)
    elif kind == 5:  # misc: a bin or an advertising column
        if rng.random() < 0.6:
            b.box(
                MISC, M_PLAIN, _colour(rng, st.signs, 0.2), (x - 0.3, x + 0.3), (0, 1.0), (z - 0.3, z + 0.3)
            )
        else:
            b.cyl(MISC, M_PLAIN, _jitter(rng, (0.7, 0.65, 0.55), 0.2), (x + s * 0.5, z), (0.6, 0.6), (0, 2.8))


def _facade(rng) -> tuple:
    """Window grid parameters: spacing and floor height (m), window width and height (fractions)."""
    return (rng.uniform(1.8, 3.2), rng.uniform(2.8, 3.6), rng.uniform(0.35, 0.6), rng.uniform(0.4, 0.6))


def _frontage(b: _Builder, rng, st: Style, lay: Layout, s: int, front: float, z0: float, z1: float):
    """Buildings and the gaps between them (walls, fences, hedges, trees) from z0 to z1 on side s, with the
    ground front of them at |x| = front; returns the zone starts and the ground class of each zone."""
    starts, classes = [], []
    z = z0
    while z < z1:
        starts.append(z)
        if rng.random() < lay.p_building:
            length = rng.uniform(*lay.building_len)
            setback = 0.0 if rng.random() < 0.6 else rng.uniform(1.0, 5.0)
            xf = s * (front + setback)
            mat = M_BRICK if rng.random() < lay.p_brick else M_FACADE
            x_span = (xf, xf + s * rng.uniform(8, 20))
            z_span = (z, z + length - rng.uniform(0, 0.6))
            height = (0, rng.uniform(*lay.building_h))
            b.box(
                BUILDING,
                mat,
                _colour(rng, st.buildings, 0.08),
                x_span,
                height,
                z_span,
                st.glass,
                _facade(rng),
            )
            classes.append(TERRAIN if setback > 0 and rng.random() < lay.p_terrain else SIDEWALK)
        else:
            length = rng.uniform(*lay.gap_len)
            fill = _pick(rng, lay.gap_fill)
            xf, z_span = s * (front + 0.3), (z, z + length)
            if fill == 1:
                mat = M_BRICK if rng.random() < 0.3 else M_PLAIN
                b.box(
                    WALL,
                    mat,
                    _jitter(rng, st.wall, 0.1),
                    (xf, xf + s * 0.3),
                    (0, rng.uniform(1.2, 2.8)),
                    z_span,
                )
            elif fill == 2:
                bars = (rng.uniform(0.1, 0.25), 0, 0, 0)
                col, back = _jitter(rng, st.fence, 0.1), _jitter(rng, st.terrain, 0.2)
                b.box(
                    FENCE, M_FENCE, col, (xf, xf + s * 0.06), (0, rng.uniform(1.0, 2.0)), z_span, back, bars
                )
            elif fill == 3:
                leaves, seed = _jitter(rng, st.foliage, 0.15), (rng.random() * 50,) * 4
                x_span, height = (xf, xf + s * rng.uniform(0.7, 1.2)), (0, rng.uniform(0.8, 1.8))
                b.box(VEGETATION, M_FOLIAGE, leaves, x_span, height, z_span, par=seed)
            for _ in range(int(rng.integers(0, 3))):
                _tree(b, rng, st, s * (front + rng.uniform(3, 9)), z + rng.uniform(0, length), big=1.2)
            classes.append(TERRAIN if rng.random() < lay.p_terrain + 0.3 else SIDEWALK)
        z += length
    return starts, classes


@lru_cache(maxsize=4)
def _street(domain: str, street_id: int, seed: int) -> Street:
    """The static street `street_id` of a domain: every primitive, seeded by (seed, domain, street_id)."""
    rng = rng_for(seed, domain, street_id, 0)
    st, lay = STYLES[domain], LAYOUTS[domain]
    lanes = 2 if rng.random() < lay.p_two_lanes else 1
    lane_w = rng.uniform(3.0, 3.5)
    parking = bool(rng.random() < lay.p_parking)
    road_half = lanes * lane_w + (2.2 if parking else 0.0)
    verge = rng.uniform(*lay.verge_w) if rng.random() < lay.p_verge else 0.0
    side_w = rng.uniform(*lay.sidewalk_w)
    if domain == "vkitti2":  # one street per scene, driven along for VK_FRAMES_PER_SCENE frames
        length = VK_FRAMES_PER_SCENE * lay.step[1] + rng.uniform(100, 160)
        z0 = -40.0
    else:  # one street per labelled frame, seen from near z = 0; no view reaches behind z = -10
        length = rng.uniform(110, 200)
        z0 = -10.0
    b = _Builder()
    zone_z, zone_cls = [], []
    for s in (-1, 1):
        starts, classes = _frontage(b, rng, st, lay, s, road_half + verge + side_w, z0, length + 20)
        zone_z.append(starts)
        zone_cls.append(classes)
        z = z0 + rng.uniform(0, 5)  # furniture along the curb (in the verge, if any)
        while z < length:
            _furniture(b, rng, st, _pick(rng, lay.furniture), s * (road_half + 0.45 + verge / 2), s, z)
            z += rng.uniform(4, 10)
        if rng.random() < lay.p_guardrail:
            b.box(
                FENCE,
                M_PLAIN,
                st.fence,
                (s * (road_half + 0.15), s * (road_half + 0.25)),
                (0.45, 0.8),
                (z0, length),
            )
        z = z0 + rng.uniform(
            *lay.person_gap
        )  # pedestrians, and now and then a parked bicycle, on the sidewalk
        while z < length and side_w > 1.8:
            x = s * (road_half + verge + rng.uniform(0.7, side_w - 0.4))
            if rng.random() < 0.12:
                bike = _colour(rng, st.cars)
                b.box(
                    BICYCLE,
                    M_PLAIN,
                    bike,
                    (x - 0.06, x + 0.06),
                    (0, 0.95),
                    (z, z + 1.7),
                    inst=b.new_instance(),
                )
            else:
                for _ in range(1 + int(rng.integers(0, 3))):
                    _person(b, rng, st, x + s * rng.uniform(-0.4, 0.4), z + rng.uniform(-1, 1))
            z += rng.uniform(*lay.person_gap)
        if parking:  # parked cars and vans along the curb
            z = z0 + rng.uniform(0, 6)
            while z < length:
                if rng.random() < lay.p_parked:
                    z += _vehicle(b, rng, st, _pick(rng, (8, 1)), s * (road_half - 1.1), z) + rng.uniform(
                        0.6, 3
                    )
                else:
                    z += rng.uniform(3, 10)
        for k in range(lanes):  # traffic in every lane but the ego lane (right side, k = 0)
            if s == 1 and k == 0:
                continue
            z = z0 + rng.uniform(0, 20)
            while z < length:
                kind = _pick(rng, lay.traffic)
                dx = (
                    rng.uniform(-0.3, 0.3) if kind < 4 else s * rng.uniform(0.6, 1.0)
                )  # two-wheelers ride right
                z += _vehicle(b, rng, st, kind, s * (k + 0.5) * lane_w + dx, z) + rng.uniform(
                    *lay.traffic_gap
                )
    # the street ends in a row of buildings (trees in the countryside), so no ray runs along an endless road
    end = (length, length + 20)
    if domain == "vkitti2":
        b.box(TREE, M_FOLIAGE, st.foliage, (-600, 600), (0, rng.uniform(10, 18)), end, par=(7.0,) * 4)
    else:
        facade = _colour(rng, st.buildings)
        b.box(BUILDING, M_FACADE, facade, (-600, 600), (0, rng.uniform(14, 30)), end, st.glass, _facade(rng))
    m = max(len(z) for z in zone_z)
    rows = list(zip(*b.rows))
    return Street(
        kind=np.array(rows[0]),
        lo=np.array(rows[1], dtype=np.float32),
        hi=np.array(rows[2], dtype=np.float32),
        cls=np.array(rows[3]),
        mat=np.array(rows[4]),
        col=np.array(rows[5], dtype=np.float32),
        col2=np.array(rows[6], dtype=np.float32),
        par=np.array(rows[7], dtype=np.float32),
        inst=np.array(rows[8]),
        lanes=lanes,
        lane_w=lane_w,
        parking=parking,
        road_half=road_half,
        verge=verge,
        sidewalk_w=side_w,
        zone_z=np.array([z + [np.inf] * (m - len(z)) for z in zone_z]),
        zone_cls=np.array([c + [SIDEWALK] * (m - len(c)) for c in zone_cls]),
        ego_x=0.5 * lane_w,
        sway=(rng.uniform(0.15, 0.45), rng.uniform(40, 90), rng.uniform(0, 2 * math.pi)),
        length=length,
    )


# ---------------------------------------------------------------------------------------------- the camera


def street_of(domain: str, index: int) -> tuple[int, int]:
    """(street id, video frame in that street) of labelled frame `index`."""
    if domain == "vkitti2":
        return index // VK_FRAMES_PER_SCENE, index % VK_FRAMES_PER_SCENE
    return index, 0


def camera_pose(domain: str, index: int, offset: int, seed: int, street: Street) -> np.ndarray:
    """Camera-to-world pose [4,4] float64 of labelled frame `index` moved by `offset` video frames."""
    street_id, frame = street_of(domain, index)
    lay = LAYOUTS[domain]
    rng = rng_for(seed, domain, street_id, 1)
    step = rng.uniform(*lay.step)
    height = rng.uniform(*lay.cam_height)
    pitch = rng.uniform(*lay.pitch)
    yaw0 = rng.uniform(-lay.yaw, lay.yaw)
    lateral = rng.uniform(-0.8, 0.8) if lay.yaw > 0 else 0.0  # random views wander across the ego lane
    z = (frame + offset) * step
    amp, wavelength, phase = street.sway
    k = 2 * math.pi / wavelength
    x = street.ego_x + lateral + amp * math.sin(k * z + phase)
    yaw = math.atan(amp * k * math.cos(k * z + phase)) + yaw0  # follow the path's tangent
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])  # forward (0,0,1) -> (0, sin, cos): looks down
    pose = np.eye(4)
    pose[:3, :3] = r_yaw @ r_pitch
    pose[:3, 3] = (x, -height, z)
    return pose


def street_for(domain: str, index: int, seed: int) -> Street:
    """The street that labelled frame `index` of a domain is taken in."""
    return _street(domain, street_of(domain, index)[0], seed)
