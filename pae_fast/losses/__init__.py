"""Losses: reconstruction (L1/LPIPS/GAN), prior regularizers (SSR/MCR/SCR) and prior refinement."""
