"""Documents -> frames: 0MQ sources, safe decoding and validation, run assembly, spool, recovery,
the inference trigger and the live reconstruction loop. Usable without Prefect or Tiled.

See docs/streaming.md for the document schema and the design.
"""

from apt_stream.stream.assembler import RunAssembler
from apt_stream.stream.decode import decode_message, encode_json, encode_msgpack, encoder_for
from apt_stream.stream.listener import Listener
from apt_stream.stream.live import LiveReconstructor
from apt_stream.stream.messages import FrameBatch, RunHeader, RunStopped
from apt_stream.stream.paths import DataRoots
from apt_stream.stream.pipeline import DocumentPipeline
from apt_stream.stream.recovery import RunRecovery
from apt_stream.stream.sink import LoggingSink, ReconstructionSink, RunStatus
from apt_stream.stream.source import FileDocumentSource, ScanFileSource, ZmqDocumentSource
from apt_stream.stream.spool import RunSpool, replay_spool
from apt_stream.stream.trigger import TriggerPolicy, TriggerState
from apt_stream.stream.validate import validate_document

__all__ = [
    "DataRoots",
    "DocumentPipeline",
    "FileDocumentSource",
    "FrameBatch",
    "Listener",
    "LiveReconstructor",
    "LoggingSink",
    "ReconstructionSink",
    "RunAssembler",
    "RunHeader",
    "RunRecovery",
    "RunSpool",
    "RunStatus",
    "RunStopped",
    "ScanFileSource",
    "TriggerPolicy",
    "TriggerState",
    "ZmqDocumentSource",
    "decode_message",
    "encode_json",
    "encode_msgpack",
    "encoder_for",
    "replay_spool",
    "validate_document",
]
