"""Prefect orchestration of apt-stream (installed as ``apt_stream.flows``): thin flows only.

``listen`` (long-running; one ``reconstruct_scan`` flow run per scan), ``reconstruct_scan`` and
``flight_check``. Every task is one library call; no numerics or sockets live here. Importing
this package does not import Prefect: import the flow modules for that.
"""
