"""File formats: the scan file (docs/scan-format.md) and reconstructed-volume files."""

from apt_stream.io.conventions import Conventions
from apt_stream.io.scan import (
    FORMAT_VERSION,
    GroundTruth,
    LazyFrames,
    ScanData,
    ScanWriter,
    check_scan,
    read_scan,
    validate_scan,
    write_scan,
)
from apt_stream.io.volumes import read_volumes, write_volumes

__all__ = [
    "Conventions",
    "FORMAT_VERSION",
    "GroundTruth",
    "LazyFrames",
    "ScanData",
    "ScanWriter",
    "check_scan",
    "read_scan",
    "read_volumes",
    "validate_scan",
    "write_scan",
    "write_volumes",
]
