"""Physics core: propagation, multislice forward model and gradient, the streaming angle engine,
rotations and classical tomography. Never imports Prefect, Tiled, ZMQ or Bluesky."""
