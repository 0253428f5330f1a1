"""Wan2.1 interoperability: real Wan2.1 / diffusers / transformers checkpoints in rcm-jax, without torch.

wan: DiT checkpoints (diffusers `WanTransformer3DModel` folders and the original Wan2.1 layout) -> our params and
orbax checkpoints (`python -m rcm_jax.main convert`). umt5: the umT5 text encoder, its tokenizer and cached text
embeddings. wan_vae: the Wan2.1 causal 3D VAE. t2v: the text-to-video sample job of configs/wan2p1/.
"""
