"""Evaluation: metrics (PSNR, SSIM, LPIPS), I3D features and FVD, CLIs."""
