"""Pure, batched planar geometry: warp families, homographies, warping.

Convention (used everywhere in this package)
--------------------------------------------
* Points are ``(x, y)``. In *pixel* coordinates pixel centres sit at integer
  positions and the origin is the centre of the top-left pixel, so an image of
  width ``W`` spans ``x in [0, W - 1]``.
* *Normalised* coordinates map the centres of the corner pixels to -1 and +1
  (``x_n = 2 x / (W - 1) - 1``). This is ``align_corners=True`` in
  ``torch.nn.functional.grid_sample``, and every call here passes it
  explicitly.
* A warp matrix maps an **output** (aligned) point to an **input** point
  (backward mapping, what ``grid_sample`` needs). Names say which frames a
  matrix connects: ``in_from_out_norm`` is normalised output -> normalised
  input, ``in_from_out_pix`` the same in pixels.
* The public contract of the product is ``in_from_out_pix``: a 3x3 homography
  per image, in pixels, mapping an aligned-output pixel to an input pixel.

Warp families have identity-centred parameters in normalised coordinates: a
zero parameter vector is the identity for every family.

Device and dtype always follow the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "constant",
    "unit_corners",
    "WarpFamily",
    "WARP_FAMILIES",
    "FAMILIES_BY_RANK",
    "get_family",
    "params_to_matrix",
    "matrix_to_params",
    "compose",
    "invert",
    "normaliser",
    "pixel_from_normalised",
    "normalised_from_pixel",
    "transform_points",
    "corners",
    "polygon_area",
    "homography_from_points",
    "warp",
    "sample_grid",
    "warp_pixel",
    "det3",
    "jacobian_determinant",
    "jacobian_determinant_at",
    "square_to_quad",
    "offsets_to_homography",
    "homography_to_offsets",
    "project_offsets",
    "original_from_resized",
]


@dataclass(frozen=True)
class WarpFamily:
    """A parametric warp family with identity-centred parameters.

    ``dof`` is the number of parameters; ``rank`` orders the families from
    least to most general (used by the warp curriculum).
    """

    name: str
    dof: int
    rank: int


WARP_FAMILIES: dict[str, WarpFamily] = {
    f.name: f
    for f in (
        WarpFamily("translation", 2, 0),
        WarpFamily("similarity", 4, 1),
        WarpFamily("affine", 6, 2),
        WarpFamily("homography", 8, 3),
    )
}


_CONSTANTS: dict = {}


def constant(values, *, like: torch.Tensor | None = None, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """A small constant tensor (nested tuples of numbers), made once per dtype and device.

    Copying Python numbers to a GPU is a host-to-device transfer, which a CUDA graph cannot
    capture; after the first call (the warm-up) the cached tensor is reused instead. Never
    modify the result in place.
    """
    if like is not None:
        dtype, device = like.dtype, like.device
    dtype = dtype or torch.get_default_dtype()
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (values, dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return t


# Family names from least to most general (index = rank).
FAMILIES_BY_RANK = tuple(sorted(WARP_FAMILIES, key=lambda n: WARP_FAMILIES[n].rank))


def get_family(name: str) -> WarpFamily:
    try:
        return WARP_FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown warp family {name!r}; choose one of {', '.join(WARP_FAMILIES)}"
        ) from None


def params_to_matrix(p: torch.Tensor, family: str) -> torch.Tensor:
    """Identity-centred parameters to 3x3 matrices.

    Args:
        p: ``(B, dof)`` parameters.
        family: one of :data:`WARP_FAMILIES`.

    Returns:
        ``(B, 3, 3)`` matrices; ``p = 0`` gives the identity.

    Parametrisations (rows of the matrix, last row ``[0, 0, 1]`` unless said):
        translation ``(tx, ty)``: ``[1, 0, tx] [0, 1, ty]``
        similarity ``(a, b, tx, ty)``: ``[1+a, -b, tx] [b, 1+a, ty]``
            (``1+a = s cos t``, ``b = s sin t``)
        affine ``p0..p5``: ``[1+p0, p1, p2] [p3, 1+p4, p5]``
        homography ``p0..p7``: affine rows plus last row ``[p6, p7, 1]``
    """
    fam = get_family(family)
    if p.ndim != 2 or p.shape[1] != fam.dof:
        raise ValueError(f"{family} parameters must be (B, {fam.dof}), got {tuple(p.shape)}")
    B = p.shape[0]
    z = p.new_zeros(B)
    o = p.new_ones(B)
    if family == "translation":
        rows = [o, z, p[:, 0], z, o, p[:, 1], z, z, o]
    elif family == "similarity":
        a, b = p[:, 0], p[:, 1]
        rows = [1 + a, -b, p[:, 2], b, 1 + a, p[:, 3], z, z, o]
    elif family == "affine":
        rows = [1 + p[:, 0], p[:, 1], p[:, 2], p[:, 3], 1 + p[:, 4], p[:, 5], z, z, o]
    else:
        rows = [1 + p[:, 0], p[:, 1], p[:, 2], p[:, 3], 1 + p[:, 4], p[:, 5], p[:, 6], p[:, 7], o]
    return torch.stack(rows, dim=1).view(B, 3, 3)


def matrix_to_params(M: torch.Tensor, family: str) -> torch.Tensor:
    """Inverse of :func:`params_to_matrix` for matrices inside the family.

    Matrices are first scaled so that ``M[2, 2] = 1``. For a matrix outside the
    family the result is its least-squares projection onto the parameters
    (e.g. the rotation/scale part of an affine for ``similarity``).

    Args:
        M: ``(B, 3, 3)``.
    Returns:
        ``(B, dof)``.
    """
    M = M / M[:, 2:3, 2:3]
    if family == "translation":
        return M[:, :2, 2]
    if family == "similarity":
        a = 0.5 * (M[:, 0, 0] + M[:, 1, 1]) - 1
        b = 0.5 * (M[:, 1, 0] - M[:, 0, 1])
        return torch.stack([a, b, M[:, 0, 2], M[:, 1, 2]], dim=1)
    if family == "affine":
        q = M[:, :2, :].reshape(-1, 6).clone()
        q[:, 0] -= 1
        q[:, 4] -= 1
        return q
    get_family(family)
    q = M.reshape(-1, 9)[:, :8].clone()
    q[:, 0] -= 1
    q[:, 4] -= 1
    return q


def compose(*Ms: torch.Tensor) -> torch.Tensor:
    """Matrix product ``Ms[0] @ Ms[1] @ ...``: apply the last one first."""
    out = Ms[0]
    for M in Ms[1:]:
        out = out @ M
    return out


def invert(M: torch.Tensor) -> torch.Tensor:
    """Batched 3x3 inverse, ``(B, 3, 3) -> (B, 3, 3)``. Singular inputs give non-finite
    entries rather than an error: the error check would make the device wait for the host."""
    return torch.linalg.inv_ex(M)[0]


def normaliser(height: int, width: int, *, like: torch.Tensor | None = None,
               dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """``norm_from_pix``: the ``(3, 3)`` matrix taking pixel to normalised coordinates.

    A one-pixel side has no extent; we treat it as spanning ``[-1, 1]`` anyway
    (scale 2) so the matrix stays invertible.
    """
    if like is not None:
        dtype, device = like.dtype, like.device
    sx = 2.0 / (width - 1) if width > 1 else 2.0
    sy = 2.0 / (height - 1) if height > 1 else 2.0
    return constant(((sx, 0.0, -1.0), (0.0, sy, -1.0), (0.0, 0.0, 1.0)), dtype=dtype, device=device)


def pixel_from_normalised(in_from_out_norm: torch.Tensor, in_size: tuple[int, int],
                          out_size: tuple[int, int]) -> torch.Tensor:
    """Normalised warp -> pixel warp.

    Args:
        in_from_out_norm: ``(B, 3, 3)``.
        in_size, out_size: ``(H, W)`` of the input and the output image.
    Returns:
        ``in_from_out_pix``, ``(B, 3, 3)``.
    """
    n_in = normaliser(*in_size, like=in_from_out_norm)
    n_out = normaliser(*out_size, like=in_from_out_norm)
    return torch.linalg.inv(n_in) @ in_from_out_norm @ n_out


def normalised_from_pixel(in_from_out_pix: torch.Tensor, in_size: tuple[int, int],
                          out_size: tuple[int, int]) -> torch.Tensor:
    """Pixel warp -> normalised warp; inverse of :func:`pixel_from_normalised`."""
    n_in = normaliser(*in_size, like=in_from_out_pix)
    n_out = normaliser(*out_size, like=in_from_out_pix)
    return n_in @ in_from_out_pix @ torch.linalg.inv(n_out)


def transform_points(M: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Apply homographies to points.

    Args:
        M: ``(B, 3, 3)``.
        pts: ``(B, N, 2)`` or ``(N, 2)`` (shared by the batch).
    Returns:
        ``(B, N, 2)``.
    """
    if pts.ndim == 2:
        pts = pts.unsqueeze(0).expand(M.shape[0], -1, -1)
    ph = torch.cat([pts, torch.ones_like(pts[..., :1])], dim=-1)  # (B, N, 3)
    q = ph @ M.transpose(1, 2)
    return q[..., :2] / q[..., 2:3]


def corners(height: int, width: int, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel coordinates of the four corner-pixel centres, ``(4, 2)``: TL, TR, BR, BL."""
    return constant(((0.0, 0.0), (width - 1.0, 0.0), (width - 1.0, height - 1.0), (0.0, height - 1.0)), like=like)


def polygon_area(points: torch.Tensor) -> torch.Tensor:
    """Unsigned area of polygons given by their vertices in order (shoelace), ``(..., K, 2)`` -> ``(...)``."""
    x, y = points[..., 0], points[..., 1]
    return 0.5 * (x * y.roll(-1, dims=-1) - x.roll(-1, dims=-1) * y).sum(-1).abs()


def homography_from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The homography mapping four ``src`` points onto four ``dst`` points (DLT).

    Args:
        src, dst: ``(B, 4, 2)``.
    Returns:
        ``(B, 3, 3)`` with ``H[2, 2] = 1`` and ``dst ~ H src``.
    """
    B = src.shape[0]
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    z, o = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, o, z, z, z, -u * x, -u * y], dim=-1)  # (B, 4, 8)
    rows_v = torch.stack([z, z, z, x, y, o, -v * x, -v * y], dim=-1)
    A = torch.cat([rows_u, rows_v], dim=1)  # (B, 8, 8)
    b = torch.cat([u, v], dim=1).unsqueeze(-1)  # (B, 8, 1)
    h = torch.linalg.solve(A, b).squeeze(-1)
    return torch.cat([h, torch.ones_like(h[:, :1])], dim=1).view(B, 3, 3)


_BASE_GRIDS: dict = {}


def _base_grid(out_size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """``(1, Ho*Wo, 3)`` homogeneous normalised coordinates of the output pixels, row-major;
    made once per size, dtype and device (like :func:`constant`; never modify it in place)."""
    key = (tuple(out_size), like.dtype, like.device)
    g = _BASE_GRIDS.get(key)
    if g is None:
        Ho, Wo = out_size
        ys = torch.linspace(-1, 1, Ho, dtype=like.dtype, device=like.device) if Ho > 1 else like.new_zeros(1)
        xs = torch.linspace(-1, 1, Wo, dtype=like.dtype, device=like.device) if Wo > 1 else like.new_zeros(1)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        g = _BASE_GRIDS[key] = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(1, Ho * Wo, 3)
    return g


def _grid(in_from_out_norm: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Sampling grid ``(B, Ho, Wo, 2)`` in normalised input coordinates."""
    Ho, Wo = out_size
    M = in_from_out_norm
    q = _base_grid(out_size, M) @ M.transpose(1, 2)  # (B, Ho*Wo, 3)
    # Keep the divide away from 0 so a degenerate homography yields far-away
    # (hence empty) samples instead of NaN/inf gradients.
    w = q[..., 2:3]
    w = torch.where(w.abs() < 1e-6, 1e-6, w)
    return (q[..., :2] / w).view(-1, Ho, Wo, 2)


def warp(image: torch.Tensor, in_from_out_norm: torch.Tensor, out_size: tuple[int, int],
         *, mode: str = "bilinear", padding_mode: str = "zeros", fill: torch.Tensor | None = None) -> torch.Tensor:
    """Resample ``image`` through backward homographies in normalised coordinates.

    Args:
        image: ``(B, C, H, W)``.
        in_from_out_norm: ``(B, 3, 3)``.
        out_size: ``(Ho, Wo)``.
        padding_mode: ``grid_sample``'s; ``"zeros"`` fills outside with 0.
        fill: ``(B, C, 1, 1)`` (or broadcastable) values for samples outside the
            input instead of 0, e.g. each image's background; ``"zeros"`` padding only.
    Returns:
        ``(B, C, Ho, Wo)``.
    """
    grid = _grid(in_from_out_norm.to(image.dtype), out_size)
    if fill is None:
        return sample_grid(image, grid, mode, padding_mode)
    return sample_grid(image - fill, grid, mode, padding_mode) + fill


_MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_PADDING = {"zeros": 0, "border": 1, "reflection": 2}


def sample_grid(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """``grid_sample`` with ``align_corners=True``, always through PyTorch's own kernel.

    ``F.grid_sample`` hands this exact configuration to cuDNN's sampler on a GPU, which refuses
    large batches (``CUDNN_STATUS_NOT_SUPPORTED`` from about 16k 28 px images; pytorch#88380).
    """
    return torch.grid_sampler_2d(image, grid, _MODES[mode], _PADDING[padding_mode], True)


def warp_pixel(image: torch.Tensor, in_from_out_pix: torch.Tensor, out_size: tuple[int, int],
               **kw) -> torch.Tensor:
    """:func:`warp` with a pixel-coordinate matrix; same shapes."""
    M = normalised_from_pixel(in_from_out_pix, tuple(image.shape[-2:]), out_size)
    return warp(image, M, out_size, **kw)


def jacobian_determinant(in_from_out_pix: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """``|det J|`` of the output->input map at every output pixel centre.

    It is the input area one output pixel covers: above 1 the warp shrinks the
    content, below 1 it magnifies (and may crop) it.

    Args:
        in_from_out_pix: ``(B, 3, 3)``.
    Returns:
        ``(B, Ho, Wo)``.
    """
    Ho, Wo = out_size
    ys = torch.arange(Ho, dtype=in_from_out_pix.dtype, device=in_from_out_pix.device)
    xs = torch.arange(Wo, dtype=in_from_out_pix.dtype, device=in_from_out_pix.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx.flatten(), gy.flatten()], -1).expand(in_from_out_pix.shape[0], -1, -1)
    return jacobian_determinant_at(in_from_out_pix, pts).view(-1, Ho, Wo)


def jacobian_determinant_at(in_from_out: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """``|det J|`` of ``(B, 3, 3)`` homographies at their own input points ``(B, K, 2)``, ``(B, K)``.

    The area one unit of the domain covers in the range, in whatever units the
    matrices use (pixels for pixel matrices).
    """
    M = in_from_out / in_from_out[:, 2:3, 2:3]
    w = M[:, 2, 0, None] * pts[..., 0] + M[:, 2, 1, None] * pts[..., 1] + 1.0
    # For x' = (a.x)/w the Jacobian determinant is det(M) / w^3.
    return (det3(M)[:, None] / w.pow(3)).abs()


def det3(M: torch.Tensor) -> torch.Tensor:
    """Determinants of ``(..., 3, 3)`` matrices, ``(...)``, by cofactor expansion.

    Element-wise arithmetic only: ``torch.linalg.det`` on a GPU loads its solver library on first
    use (~1.5 s of a 1,000-image job's framing check, ``bench/results/session14/e2e_call1_log.txt``).
    """
    a, b, c = M[..., 0, 0], M[..., 0, 1], M[..., 0, 2]
    d, e, f = M[..., 1, 0], M[..., 1, 1], M[..., 1, 2]
    g, h, i = M[..., 2, 0], M[..., 2, 1], M[..., 2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def unit_corners(*, like: torch.Tensor | None = None) -> torch.Tensor:
    """Corners of the normalised frame, ``(4, 2)``: TL, TR, BR, BL = ``(-1, -1) ... (-1, 1)``."""
    return constant(((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)), like=like)


def square_to_quad(quad: torch.Tensor) -> torch.Tensor:
    """The homography mapping the normalised frame's corners onto quadrilaterals, in closed form.

    Args:
        quad: ``(B, 4, 2)`` images of the corners TL, TR, BR, BL of ``[-1, 1]^2``.
    Returns:
        ``(B, 3, 3)`` with ``H[2, 2] = 1``; the same matrix as
        ``homography_from_points(unit_corners(), quad)``.

    Heckbert's unit-square-to-quadrilateral solution composed with the map from ``[-1, 1]^2``
    onto the unit square. With ``q0..q3`` the corners, ``d1 = q1 - q2``, ``d2 = q3 - q2`` and
    ``s = q0 - q1 + q2 - q3``, the perspective terms solve ``[d1 d2] (g, h) = s`` (Cramer's rule),
    and every other entry is linear in the corners given ``(g, h)``. Written as a few batched
    products with constant matrices (about a dozen kernels forward, instead of one per scalar):
    the aligner makes one per stage and pass, and at small batches a training step's time is the
    number of kernels it launches. Elementwise and matrix arithmetic only: unlike a linear solve
    it never waits on the device for an error check, so it runs inside a captured CUDA graph.
    """
    B = quad.shape[0]
    qt = quad.transpose(1, 2)  # (B, 2, 4): rows x and y, one column per corner
    D = qt @ constant(_SQ_DIFF, like=quad)  # (B, 2, 3): columns d1, d2, s
    # Three 2-D cross products at once: (d1 x d2, s x d2, d1 x s) = (det, det * g, det * h).
    a = D.index_select(2, constant((0, 2, 0), dtype=torch.long, device=quad.device))
    b = D.index_select(2, constant((1, 1, 2), dtype=torch.long, device=quad.device))
    cr = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]  # (B, 3)
    gh = cr[:, 1:] / cr[:, :1]  # (B, 2)
    # Everything (g, h) adds, in one product: the corner weights of the top rows, then the last row.
    lin = torch.addmm(constant(_SQ_BIAS, like=quad), gh, constant(_SQ_GH, like=quad))  # (B, 15)
    top = qt @ lin[:, :12].view(B, 4, 3)  # (B, 2, 3)
    H = torch.cat([top, lin[:, 12:].view(B, 1, 3)], dim=1)  # (B, 3, 3)
    return H / H[:, 2:3, 2:3]


# square_to_quad's constants. Columns of _SQ_DIFF: d1 = q1 - q2, d2 = q3 - q2, s = q0 - q1 + q2 - q3.
_SQ_DIFF = ((0.0, 0.0, 1.0), (1.0, 0.0, -1.0), (-1.0, -1.0, 1.0), (0.0, 1.0, -1.0))
# The unit-square solution's columns (q1 - q0 + g q1, q3 - q0 + h q3, q0), last row (g, h, 1), times
# [[.5, 0, .5], [0, .5, .5], [0, 0, 1]] (from [-1, 1]^2 to the unit square): corner weights of the
# top rows (4 x 3, row-major) then the last row, as bias + (g, h) @ _SQ_GH.
_SQ_BIAS = (-0.5, -0.5, 0.0,
            0.5, 0.0, 0.5,
            0.0, 0.0, 0.0,
            0.0, 0.5, 0.5,
            0.0, 0.0, 1.0)
_SQ_GH = ((0.0, 0.0, 0.0, 0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.5),
          (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.5, 0.5))


def offsets_to_homography(d: torch.Tensor) -> torch.Tensor:
    """4-point parametrisation: corner offsets -> normalised homography.

    ``d`` ``(B, 8)`` holds ``(dx, dy)`` for the corners TL, TR, BR, BL of the
    normalised square; the result maps each corner ``c`` to ``c + d_c``.
    Moving a parameter by ``e`` moves no image point by more than about ``e``,
    unlike raw matrix entries (the perspective row has a large lever arm), so
    gradient steps of one size are balanced across parameters. ``d = 0`` is
    the identity.
    """
    return square_to_quad(unit_corners(like=d) + d.view(-1, 4, 2))


def _offset_basis(family: str) -> torch.Tensor:
    """``(8, dof)``: the corner offsets (TL, TR, BR, BL; x, y) each parameter of ``family`` makes."""
    c = torch.tensor(((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)), dtype=torch.float64)
    ex, ey = torch.tensor((1.0, 0.0), dtype=torch.float64), torch.tensor((0.0, 1.0), dtype=torch.float64)
    cols = [ex.expand(4, 2), ey.expand(4, 2)]  # translation
    if family in ("similarity", "affine"):
        cols += [c, torch.stack([-c[:, 1], c[:, 0]], 1)] if family == "similarity" else \
            [c[:, :1] * ex, c[:, 1:] * ex, c[:, :1] * ey, c[:, 1:] * ey]
    return torch.stack([v.reshape(8) for v in cols], 1)


def _offset_projections() -> tuple:
    """``(4, 8, 8)`` nested tuples: the orthogonal projection of corner offsets onto each family
    (by rank; the homography's is the identity)."""
    out = []
    for name in FAMILIES_BY_RANK:
        if name == "homography":
            out.append(torch.eye(8, dtype=torch.float64))
        else:
            A = _offset_basis(name)
            out.append(A @ torch.linalg.solve(A.T @ A, A.T))
    return tuple(tuple(tuple(r) for r in P.tolist()) for P in out)


_OFFSET_PROJECTIONS = _offset_projections()


def project_offsets(d: torch.Tensor, limit: str | torch.Tensor | None) -> torch.Tensor:
    """Corner offsets ``(B, 8)`` projected onto those a less general family can make.

    The least-squares fit over the four corners: for ``translation`` every corner gets the mean
    offset; for ``similarity`` and ``affine`` the corners move as the best such map of the frame
    moves them. The projected offsets give a matrix of that family exactly through
    :func:`offsets_to_homography` (the quadrilateral is a translated, similar or affine copy of
    the frame). ``limit``: the family's name, its rank as a 0-d integer tensor (so that a captured
    CUDA graph can change it between replays: one small product whatever the rank), or None
    (no limit). Ranks at or above the homography's leave ``d`` unchanged.
    """
    if limit is None:
        return d
    if isinstance(limit, str):
        rank = get_family(limit).rank
        if rank >= WARP_FAMILIES["homography"].rank:
            return d
        return d @ constant(_OFFSET_PROJECTIONS[rank], like=d)
    P = constant(_OFFSET_PROJECTIONS, like=d).index_select(0, limit.view(1).clamp(0, 3))[0]  # (8, 8), symmetric
    return d @ P


def homography_to_offsets(M: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`offsets_to_homography`, ``(B, 3, 3) -> (B, 8)``."""
    c = unit_corners(like=M)
    return (transform_points(M, c) - c).reshape(-1, 8)



def original_from_resized(sizes, resized: tuple[int, int]) -> torch.Tensor:
    """Pixel maps ``(k, 3, 3)`` float64 from a resized image back to its original, for the
    resize geometry of Pillow and ``interpolate(align_corners=False)`` (pixel centres of the two
    sampled over the same extent); ``sizes`` ``(k, 2)`` original ``(H, W)``, ``resized`` ``(H, W)``."""
    s = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    sy, sx = s[:, 0] / resized[0], s[:, 1] / resized[1]
    out = torch.zeros(len(s), 3, 3, dtype=torch.float64)
    out[:, 0, 0], out[:, 0, 2] = sx, 0.5 * sx - 0.5
    out[:, 1, 1], out[:, 1, 2] = sy, 0.5 * sy - 0.5
    out[:, 2, 2] = 1
    return out
