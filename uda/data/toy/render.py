"""Ray casting, texturing, shading and camera effects of the toy street scenes (see uda.data.toy)."""

from __future__ import annotations

from functools import cached_property, lru_cache

import cv2
import numpy as np

from uda.data.toy.scene import (
    BOX,
    CYLINDER,
    DOMAINS,
    EGO,
    ELLIPSOID,
    JPEG_QUALITY,
    LABEL_IDS,
    M_BRICK,
    M_BUS,
    M_CABIN,
    M_CAR,
    M_EGO,
    M_FACADE,
    M_FENCE,
    M_FOLIAGE,
    M_LIGHT,
    M_PERSON,
    M_ROAD,
    M_SIDEWALK,
    M_SIGN,
    M_TERRAIN,
    NEAR,
    ROAD,
    SIDEWALK,
    SKY,
    SKY_DEPTH,
    STYLES,
    TERRAIN,
    Street,
    Style,
    camera_pose,
    check_domain,
    check_size,
    domain_size,
    intrinsics,
    rng_for,
    street_for,
)

SKY_HIT, GROUND_HIT, EGO_HIT = -1, -2, -3  # hit ids that are not primitives

# The Cityscapes ego-vehicle bonnet: an ellipsoid fixed in the camera frame (centre, radii in metres).
EGO_CENTRE = np.array([0.0, 1.0, 1.0], dtype=np.float32)
EGO_RADII = np.array([1.3, 0.68, 2.1], dtype=np.float32)


def _matmul3(v: np.ndarray, m) -> np.ndarray:
    """v @ m for rows v [...,3] and m [3,k], by cv2.transform: numpy's BLAS threads stall on busy machines."""
    m = np.asarray(m, v.dtype)
    out = cv2.transform(np.ascontiguousarray(v).reshape(-1, 1, 3), np.ascontiguousarray(m.T))
    return out.reshape(v.shape[:-1] + (m.shape[1],))


def _apply(m, v: np.ndarray) -> np.ndarray:
    """m @ v for a 3x3 m and planar vectors v [3,k], row by row (contiguous, no BLAS)."""
    m = np.asarray(m, np.float32)
    return np.stack([m[i, 0] * v[0] + m[i, 1] * v[1] + m[i, 2] * v[2] for i in range(3)])


def _unit(v: np.ndarray) -> np.ndarray:
    """Planar vectors v [3,k] scaled to unit length."""
    return v / np.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])


def _frac(x: np.ndarray, period: float | np.ndarray = 1.0) -> np.ndarray:
    """Position in [0, 1) of x within a pattern repeating every `period` (faster than float %)."""
    y = x / period
    return y - np.floor(y)


_CORNERS = np.array([[(i >> a) & 1 for a in range(3)] for i in range(8)], dtype=bool)  # [8,3]: True -> hi
_EDGES = np.array([(i, i | (1 << a)) for i in range(8) for a in range(3) if not i & (1 << a)])  # [12,2]


# ------------------------------------------------------------------------------------------- ray casting


@lru_cache(maxsize=16)
def _pixel_rays(h: int, w: int, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Planar camera-frame rays [3,h*w] float32 through pixel centres, scaled to z = 1 (ray parameter = depth)."""
    u, v = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)]).reshape(3, -1)
    rays.flags.writeable = False
    return rays


def _screen_rects(lo, hi, o, rot, K, h, w):
    """Pixel rectangles [N,4] (r0, r1, c0, c1) bounding each AABB's image, and its nearest camera z [N].

    The box is clipped to z >= NEAR (corners in front plus edge crossings of that plane), so the bound
    stays tight for boxes that pass beside the camera.
    """
    corners = np.where(_CORNERS[None], hi[:, None], lo[:, None]).astype(np.float64)  # [N,8,3]
    cam = _matmul3(corners - o, rot)  # world -> camera, for row vectors
    a, b = cam[:, _EDGES[:, 0]], cam[:, _EDGES[:, 1]]
    za, zb = a[..., 2], b[..., 2]
    cross = (za - NEAR) * (zb - NEAR) < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(cross, (NEAR - za) / (zb - za), 0.0)
    pts = np.concatenate([cam, a + s[..., None] * (b - a)], axis=1)
    valid = np.concatenate([cam[..., 2] > NEAR, cross], axis=1)
    z = np.maximum(pts[..., 2], NEAR)
    u = K[0, 0] * pts[..., 0] / z + K[0, 2]
    v = K[1, 1] * pts[..., 1] / z + K[1, 2]
    lo_uv = [np.where(valid, c, 1e9).min(1) for c in (v, u)]
    hi_uv = [np.where(valid, c, -1e9).max(1) for c in (v, u)]
    rects = np.stack(
        [
            np.clip(np.floor(lo_uv[0]), 0, h),
            np.clip(np.floor(hi_uv[0]) + 1, 0, h),
            np.clip(np.floor(lo_uv[1]), 0, w),
            np.clip(np.floor(hi_uv[1]) + 1, 0, w),
        ],
        axis=1,
    ).astype(np.int64)
    return rects, np.where(valid, z, np.inf).min(1)


def _hit_box(lo, hi, o, inv):
    """Ray parameter of the entry into an AABB, inf where missed; inv = the 3 planes of 1 / direction."""
    tn = tf = None
    for a in range(3):
        t0 = (lo[a] - o[a]) * inv[a]
        t1 = (hi[a] - o[a]) * inv[a]
        near, far = np.minimum(t0, t1), np.maximum(t0, t1)
        if tn is None:
            tn, tf = near, far
        else:
            np.maximum(tn, near, out=tn)
            np.minimum(tf, far, out=tf)
    tn[(tn > tf) | (tn <= NEAR)] = np.inf
    return tn


def _hit_cylinder(lo, hi, o, d):
    """Ray parameter of the hit on a vertical elliptic cylinder (side or top cap) filling the AABB."""
    c, r = (lo + hi) / 2, (hi - lo) / 2
    ox, oz = (o[0] - c[0]) / r[0], (o[2] - c[2]) / r[2]
    dx, dz = d[0] / r[0], d[2] / r[2]
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    disc = b * b - a * (ox * ox + oz * oz - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = (-b - np.sqrt(disc)) / a
        y = o[1] + t * d[1]
        t = np.where((disc >= 0) & (t > NEAR) & (y >= lo[1]) & (y <= hi[1]), t, np.inf)
        if o[1] < lo[1]:  # the camera is above the top, so the cap can be seen
            tc = (lo[1] - o[1]) / d[1]
            inside = (ox + tc * dx) ** 2 + (oz + tc * dz) ** 2 <= 1
            t = np.minimum(t, np.where((tc > NEAR) & inside, tc, np.inf))
    return t


def _hit_ellipsoid(lo, hi, o, d):
    """Ray parameter of the entry into the axis-aligned ellipsoid inscribed in the AABB."""
    c, r = (lo + hi) / 2, (hi - lo) / 2
    oo = (o - c) / r
    dd = [d[i] / r[i] for i in range(3)]
    a = dd[0] * dd[0] + dd[1] * dd[1] + dd[2] * dd[2]
    b = oo[0] * dd[0] + oo[1] * dd[1] + oo[2] * dd[2]
    disc = b * b - a * (float(oo @ oo) - 1)
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > NEAR), t, np.inf)


def cast(street: Street, pose: np.ndarray, K: np.ndarray, h: int, w: int, ego: bool):
    """Ray-casts one ray per pixel: depth [h,w] float32 (camera z, metres), hit id [h,w] int32 (primitive
    index or SKY_HIT / GROUND_HIT / EGO_HIT) and planar world ray directions [3,h*w] (camera z = 1).

    Every primitive is tested only on the pixels of its projected bounding box, front to back, and
    skipped when something nearer already covers that box.
    """
    rot = pose[:3, :3]
    o = pose[:3, 3].astype(np.float32)
    rays = _pixel_rays(h, w, float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
    d = _apply(rot, rays)
    planes = [d[a].reshape(h, w) for a in range(3)]
    inv = [1 / np.where(np.abs(p) < 1e-12, np.float32(1e-12), p) for p in planes]
    with np.errstate(divide="ignore"):
        t_ground = np.where(planes[1] > 1e-6, -o[1] / planes[1], np.inf)
    depth = np.minimum(t_ground, SKY_DEPTH).astype(np.float32)
    hit = np.where(np.isfinite(t_ground), GROUND_HIT, SKY_HIT).astype(np.int32)
    if ego:  # the bonnet only reaches into the bottom rows
        r0 = int(h * 0.75)
        cam_planes = [rays[a, r0 * w :].reshape(h - r0, w) for a in range(3)]
        t = _hit_ellipsoid(
            EGO_CENTRE - EGO_RADII, EGO_CENTRE + EGO_RADII, np.zeros(3, np.float32), cam_planes
        )
        m = t < depth[r0:]
        np.copyto(depth[r0:], t, where=m)
        hit[r0:][m] = EGO_HIT
    rects, zmin = _screen_rects(street.lo, street.hi, pose[:3, 3], rot, K, h, w)
    visible = np.flatnonzero((rects[:, 1] > rects[:, 0]) & (rects[:, 3] > rects[:, 2]) & np.isfinite(zmin))
    for i in visible[np.argsort(zmin[visible], kind="stable")]:  # front to back, so occluded ones are skipped
        r0, r1, c0, c1 = rects[i]
        zb = depth[r0:r1, c0:c1]
        if zmin[i] >= zb.max():
            continue
        kind = street.kind[i]
        if kind == BOX:
            t = _hit_box(street.lo[i], street.hi[i], o, [p[r0:r1, c0:c1] for p in inv])
        elif kind == CYLINDER:
            t = _hit_cylinder(street.lo[i], street.hi[i], o, [p[r0:r1, c0:c1] for p in planes])
        else:
            t = _hit_ellipsoid(street.lo[i], street.hi[i], o, [p[r0:r1, c0:c1] for p in planes])
        m = t < zb
        np.copyto(zb, t, where=m)
        np.copyto(hit[r0:r1, c0:c1], np.int32(i), where=m)
    return depth, hit, d


def _normals(street: Street, prim: np.ndarray, p: np.ndarray, d: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Analytic planar world normals [3,k] facing the camera at world hit points p [3,k] of hit ids
    prim [k] along ray directions d [3,k]."""
    rot, o = pose[:3, :3], pose[:3, 3:].astype(np.float32)
    n = np.zeros_like(p)
    n[1] = -1  # the ground faces up
    kind = np.where(prim >= 0, street.kind[np.maximum(prim, 0)], -1)
    for k in (BOX, CYLINDER, ELLIPSOID):
        sel = np.flatnonzero(kind == k)
        if not len(sel):
            continue
        ids = prim[sel]
        lo, hi, ps, ds = street.lo[ids].T, street.hi[ids].T, p[:, sel], d[:, sel]
        if k == BOX:  # the entry face: among the faces turned towards the ray, the one the hit lies on
            e = np.abs(ps - np.where(ds > 0, lo, hi))
            ax0 = (e[0] <= e[1]) & (e[0] <= e[2])
            ax1 = ~ax0 & (e[1] <= e[2])
            ns = -np.sign(ds) * np.stack([ax0, ax1, ~(ax0 | ax1)])
        else:
            c, r = (lo + hi) / 2, (hi - lo) / 2
            ns = (ps - c) / (r * r)
            if k == CYLINDER:
                cap = np.abs(ps[1] - lo[1]) < 1e-4 * (1 + np.abs(ps[1]))
                ns[1] = np.where(cap, -1, 0)
                ns[0][cap] = ns[2][cap] = 0
            ns = _unit(ns)
        n[:, sel] = ns
    sel = np.flatnonzero(prim == EGO_HIT)
    if len(sel):  # the bonnet is an ellipsoid in the camera frame
        ne = (_apply(rot.T, p[:, sel] - o) - EGO_CENTRE[:, None]) / (EGO_RADII * EGO_RADII)[:, None]
        n[:, sel] = _apply(rot, _unit(ne))
    return n


# ------------------------------------------------------------------------------------- textures, shading

_NOISE = np.random.default_rng(20240611).random(256 * 256).astype(np.float32)


def _noise(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth value noise in [0, 1] on a unit lattice (tiles every 256 units)."""
    xf, yf = np.floor(x), np.floor(y)
    fx, fy = x - xf, y - yf
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    xi, yi = xf.astype(np.int32) & 255, (yf.astype(np.int32) & 255) << 8
    x1, y1 = (xi + 1) & 255, (yi + 256) & 0xFF00
    a, b, c, e = _NOISE[yi | xi], _NOISE[yi | x1], _NOISE[y1 | xi], _NOISE[y1 | x1]
    return (a + (b - a) * fx + (c - a) * fy + (a - b - c + e) * fx * fy).astype(np.float32)


def _fade(period, footprint) -> np.ndarray:
    """Contrast [k] in [0,1] of a pattern of `period` metres seen at `footprint` metres per pixel:
    patterns under ~3 pixels fade out instead of aliasing."""
    return np.clip(period / (3 * footprint) - 1, 0, 1).astype(np.float32)


def _rgb(c) -> np.ndarray:
    """A colour as a [3,1] column, to broadcast over planar [3,k] arrays."""
    return np.asarray(c, np.float32).reshape(3, 1)


class _Hits:
    """Hit pixels of one material: world points p, normals n, and lazily their surface coordinates and
    the colours and parameters of the primitives they hit."""

    def __init__(self, p, n, t, prim, street: Street, fx: float) -> None:
        self.p, self.n, self.t, self.prim, self.street, self.fx = p, n, t, prim, street, fx

    @cached_property
    def fp(self):  # metres per pixel at the hit
        return self.t / self.fx

    @cached_property
    def ids(self):
        return np.maximum(self.prim, 0)

    @cached_property
    def uv(self):  # face coordinates: along the face and height for walls, (x, z) for horizontal faces
        p, n = self.p, self.n
        flat = np.abs(n[1]) > 0.7
        u = np.where(flat, p[0], np.where(np.abs(n[0]) >= np.abs(n[2]), p[2], p[0]))
        return u, np.where(flat, p[2], -p[1])

    # the colours, parameters and bounds of the primitive each pixel hit, gathered on first use
    col = cached_property(lambda self: self.street.col[self.ids].T)
    col2 = cached_property(lambda self: self.street.col2[self.ids].T)
    par = cached_property(lambda self: self.street.par[self.ids].T)
    lo = cached_property(lambda self: self.street.lo[self.ids].T)
    hi = cached_property(lambda self: self.street.hi[self.ids].T)


def _grime(s: _Hits) -> np.ndarray:
    u, v = s.uv
    return 0.88 + 0.24 * _noise(u * 0.7 + s.ids * 7.31, v * 0.7)


def _albedo(mat: int, s: _Hits, st: Style) -> np.ndarray:
    """Albedo [k,3] (linear RGB) of hits of one material: procedural, anchored to world coordinates so
    neighbouring frames see the same texture."""
    p, street = s.p, s.street
    if mat == M_ROAD:  # asphalt with lane markings (still labelled road)
        x, z = p[0], p[2]
        alb = _rgb(st.road) * (0.85 + 0.3 * _noise(x * 2, z * 2))
        dash = _frac(z, 9.0) < 1 / 3
        line = (np.abs(x) < 0.08) & (dash | (street.lanes == 2))  # the centre line is solid on wide roads
        for k in range(1, street.lanes):
            line |= (np.abs(np.abs(x) - k * street.lane_w) < 0.07) & dash
        if street.parking:
            line |= np.abs(np.abs(x) - street.lanes * street.lane_w) < 0.07
        f = _fade(0.14, s.fp) * line
        return alb * (1 - f) + _rgb(st.marking) * f
    if mat == M_SIDEWALK:  # paving tiles, lighter curb stones
        x, z = p[0], p[2]
        alb = _rgb(st.sidewalk) * (0.9 + 0.2 * _noise(x * 3, z * 3))
        tile = (_frac(x, 0.5) < 0.06) | (_frac(z, 0.5) < 0.06)
        alb = alb * (1 - 0.2 * _fade(0.5, s.fp) * tile)
        return np.where((np.abs(x) - street.road_half < 0.25), alb * 1.25, alb)
    if mat == M_TERRAIN:  # grass with patches of dirt
        x, z = p[0], p[2]
        n1 = _noise(x * 1.5, z * 1.5)
        n2 = _noise(x * 0.2 + 17, z * 0.2)
        return _rgb(st.terrain) * (0.7 + 0.6 * n1) * (1 - 0.5 * n2) + _rgb(st.bark) * 0.7 * n2
    u, v = s.uv
    if mat in (M_FACADE, M_BRICK):
        alb = s.col * _grime(s)
        if mat == M_BRICK:  # blocks of 0.5 x 0.25 m in running bond, light mortar
            odd_row = _frac(v, 0.5) >= 0.5
            joint = (_frac(v, 0.25) < 0.12) | (_frac(u + 0.25 * odd_row, 0.5) < 0.06)
            f = _fade(0.25, s.fp) * joint
            alb = alb * (1 - f) + np.float32(0.75) * f
        # windows on a grid: spacing par[0], floor height par[1] (0 = none), size fractions par[2:4]
        sx, fh, ww, wh = s.par
        has = fh > 0
        sx, fh = np.where(has, sx, 1), np.where(has, fh, 1)
        du, dv = np.abs(_frac(u, sx) - 0.5), np.abs(_frac(v, fh) - 0.55)
        win = has & (np.abs(s.n[1]) < 0.5) & (du < ww / 2) & (dv < wh / 2) & (v > 0.8)
        frame = win & ((du > ww / 2 - 0.06 / sx) | (dv > wh / 2 - 0.06 / fh))
        glass = s.col2 * (0.8 + 0.6 * _noise((p[0] + p[2]) * 0.3, v * 0.3))
        f = _fade(sx, s.fp) * win
        alb = alb * (1 - f) + glass * f
        return np.where(frame, alb * 0.5 + 0.45, alb)
    if mat == M_FENCE:  # vertical bars and a top rail in front of a darker, see-through-looking backdrop
        bar = _frac(u, s.par[0]) < 0.3
        rail = np.abs(v - (-s.lo[1] - 0.08)) < 0.05
        f = 0.4 + 0.6 * _fade(s.par[0], s.fp) * (bar | rail)
        back = s.col2 * 0.6 * (0.8 + 0.4 * _noise(u, v))
        return s.col * f + back * (1 - f)
    if mat == M_SIGN:  # front: coloured plate with a white rim (and a white symbol on round ones)
        c = (s.lo + s.hi) / 2
        half = (s.hi[0] - s.lo[0]) / 2
        du, dv = (p[0] - c[0]) / half, (p[1] - c[1]) / half
        round_ = s.par[0] == 1
        r = np.where(round_, np.hypot(du, dv), np.maximum(np.abs(du), np.abs(dv)))
        alb = np.where(((r > 0.78) | (round_ & (r < 0.35))), np.float32(0.93), s.col)
        return np.where((s.n[2] < -0.5), alb, s.col2)
    if mat == M_LIGHT:  # dark housing, three lamps on the front, the lit one bright
        c = (s.lo + s.hi) / 2
        alb = s.col.copy()
        front = s.n[2] < -0.5
        lamps = np.array([[0.9, 0.1, 0.05], [0.95, 0.7, 0.05], [0.1, 0.9, 0.3]], np.float32).T  # columns
        for k in range(3):
            on = front & (np.hypot(p[0] - c[0], p[1] - (c[1] - 0.28 + 0.28 * k)) < 0.1)
            bright = np.where(s.par[0] == k, lamps[:, k : k + 1] * 1.6, lamps[:, k : k + 1] * 0.25)
            alb = np.where(on, bright, alb)
        return alb
    if mat == M_FOLIAGE:
        leaf = _noise(u * 3 + s.par[0], v * 3) * 0.6 + _noise(u * 0.8, v * 0.8 + s.par[0]) * 0.4
        return s.col * (0.45 + leaf)
    if mat == M_PERSON:  # shirt above the leg height par[0] (metres above ground), trousers below
        return np.where((v < s.par[0]), s.col2, s.col) * _grime(s)
    if mat == M_CAR:  # paint, dark tyres and bumpers, red rear / white front lamps
        alb = np.where((v < 0.32), np.float32(0.06), s.col * (0.95 + 0.1 * _noise(u, v)))
        nz = s.n[2]
        edge = np.abs(p[0] - (s.lo[0] + s.hi[0]) / 2) > (s.hi[0] - s.lo[0]) / 2 - 0.35
        lamp = (np.abs(nz) > 0.5) & edge & (np.abs(v - 0.72) < 0.09)
        lamp_col = np.where((nz < 0), _rgb((0.8, 0.05, 0.05)), np.float32(0.95))
        return np.where(lamp, lamp_col, alb)
    if mat == M_CABIN:  # glass reflecting the sky, with pillars in the primitive's second colour
        along = np.where(np.abs(s.n[0]) > 0.5, (p[2] - s.lo[2]) / (s.hi[2] - s.lo[2]), 0.5)
        pillar = (along < 0.08) | (along > 0.92) | (np.abs(along - 0.5) < 0.03) | (np.abs(s.n[1]) > 0.5)
        glass = s.col * 0.7 + _rgb(st.sky_horizon) * 0.35 * (0.6 + 0.4 * _noise(u * 0.5, v * 2))
        return np.where(pillar, s.col2, glass)
    if mat == M_BUS:  # paint, a window band with pillars, dark skirt
        band = (v > 1.2) & (v < 2.6) & (np.abs(s.n[1]) < 0.5) & (_frac(u, 1.3) > 0.07)
        alb = np.where(band, s.col2 * 1.3, s.col * _grime(s))
        return np.where((v < 0.35), np.float32(0.07), alb)
    return s.col * _grime(s)  # M_PLAIN


def _sky(d: np.ndarray, st: Style) -> np.ndarray:
    """Sky colour [k,3] for world ray directions d [k,3]: horizon-to-zenith gradient with clouds."""
    dn = _unit(d)
    e = np.clip(-dn[1], 0, 1)
    t = e**0.6
    col = _rgb(st.sky_horizon) * (1 - t) + _rgb(st.sky_zenith) * t
    k = 1.0 / (e + 0.08)  # project onto a cloud plane above the camera
    x, z = dn[0] * k, dn[2] * k
    c = _noise(x * 3, z * 3) * 0.65 + _noise(x * 9, z * 9) * 0.35
    cover = np.clip((c - (1 - st.clouds)) * 3, 0, 1)
    return col * (1 - cover) + np.float32(0.95) * cover


def _ground_classes(street: Street, p: np.ndarray) -> np.ndarray:
    """Internal class of planar ground points p [3,k]: road, grass verge, sidewalk, then each side's zones."""
    x = np.abs(p[0])
    right = p[0] > 0
    beyond = np.empty(p.shape[1], np.int64)
    for side in (0, 1):
        m = right == bool(side)
        zone = np.searchsorted(street.zone_z[side], p[2, m], side="right") - 1
        beyond[m] = street.zone_cls[side, np.maximum(zone, 0)]
    curb, verge = street.road_half, street.road_half + street.verge
    walk = verge + street.sidewalk_w
    return np.select([x < curb, x < verge, x < walk], [ROAD, TERRAIN, SIDEWALK], beyond)


def shade(domain: str, street: Street, pose: np.ndarray, K: np.ndarray, depth, hit, d):
    """Linear RGB [h,w,3] in [0,1] before camera effects, internal classes [h,w] and camera-frame normals
    [h,w,3] of a cast frame (d: its planar world ray directions [3,h*w]).

    Works on planar [3,k] arrays of the hit pixels, so every numpy loop runs over pixels, not over xyz.
    """
    st = STYLES[domain]
    h, w = depth.shape
    o = pose[:3, 3:].astype(np.float32)
    flat, flat_depth = hit.ravel(), depth.ravel()
    pix = np.flatnonzero(flat != SKY_HIT)
    prim = flat[pix]
    safe = np.maximum(prim, 0)
    cls, mat = street.cls[safe], street.mat[safe]
    ground = prim == GROUND_HIT
    g = pix[ground]
    cls[ground] = _ground_classes(street, o + flat_depth[g] * d[:, g])
    mat[ground] = np.select([cls[ground] == ROAD, cls[ground] == SIDEWALK], [M_ROAD, M_SIDEWALK], M_TERRAIN)
    ego = prim == EGO_HIT
    cls[ego], mat[ego] = EGO, M_EGO
    # sort the hits by material once, so each material below works on contiguous slices
    order = np.argsort(mat.astype(np.int16), kind="stable")
    pix, prim, cls, mat = pix[order], prim[order], cls[order], mat[order]
    t, ds = flat_depth[pix], d[:, pix]
    p = ds * t
    p += o
    n = _normals(street, prim, p, ds, pose)
    colour = np.empty_like(p)
    counts = np.bincount(mat)
    ends = np.cumsum(counts)
    for m in np.flatnonzero(counts):
        s = slice(ends[m] - counts[m], ends[m])
        if m == M_EGO:  # dark paint reflecting a little sky
            colour[:, s] = 0.05 + 0.1 * np.clip(-n[1, s], 0, 1) * _rgb(st.sky_horizon)
        else:
            hits = _Hits(p[:, s], n[:, s], t[s], prim[s], street, float(K[0, 0]))
            colour[:, s] = _albedo(int(m), hits, st)
    # Lambert with a sky-tinted ambient term that is brighter on up-facing surfaces, then haze
    sun = _unit(_rgb(st.sun_dir))
    light = (0.75 * st.ambient + 0.25 * st.ambient * np.clip(-n[1], 0, 1)) * _rgb(st.ambient_col)
    light += np.clip(sun[0] * n[0] + sun[1] * n[1] + sun[2] * n[2], 0, None) * (st.sun * _rgb(st.sun_col))
    light[:, mat == M_EGO] = 1
    haze = 1 - np.exp(-t / st.fog)
    colour *= light
    colour *= 1 - haze
    colour += _rgb(st.sky_horizon) * haze
    image = np.empty((3, h * w), np.float32)
    sky = np.flatnonzero(flat == SKY_HIT)
    image[:, sky] = _sky(d[:, sky], st)
    image[:, pix] = colour
    classes = np.full(h * w, SKY, np.int32)
    classes[pix] = cls
    normals = np.zeros((3, h * w), np.float32)
    normals[:, pix] = _apply(pose[:3, :3].T, n)  # world -> camera frame
    return (
        np.ascontiguousarray(image.T).reshape(h, w, 3),
        classes.reshape(h, w),
        np.ascontiguousarray(normals.T).reshape(h, w, 3),
    )


# ---------------------------------------------------------------------------------------- camera effects


def _saturation(s: float, tint=(1.0, 1.0, 1.0)) -> np.ndarray:
    """3x3 colour matrix scaling saturation by s around the channel mean, then tinting per channel."""
    return (np.diag(tint) @ (s * np.eye(3) + (1 - s) / 3)).astype(np.float32)


def _tone(x: np.ndarray, domain: str) -> np.ndarray:
    """Tone curve of a domain's camera on values in [0, 1]."""
    if domain == "synthia":
        return x ** (1 / 1.1)
    if domain == "vkitti2":
        return x ** (1 / 1.05)
    y = x ** (1 / 1.25)
    return 0.03 + 0.92 * (y + 0.15 * y * (1 - y) * (2 * y - 1))  # soft S-curve with lifted blacks


_LUT_SIZE = 1024
_COLOUR = {
    "synthia": _saturation(1.15),
    "vkitti2": _saturation(1.0, (1.04, 1.0, 0.9)),
    "cityscapes": _saturation(0.75, (0.96, 1.0, 0.94)),
}
_TONE_LUT = {
    dom: _tone(np.linspace(0, 1, _LUT_SIZE, dtype=np.float32), dom).astype(np.float32) for dom in DOMAINS
}


@lru_cache(maxsize=8)
def _vignette(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (w / 2)) ** 2
    return (1 - 0.15 * r2)[..., None].astype(np.float32)


def camera_effects(domain: str, linear: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The domain's camera look on a linear image [h,w,3] -> uint8 RGB: colour matrix and tone curve; the
    real-like target adds lens blur, vignetting and shot plus read noise."""
    img = linear
    if domain == "cityscapes":
        img = cv2.GaussianBlur(img, (0, 0), 0.7) * _vignette(*img.shape[:2])
    img = _matmul3(img, _COLOUR[domain].T)
    q = np.clip(img * (_LUT_SIZE - 1) + 0.5, 0, _LUT_SIZE - 1).astype(np.int32)
    out = _TONE_LUT[domain][q]
    if domain == "cityscapes":
        # Mild enough that view synthesis between neighbouring frames stays informative (self-supervised depth).
        sigma = 0.003 + 0.008 * np.sqrt(out)
        out = out + rng.standard_normal(out.shape, dtype=np.float32) * sigma
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- rendering


def render(domain: str, index: int, seed: int, h: int, w: int, offset: int) -> tuple[dict, bytes | None]:
    """The frame dict of render_frame at the domain's own size (h, w), and for VKITTI2 the JPEG bytes
    whose decoding is its image."""
    street = street_for(domain, index, seed)
    pose = camera_pose(domain, index, offset, seed, street)
    K = intrinsics(domain, h, w)
    depth, hit, d = cast(street, pose, K, h, w, ego=domain == "cityscapes")
    linear, classes, normals = shade(domain, street, pose, K, depth, hit, d)
    image = camera_effects(domain, linear, rng_for(seed, domain, index, 2, offset + 1000))
    jpeg = None
    if domain == "vkitti2":  # what is written is a JPEG: return exactly what a reader decodes
        _, buf = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        jpeg = buf.tobytes()
        image = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    frame = {
        "image": image,
        "depth": depth,
        "normals": normals,
        "label": LABEL_IDS[domain][classes].astype(np.int32),
        "K": K,
        "pose": pose,
        "classes": classes,
        "instance": np.where(hit >= 0, street.inst[np.maximum(hit, 0)], 0).astype(np.int32),
    }
    return frame, jpeg


def render_frame(
    domain: str, index: int, seed: int = 0, height: int = 256, width: int = 512, offset: int = 0
) -> dict:
    """Exact render of labelled frame `index` of a domain, moved by `offset` video frames (e.g. -1, +1).

    height, width are the Cityscapes (target) size; the domain's own size is domain_size(domain, height,
    width). Returns numpy arrays: image uint8 [h,w,3] RGB as written (VKITTI2: the decoded JPEG), depth
    float32 [h,w] metres (camera z; sky = SKY_DEPTH), normals float32 [h,w,3] (camera frame, unit, facing
    the camera; 0 on sky), label int32 [h,w] in the dataset's own ids, K float32 [3,3], pose float64 [4,4]
    camera-to-world; plus classes int32 [h,w] (internal ids, see CLASS_NAMES) and instance int32 [h,w]
    (object ids, 0 for stuff).
    """
    check_domain(domain)
    check_size(height, width)
    if index < 0:
        raise ValueError(f"index={index}: labelled frame indices start at 0")
    h, w = domain_size(domain, height, width)
    return render(domain, int(index), int(seed), h, w, int(offset))[0]
