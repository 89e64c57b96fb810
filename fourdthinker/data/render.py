"""Numpy ray caster for the synthetic world: spheres, oriented boxes, a checkered ground and a sky.

Products use np.einsum rather than BLAS-backed `@`: BLAS may pick kernels by thread split, and a
last-bit difference flips a rounded pixel value, which would make the videos differ between runs.

Conventions: world points X map to camera points R X + t (world-to-camera, OpenCV axes: x right,
y down, z forward). Integer pixel coordinates are pixel centres, as in OpenCV, so a camera point
projects to u = fx x / z + cx, v = fy y / z + cy with no half-pixel offset. Rays are cast with
camera-frame directions whose z is 1, so a hit's ray parameter is its depth along the optical axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKGROUND_ID = 0

_AMBIENT = 0.35
_DIFFUSE = 0.65
# Boxes show their +z local face in a lighter tint so that a viewer can tell which way they face.
_FRONT_TINT = 0.5


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels for an image of width x height."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def pixel_rays(self) -> np.ndarray:
        """(H*W, 3) camera-frame ray directions through every pixel centre, row-major, z = 1."""
        u, v = np.meshgrid(np.arange(self.width, dtype=np.float64),
                           np.arange(self.height, dtype=np.float64))
        x = (u.ravel() - self.cx) / self.fx
        y = (v.ravel() - self.cy) / self.fy
        return np.stack([x, y, np.ones_like(x)], axis=-1)


@dataclass(frozen=True)
class Ground:
    """The plane {X : normal . X = offset}; `normal` points up (toward the sky), `axes` span the plane."""

    normal: np.ndarray           # (3,)
    offset: float
    axes: np.ndarray             # (2, 3) orthonormal in-plane directions for the checker texture
    cell: float
    colours: np.ndarray          # (2, 3) checker colours in [0, 1]


@dataclass(frozen=True)
class SceneFrame:
    """Everything visible at one instant. Instance ids are >= 1; 0 is ground and sky."""

    sphere_centres: np.ndarray   # (S, 3)
    sphere_radii: np.ndarray     # (S,)
    sphere_colours: np.ndarray   # (S, 3)
    sphere_ids: np.ndarray       # (S,) int
    box_centres: np.ndarray      # (B, 3)
    box_rotations: np.ndarray    # (B, 3, 3) local-to-world; local +z is the box's front
    box_half_extents: np.ndarray  # (B, 3)
    box_colours: np.ndarray      # (B, 3)
    box_ids: np.ndarray          # (B,) int
    ground: Ground
    light: np.ndarray            # (3,) unit vector toward the light
    sky_colours: np.ndarray      # (2, 3) colour at the horizon and straight up


@dataclass(frozen=True)
class Hits:
    depth: np.ndarray            # (P,) ray parameter of the nearest hit; inf for sky
    ids: np.ndarray              # (P,) instance id (0 for ground and sky)
    normals: np.ndarray          # (P, 3) unit world normals at the hit (zeros for sky)
    colours: np.ndarray          # (P, 3) unshaded surface colour


def intersect_spheres(origin: np.ndarray, dirs: np.ndarray, centres: np.ndarray,
                      radii: np.ndarray) -> np.ndarray:
    """(P, S) ray parameters of the first positive sphere hits, inf where a ray misses."""
    oc = origin[None, :] - centres                           # (S, 3)
    a = np.einsum("pi,pi->p", dirs, dirs)[:, None]           # (P, 1)
    half_b = np.einsum("pi,si->ps", dirs, oc)               # (P, S)
    c = np.einsum("si,si->s", oc, oc) - radii**2             # (S,)
    disc = half_b**2 - a * c[None, :]
    root = np.sqrt(np.maximum(disc, 0.0))
    near = (-half_b - root) / a
    far = (-half_b + root) / a
    t = np.where(near > 0, near, far)
    return np.where((disc >= 0) & (t > 0), t, np.inf)


def intersect_boxes(origin: np.ndarray, dirs: np.ndarray, centres: np.ndarray,
                    rotations: np.ndarray, half_extents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slab test in each box's frame: (P, B) entry parameters (inf on a miss) and (P, B, 3) local normals."""
    local_origin = np.einsum("bji,bj->bi", rotations, origin[None, :] - centres)   # R^T (o - c)
    local_dirs = np.einsum("bji,pj->pbi", rotations, dirs)                         # (P, B, 3)
    # A zero direction component must act as +-inf in the slab division, never as nan.
    safe = np.where(np.abs(local_dirs) < 1e-12, 1e-12, local_dirs)
    t1 = (-half_extents[None] - local_origin[None]) / safe
    t2 = (half_extents[None] - local_origin[None]) / safe
    t_min = np.minimum(t1, t2)
    entry_axis = np.argmax(t_min, axis=-1)                                          # (P, B)
    t_near = np.take_along_axis(t_min, entry_axis[..., None], axis=-1)[..., 0]
    t_far = np.maximum(t1, t2).min(axis=-1)
    hit = (t_near <= t_far) & (t_near > 0)
    normals = np.zeros(local_dirs.shape)
    sign = -np.sign(np.take_along_axis(local_dirs, entry_axis[..., None], axis=-1)[..., 0])
    np.put_along_axis(normals, entry_axis[..., None], sign[..., None], axis=-1)
    return np.where(hit, t_near, np.inf), normals


def cast_rays(origin: np.ndarray, dirs: np.ndarray, scene: SceneFrame) -> Hits:
    """Nearest-hit z-buffer over all objects, the ground and the sky, for world rays o + t d."""
    n_rays = len(dirs)
    depth = np.full(n_rays, np.inf)
    ids = np.full(n_rays, BACKGROUND_ID, dtype=np.int64)
    normals = np.zeros((n_rays, 3))
    colours = np.zeros((n_rays, 3))

    ground = scene.ground
    facing = np.einsum("pi,i->p", dirs, ground.normal)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = (ground.offset - origin @ ground.normal) / facing
    on_ground = (facing < 0) & (t_ground > 0)
    depth[on_ground] = t_ground[on_ground]
    points = origin[None, :] + t_ground[on_ground, None] * dirs[on_ground]
    cells = np.floor(np.einsum("pi,ai->pa", points, ground.axes) / ground.cell).astype(np.int64).sum(axis=-1) % 2
    colours[on_ground] = ground.colours[cells]
    normals[on_ground] = ground.normal

    if len(scene.sphere_ids):
        t = intersect_spheres(origin, dirs, scene.sphere_centres, scene.sphere_radii)
        nearest = np.argmin(t, axis=1)
        t_best = t[np.arange(n_rays), nearest]
        closer = t_best < depth
        depth[closer] = t_best[closer]
        ids[closer] = scene.sphere_ids[nearest[closer]]
        hit_points = origin[None, :] + t_best[closer, None] * dirs[closer]
        normals[closer] = ((hit_points - scene.sphere_centres[nearest[closer]])
                           / scene.sphere_radii[nearest[closer], None])
        colours[closer] = scene.sphere_colours[nearest[closer]]

    if len(scene.box_ids):
        t, local_normals = intersect_boxes(origin, dirs, scene.box_centres, scene.box_rotations,
                                           scene.box_half_extents)
        nearest = np.argmin(t, axis=1)
        t_best = t[np.arange(n_rays), nearest]
        closer = t_best < depth
        depth[closer] = t_best[closer]
        box = nearest[closer]
        ids[closer] = scene.box_ids[box]
        local = local_normals[np.flatnonzero(closer), box]
        normals[closer] = np.einsum("pij,pj->pi", scene.box_rotations[box], local)
        base = scene.box_colours[box]
        is_front = local[:, 2] > 0.5
        colours[closer] = np.where(is_front[:, None], base + _FRONT_TINT * (1.0 - base), base)

    return Hits(depth=depth, ids=ids, normals=normals, colours=colours)


def shade(dirs: np.ndarray, hits: Hits, scene: SceneFrame) -> np.ndarray:
    """(P, 3) float colours: Lambert-shaded surfaces, a vertical gradient for the sky."""
    lambert = np.clip(np.einsum("pi,i->p", hits.normals, scene.light), 0.0, None)
    lit = hits.colours * (_AMBIENT + _DIFFUSE * lambert)[:, None]
    elevation = np.clip(np.einsum("pi,i->p", dirs, scene.ground.normal) / np.linalg.norm(dirs, axis=1), 0.0, 1.0)
    sky = scene.sky_colours[0] + elevation[:, None] * (scene.sky_colours[1] - scene.sky_colours[0])
    return np.where(np.isinf(hits.depth)[:, None], sky, lit)


@dataclass(frozen=True)
class Frame:
    rgb: np.ndarray              # (H, W, 3) uint8
    instance_ids: np.ndarray     # (H, W) uint8, 0 = ground/sky, k = object k
    depth: np.ndarray            # (H, W) float32 z-depth, inf for sky


def render(scene: SceneFrame, intrinsics: Intrinsics, rotation: np.ndarray,
           translation: np.ndarray) -> Frame:
    """Render one frame seen by the world-to-camera pose (rotation, translation)."""
    origin = -rotation.T @ translation                         # camera centre in the world
    dirs = np.einsum("pi,ij->pj", intrinsics.pixel_rays(), rotation)   # R^T d for every row d
    hits = cast_rays(origin, dirs, scene)
    rgb = shade(dirs, hits, scene)
    shape = (intrinsics.height, intrinsics.width)
    return Frame(
        rgb=np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8).reshape(*shape, 3),
        instance_ids=hits.ids.astype(np.uint8).reshape(shape),
        depth=hits.depth.astype(np.float32).reshape(shape),
    )
