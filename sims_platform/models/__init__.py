"""The EDM2 network: magnitude-preserving layers, U-Net, EDM preconditioning, loss, EMA and presets."""
