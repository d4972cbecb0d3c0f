"""The apt-stream scan file: one NeXus-flavoured HDF5 file per ptycho-tomography scan.

The layout, units and conventions are documented in ``docs/scan-format.md``; the physical
conventions behind them in ``docs/conventions.md``. In short::

    /entry                          NXentry
      instrument/source/energy      keV
      instrument/detector/distance, x_pixel_size, y_pixel_size    m
      instrument/probe/modes        (M, h, w) complex, sampled at the object pixel
      sample/rotation_angle         (N,) deg, rotation about +y, right-handed
      sample/volume_shape           (3,) reconstruction grid (nz, ny, nx)
      sample/ground_truth/…         optional: delta, beta, labels, voxel_size (m)
      object/pixel_size, field_shape, n_slices, slice_spacing (N,) m
      data/frames                   (K, h, w) float32 counts, DC at (h//2, w//2)
      data/angle_index, positions   (K,) int32, (K, 2) (y, x) top-left of the probe window, m
      provenance/…                  software_version, preset, seed, created, command_line, extra

In memory the positions are object-field pixels (:class:`ScanData`); the file keeps metres so
that it stands on its own. Every check reports the HDF5 path of the first bad field, so
``check_scan`` (in memory) and ``validate_scan`` (on a file) give the same messages.

This module gathers the package's pieces, split by concern: :mod:`~apt_stream.io.scan_format`
(paths, classes, units, tolerances), :mod:`~apt_stream.io.scan_data` (``ScanData``,
``GroundTruth``, ``LazyFrames``), :mod:`~apt_stream.io.scan_check` (checks),
:mod:`~apt_stream.io.scan_read` (reading, validating) and :mod:`~apt_stream.io.scan_write`
(writing). Import from here or from :mod:`apt_stream.io`.
"""

from __future__ import annotations

from apt_stream.io.scan_check import check_scan
from apt_stream.io.scan_data import GroundTruth, LazyFrames, ScanData
from apt_stream.io.scan_format import (
    ANGLE_INDEX,
    ANGLES,
    DISTANCE,
    ENERGY,
    FIELD_SHAPE,
    FORMAT_NAME,
    FORMAT_VERSION,
    FRAMES,
    GROUPS,
    N_SLICES,
    OBJECT_PIXEL,
    OBJECT_PIXEL_RTOL,
    OPTIONAL_GROUPS,
    POSITION_TOLERANCE_PX,
    POSITIONS,
    PROBE,
    PROVENANCE,
    SLICE_SPACING,
    TRUTH,
    UNITS,
    VOLUME_SHAPE,
    X_PIXEL,
    Y_PIXEL,
    open_hdf5,
)
from apt_stream.io.scan_read import read_scan, validate_scan
from apt_stream.io.scan_write import ScanWriter, _compression_kwargs, dumps_json, write_scan

__all__ = [
    "ANGLES",
    "ANGLE_INDEX",
    "DISTANCE",
    "ENERGY",
    "FIELD_SHAPE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FRAMES",
    "GROUPS",
    "N_SLICES",
    "OBJECT_PIXEL",
    "OBJECT_PIXEL_RTOL",
    "OPTIONAL_GROUPS",
    "POSITIONS",
    "POSITION_TOLERANCE_PX",
    "PROBE",
    "PROVENANCE",
    "SLICE_SPACING",
    "TRUTH",
    "UNITS",
    "VOLUME_SHAPE",
    "X_PIXEL",
    "Y_PIXEL",
    "GroundTruth",
    "LazyFrames",
    "ScanData",
    "ScanWriter",
    "_compression_kwargs",
    "check_scan",
    "dumps_json",
    "open_hdf5",
    "read_scan",
    "validate_scan",
    "write_scan",
]
