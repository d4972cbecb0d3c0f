"""The APT network, its presets, safe checkpoints, stitched inference and training.

Quick use::

    from apt_stream.model import create_model, predict_volume, load_checkpoint
    model = create_model("cpu")                 # or "paper"
    volume_out = predict_volume(model, approximant_zyx)

This package never imports Prefect, Tiled, ZMQ or Bluesky (see DESIGN.md).
"""

from apt_stream.model.attention import AxialAttention, AxialAttentionBlock
from apt_stream.model.checkpoint import (
    load_checkpoint,
    load_optimizer_state,
    read_metadata,
    save_checkpoint,
    save_optimizer_state,
    sha256_file,
    verify_checksum,
)
from apt_stream.model.inference import benchmark_inference, predict_volume
from apt_stream.model.losses import NPCCLoss, npcc_loss, pearson_per_sample
from apt_stream.model.network import APTNet, NetworkConfig
from apt_stream.model.presets import (
    DEFAULT_PRESET,
    count_parameters,
    create_model,
    get_network_preset,
    list_presets,
    model_info,
    model_info_table,
    register_preset,
)
from apt_stream.model.train import (
    PairDataset,
    TrainResult,
    evaluate,
    load_pairs,
    poly_lr,
    save_pairs,
    train,
)

__all__ = [
    "APTNet",
    "AxialAttention",
    "AxialAttentionBlock",
    "DEFAULT_PRESET",
    "NPCCLoss",
    "NetworkConfig",
    "PairDataset",
    "TrainResult",
    "benchmark_inference",
    "count_parameters",
    "create_model",
    "evaluate",
    "get_network_preset",
    "list_presets",
    "load_checkpoint",
    "load_optimizer_state",
    "load_pairs",
    "model_info",
    "model_info_table",
    "npcc_loss",
    "pearson_per_sample",
    "poly_lr",
    "predict_volume",
    "read_metadata",
    "register_preset",
    "save_checkpoint",
    "save_optimizer_state",
    "save_pairs",
    "sha256_file",
    "train",
    "verify_checksum",
]
