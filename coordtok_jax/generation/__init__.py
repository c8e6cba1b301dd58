"""Video generation on a frozen tokenizer: the triplane SiT trainer (train_sit), the latent cache
(encode_latents writes it, latent_cache reads it) and diffusion sampling of videos (sample)."""
