"""Quality metrics: PSNR / SSIM / per-video means (quality), LPIPS (lpips), I3D features (i3d) and
the Fréchet video distance (fvd)."""
