"""apt-stream: streaming Attentional Ptycho-Tomography."""
__version__ = "0.1.0"
