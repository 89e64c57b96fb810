"""fourdthinker: a Qwen2.5-VL that thinks about video with latent 4D imagery.

The library holds pure functions and classes; nothing here starts Ray or an engine at import.
"""

__version__ = "0.1.0"
