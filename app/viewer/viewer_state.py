"""The viewer's model: layers, current result, cursor, overlay settings (no Qt, no VTK).

Widgets listen to :attr:`ViewerState.events` and write back through the setters; a setter emits
only when the value really changes, so a widget that pushes a value it just received does not
start a loop (the napari pattern, see STYLE.md). Derived images (warped labels, Jacobian map,
deformation grid) are computed here on demand with engine functions and cached per result.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from app.engine.types import LabelMap, Landmarks, RegistrationResult, Volume

from .compositing import OVERLAY_MODES, auto_window
from .events import Event, EventGroup  # noqa: F401 - Event is re-exported for old imports
from .slice_geometry import PlaneGrid, plane_volume, sample, sample_point

LAYERS = ("fixed", "moving", "fixed_labels", "moving_labels")
INTERACTIONS = ("cursor", "window", "pick")
LABEL_FILLS = ("none", "fixed", "warped")


class Events:
    """``layers(name)``, ``cursor(xyz)``, ``overlay(changed: set)``, ``window(layer)``,
    ``landmarks()``, ``flicker(phase)``, ``interaction(mode)``."""

    def __init__(self):
        for n in ("layers", "cursor", "overlay", "window", "landmarks", "flicker", "interaction"):
            setattr(self, n, Event(n))


@dataclass
class OverlaySettings:
    """How the overlay layers are drawn on the fixed image.

    mode : 'none' | 'blend' | 'checkerboard' | 'difference' | 'flicker'
    source : 'warped' | 'moving' (warped falls back to moving before a run)
    opacity : overlay weight in blend, [0, 1]
    checker_mm : checkerboard square size in mm
    false_colour : blend as green (fixed) / magenta (overlay)
    grid, grid_every_vox : deformation grid on/off and its line spacing in fixed voxels
    contours_fixed, contours_warped : label contours of the fixed / warped (or moving) labels
    jacobian : Jacobian determinant heat map on/off
    flicker_ms : half period of flicker
    label_fill : 'none' | 'fixed' | 'warped': a filled colour label map (colours from the label
        table, :mod:`app.viewer.colour_table`)
    label_opacity : weight of the filled labels, [0, 1]
    error_map : the current run's estimated registration-error map (mm) on/off
        (:mod:`app.engine.errormap`; computed on demand, see :meth:`Workspace.set_error_map`)
    error_max_mm : top of the error colour bar in mm; 0 = automatic (99th percentile of the map)
    similarity_map : a ``dsm`` run's learned-similarity map on/off, drawn as its disagreement
        ``1 - P(correspond)`` (``RegistrationResult.similarity_map``)
    """

    mode: str = "none"
    source: str = "warped"
    opacity: float = 0.5
    checker_mm: float = 20.0
    false_colour: bool = False
    grid: bool = False
    grid_every_vox: int = 6
    contours_fixed: bool = False
    contours_warped: bool = False
    jacobian: bool = False
    flicker_ms: int = 600
    label_fill: str = "none"
    label_opacity: float = 0.4
    error_map: bool = False
    error_max_mm: float = 0.0
    similarity_map: bool = False

    def validate(self) -> None:
        if self.mode not in OVERLAY_MODES:
            raise ValueError(f"unknown overlay mode '{self.mode}'; use one of {', '.join(OVERLAY_MODES)}")
        if self.source not in ("warped", "moving"):
            raise ValueError(f"overlay source must be 'warped' or 'moving', got '{self.source}'")
        if not 0 <= self.opacity <= 1:
            raise ValueError(f"opacity must be in [0, 1], got {self.opacity}")
        if self.checker_mm <= 0:
            raise ValueError(f"checker size must be positive, got {self.checker_mm} mm")
        if self.label_fill not in LABEL_FILLS:
            raise ValueError(f"label_fill must be one of {', '.join(LABEL_FILLS)}, got '{self.label_fill}'")
        if not 0 <= self.label_opacity <= 1:
            raise ValueError(f"label opacity must be in [0, 1], got {self.label_opacity}")
        if not self.error_max_mm >= 0:
            raise ValueError(f"error colour bar top must be >= 0 mm (0 = automatic), got {self.error_max_mm}")
        if self.grid_every_vox < 2:
            raise ValueError(f"grid spacing must be at least 2 voxels, got {self.grid_every_vox}")


class ViewerState:
    """Everything the views show.

    Attributes
    ----------
    fixed, moving : Volume or None
    fixed_labels, moving_labels : LabelMap or None
    result : RegistrationResult or None
        The run shown as the 'warped' layer.
    paths : dict
        File each layer came from (for sessions).
    cursor : (3,) float
        LPS mm.
    overlay : OverlaySettings
    windows : dict layer -> (window, level)
        'fixed' and 'moving' (the warped image uses the moving one's).
    fixed_points, moving_points : (N, 3) float
        Landmarks shown as glyphs, LPS mm.
    guide_fixed_points, guide_moving_points : (N, 3) float
        Guide pairs of a landmark-guided correction, drawn apart from the landmarks, LPS mm.
    selected_point : (3,) float or None
    interaction : 'cursor' | 'window' | 'pick'
        What a left drag in a slice view does.
    flicker_phase : int
    """

    def __init__(self):
        self.events = Events()
        self.fixed: Optional[Volume] = None
        self.moving: Optional[Volume] = None
        self.fixed_labels: Optional[LabelMap] = None
        self.moving_labels: Optional[LabelMap] = None
        self.result: Optional[RegistrationResult] = None
        self.paths: dict[str, str] = {}
        self.cursor = np.zeros(3)
        self.overlay = OverlaySettings()
        self.windows: dict[str, tuple[float, float]] = {}
        self.fixed_points = np.zeros((0, 3))
        self.moving_points = np.zeros((0, 3))
        self.guide_fixed_points = np.zeros((0, 3))
        self.guide_moving_points = np.zeros((0, 3))
        self.selected_point: Optional[np.ndarray] = None
        self.interaction = "cursor"
        self.flicker_phase = 0
        self.label_table: dict = {}       # {value: (name, (r, g, b))}, see app.viewer.colour_table
        self._cache: dict[Any, Any] = {}

    # ------------------------------------------------------------------ layers
    @property
    def reference(self) -> Optional[Volume]:
        """The grid the slice views show: the fixed image (the moving one until it is loaded)."""
        return self.fixed if self.fixed is not None else self.moving

    def set_layer(self, name: str, volume: Optional[Volume], path: Optional[str] = None) -> None:
        """Replace (or clear with None) one of LAYERS; emits ``layers(name)``."""
        if name not in LAYERS:
            raise ValueError(f"unknown layer '{name}'; use one of {', '.join(LAYERS)}")
        if volume is not None:
            if name.endswith("labels") and not isinstance(volume, LabelMap):
                volume = LabelMap.from_volume(volume)
            if volume.is_vector:
                raise ValueError(f"layer '{name}' must be a scalar image, got shape {volume.array.shape}")
        old_ref = self.reference
        setattr(self, name, volume)
        if path is None:
            self.paths.pop(name, None)
        else:
            self.paths[name] = str(path)
        if name in ("fixed", "moving"):
            if volume is not None:
                self.windows[name] = auto_window(volume.array)
            else:
                self.windows.pop(name, None)
        if name in ("fixed", "moving", "moving_labels"):
            self._cache.clear()
        if self.reference is not old_ref and self.reference is not None:
            self.cursor = self.centre_voxel()
        self.events.layers.emit(name)

    def set_result(self, result: Optional[RegistrationResult]) -> None:
        """Show ``result`` as the warped layer (None: back to the unregistered pair)."""
        if result is self.result:
            return
        self.result = result
        self._cache.clear()
        self.events.layers.emit("result")

    def centre_voxel(self) -> np.ndarray:
        """LPS position of the reference grid's central voxel (a voxel centre, so all views agree)."""
        ref = self.reference
        if ref is None:
            return np.zeros(3)
        return ref.index_to_physical(np.asarray(ref.size_xyz) // 2)[0]

    @property
    def warped(self) -> Optional[Volume]:
        return None if self.result is None else self.result.warped

    def overlay_volume(self) -> tuple[Optional[Volume], str]:
        """(volume, 'warped' | 'moving'): what the overlay modes compare the fixed image with."""
        if self.overlay.source == "warped" and self.warped is not None:
            return self.warped, "warped"
        return self.moving, "moving"

    def warped_labels(self) -> Optional[LabelMap]:
        """Moving labels after the current result (the moving labels as they are before a run)."""
        if self.result is None:
            return self.moving_labels
        if self.result.warped_labels is not None:
            return self.result.warped_labels
        if self.moving_labels is None or self.fixed is None:
            return None
        if "warped_labels" not in self._cache:
            from app.engine import spatial
            self._cache["warped_labels"] = spatial.resample(self.moving_labels, self.fixed,
                                                            self.result.transform, "nearest")
        return self._cache["warped_labels"]

    def field(self) -> Optional[Volume]:
        """Displacement field (z, y, x, 3) mm of the current result on the fixed grid (computed from
        the transform when the result has none; a whole volume, so only for saving)."""
        if self.result is None or self.fixed is None:
            return None
        if self.result.field is not None:
            return self.result.field
        if "field" not in self._cache:
            from app.engine import spatial
            self._cache["field"] = spatial.transform_to_field(self.result.transform, self.fixed)
        return self._cache["field"]

    # ------------------------------------------------------------------ per-plane deformation
    def plane_displacement(self, plane: PlaneGrid, offsets=None) -> Optional[np.ndarray]:
        """Displacement ``T(x) - x`` (xyz LPS mm) of the current result at the pixels of ``plane``.

        Computed for the displayed pixels only (a stored field is sampled there, otherwise
        SimpleITK evaluates the transform on a grid made of the plane's pixels), so a 256^3 result
        costs a slice, not a volume.

        Parameters
        ----------
        plane : PlaneGrid
        offsets : sequence of float, optional
            Plane positions along ``plane.n`` (one plane at ``plane.offset`` by default).

        Returns
        -------
        (K, nv, nu, 3) float32 for K offsets, or None without a result.
        """
        if self.result is None or self.fixed is None:
            return None
        offsets = [plane.offset] if offsets is None else list(offsets)
        if self.result.field is not None:
            f = self.result.field
            out = np.zeros((len(offsets), plane.size_uv[1], plane.size_uv[0], 3), np.float32)
            for k, off in enumerate(offsets):
                p = dataclasses.replace(plane, offset=float(off))
                for c in range(3):
                    out[k, ..., c], _ = sample(f.with_array(f.array[..., c]), p, 1)
            return out
        from app.engine import spatial
        return spatial.transform_to_field(self.result.transform, plane_volume(plane, offsets)).array

    def plane_jacobian(self, plane: PlaneGrid) -> Optional[np.ndarray]:
        """Jacobian determinant of the current result on the pixels of ``plane``, ``(nv, nu)``.

        Central differences across the slice use the neighbouring planes (one-sided at the
        volume's first and last slice), so the values equal those of the full
        :func:`app.engine.spatial.jacobian_map` on a grid-aligned slice.
        """
        if self.result is None or self.fixed is None:
            return None
        lo, hi = sorted(plane.offset_range)
        tol = 1e-6 * max(1.0, plane.step)
        offs = [o for o in (plane.offset - plane.step, plane.offset, plane.offset + plane.step)
                if lo - tol <= o <= hi + tol]
        if len(offs) < 2 or min(plane.size_uv) < 2:
            return None
        from app.engine.metrics import jacobian_determinant
        geo = plane_volume(plane, offs)
        disp = self.plane_displacement(plane, offs)
        det = jacobian_determinant(disp, geo.spacing, geo.direction)
        return det[offs.index(plane.offset)].astype(np.float32)

    # ------------------------------------------------------------------ cursor & settings
    def set_cursor(self, xyz) -> None:
        p = np.asarray(xyz, float).reshape(3)
        if not np.all(np.isfinite(p)):
            raise ValueError(f"cursor must be 3 finite LPS coordinates, got {xyz!r}")
        if np.allclose(p, self.cursor, atol=1e-9):
            return
        self.cursor = p
        self.events.cursor.emit(p.copy())

    def set_overlay(self, **changes) -> None:
        """Change overlay settings by name; emits ``overlay(set of changed names)``."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(OverlaySettings)}
        if unknown:
            raise ValueError(f"unknown overlay setting(s): {', '.join(sorted(unknown))}")
        new = dataclasses.replace(self.overlay, **changes)
        new.validate()
        changed = {k for k in changes if getattr(self.overlay, k) != getattr(new, k)}
        if changed:
            self.overlay = new
            self.events.overlay.emit(changed)

    def set_label_table(self, table: dict) -> None:
        """Names and colours of label values; emits ``overlay({"label_table"})``."""
        self.label_table = dict(table or {})
        self.events.overlay.emit({"label_table"})

    def set_window(self, layer: str, window: float, level: float) -> None:
        if layer not in ("fixed", "moving"):
            raise ValueError(f"window/level applies to 'fixed' or 'moving', got '{layer}'")
        wl = (max(float(window), 1e-6), float(level))
        if self.windows.get(layer) != wl:
            self.windows[layer] = wl
            self.events.window.emit(layer)

    def window_of(self, layer: str) -> tuple[float, float]:
        """(window, level) of 'fixed', 'moving' or 'warped' (= moving's)."""
        key = "moving" if layer == "warped" else layer
        if key not in self.windows:
            vol = self.warped if layer == "warped" else getattr(self, layer, None)
            return auto_window(vol.array) if vol is not None else (1.0, 0.5)
        return self.windows[key]

    def set_landmarks(self, fixed_points=None, moving_points=None, selected=None) -> None:
        """Landmark glyphs to show (LPS mm, (N, 3)); None leaves a set unchanged."""
        if fixed_points is not None:
            self.fixed_points = _points(fixed_points)
        if moving_points is not None:
            self.moving_points = _points(moving_points)
        self.selected_point = None if selected is None else np.asarray(selected, float).reshape(3)
        self.events.landmarks.emit()

    def set_guides(self, fixed_points=None, moving_points=None) -> None:
        """Guide glyphs to show (LPS mm, (N, 3)); None leaves a set unchanged. Emits ``landmarks()``."""
        if fixed_points is not None:
            self.guide_fixed_points = _points(fixed_points)
        if moving_points is not None:
            self.guide_moving_points = _points(moving_points)
        self.events.landmarks.emit()

    def set_interaction(self, mode: str) -> None:
        if mode not in INTERACTIONS:
            raise ValueError(f"unknown interaction '{mode}'; use one of {', '.join(INTERACTIONS)}")
        if mode != self.interaction:
            self.interaction = mode
            self.events.interaction.emit(mode)

    def set_flicker_phase(self, phase: int) -> None:
        if phase != self.flicker_phase:
            self.flicker_phase = int(phase)
            self.events.flicker.emit(self.flicker_phase)

    # ------------------------------------------------------------------ read-outs
    def values_at(self, xyz) -> dict[str, Any]:
        """Voxel values (nearest voxel) of fixed / moving / warped at an LPS point (None outside)."""
        return {"fixed": sample_point(self.fixed, xyz), "moving": sample_point(self.moving, xyz),
                "warped": sample_point(self.warped, xyz)}

    # ------------------------------------------------------------------ error map
    @property
    def error_map(self) -> Optional[Volume]:
        """The current result's estimated error map ``(z, y, x)`` mm on the fixed grid, or None."""
        return None if self.result is None else getattr(self.result, "error_map", None)

    def error_map_changed(self) -> None:
        """The current result's error map was computed or dropped: redraw (emits ``layers('error_map')``)."""
        self._cache.pop("error_scale", None)
        self.events.layers.emit("error_map")

    def error_scale_mm(self) -> float:
        """Top of the error colour bar (mm): ``overlay.error_max_mm``, or when 0 the 99th percentile
        of the current map (at least 0.1 mm, rounded up to 2 significant digits)."""
        if self.overlay.error_max_mm > 0:
            return float(self.overlay.error_max_mm)
        em = self.error_map
        if em is None:
            return 1.0
        key = ("error_scale", id(em))
        if self._cache.get("error_scale", (None,))[0] != key:
            a = em.array[np.isfinite(em.array)]
            top = float(np.percentile(a, 99)) if a.size else 1.0
            top = max(top, 0.1)
            digits = 1 - int(np.floor(np.log10(top)))
            top = float(np.ceil(top * 10 ** digits) / 10 ** digits)
            self._cache["error_scale"] = (key, top)
        return self._cache["error_scale"][1]

    def error_at(self, xyz) -> Optional[float]:
        """Estimated registration error (mm) of the current result at an LPS point (nearest voxel);
        None without an error map or outside the fixed grid."""
        v = sample_point(self.error_map, xyz)
        return None if v is None else float(v)

    # ------------------------------------------------------------------ dsm similarity map
    @property
    def similarity_map(self) -> Optional[Volume]:
        """The current result's dsm agreement map ``(z, y, x)`` in [0, 1] on the fixed grid
        (P that the fixed and warped patches correspond; NaN where no patch was scored), or None."""
        return None if self.result is None else getattr(self.result, "similarity_map", None)

    def similarity_at(self, xyz) -> Optional[float]:
        """The dsm agreement P(correspond) of the current result at an LPS point (nearest voxel); None
        without a map, outside the fixed grid or where no patch was scored."""
        v = sample_point(self.similarity_map, xyz)
        return None if v is None or not np.isfinite(v) else float(v)

    def has_data(self) -> bool:
        return self.reference is not None


def _points(p) -> np.ndarray:
    if isinstance(p, Landmarks):
        return p.points.copy()
    a = np.asarray(p, float)
    if a.size == 0:
        return np.zeros((0, 3))
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"landmarks must be (N, 3) LPS mm, got shape {a.shape}")
    return a
