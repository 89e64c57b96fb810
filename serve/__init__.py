"""The Serve stage: an OpenAI-compatible HTTP app hosting a fourdthinker checkpoint with latent
decoding on (Ray Serve + vLLM's async engine). `serve/app.py` is the application."""
